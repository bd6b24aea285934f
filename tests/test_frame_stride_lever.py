"""``frame_stride`` as a speed lever (issue 10's checklist): off it is parity mode; on, the diffusion work drops by
exactly the windows the strided clip no longer needs; the frames stay near parity mode. The interpolation itself is
tested in tests/test_interpolation.py."""

import numpy as np
import pytest
from conftest import TINY_SIZE
from tiny_models import make_motion
from torch.utils.flop_counter import FlopCounterMode

from magicanimate import animate
from magicanimate.interpolation import stride_indices
from magicanimate.pipelines.context_windows import context_windows


@pytest.fixture(scope="module")
def motion64():
    return make_motion(64, TINY_SIZE, seed=6)


def _animate(pipe, reference, motion, **settings):
    return animate(reference, motion, pipeline=pipe, steps=1, size=TINY_SIZE, **settings).frames


def test_stride_one_is_parity_mode(tiny_pipe, reference_image, motion16):
    np.testing.assert_array_equal(
        _animate(tiny_pipe, reference_image, motion16, frame_stride=1), _animate(tiny_pipe, reference_image, motion16)
    )


def test_the_work_drops_by_the_windows_saved(tiny_pipe, reference_image, motion64):
    """64 frames at stride 2 animate 33 (every second one and the last): 4 uniform windows instead of 6, so the
    video UNet does 4/6 of its work (exactly, but for the reference keys/values it projects once per step: 5e-5 of
    it here) and the ControlNet 3/4 (its 16-frame chunks: 48 padded frames, not 64)."""

    def flops(**settings):
        with FlopCounterMode(display=False) as counter:
            _animate(tiny_pipe, reference_image, motion64, **settings)
        return {name: sum(c.values()) for name, c in counter.get_flop_counts().items() if "." not in name}

    plain, strided = flops(), flops(frame_stride=2)
    kept = len(stride_indices(64, 2))
    windows = len(context_windows(-(-kept // 16) * 16)), len(context_windows(64))
    print(f"{kept} animated frames, {windows[0]} of {windows[1]} windows; video UNet "
          f"{strided['VideoUNet'] / plain['VideoUNet']:.3f}x")  # fmt: skip
    assert (kept, windows) == (33, (4, 6))
    assert strided["VideoUNet"] * windows[1] == pytest.approx(plain["VideoUNet"] * windows[0], rel=1e-4)
    assert strided["ControlNetModel"] * 4 == plain["ControlNetModel"] * 3


def test_frames_stay_near_parity_mode(tiny_pipe, reference_image, motion64):
    """Random weights: the deviation from parity mode is printed and must stay below what another seed changes."""
    parity = _animate(tiny_pipe, reference_image, motion64).astype(np.float32)
    strided = _animate(tiny_pipe, reference_image, motion64, frame_stride=2).astype(np.float32)
    other_seed = _animate(tiny_pipe, reference_image, motion64, seed=7).astype(np.float32)
    deviation, seed_change = np.abs(strided - parity).mean(), np.abs(other_seed - parity).mean()
    print(f"frame_stride 2 vs parity: mean |diff| {deviation:.2f} levels; another seed: {seed_change:.2f}")
    assert strided.shape == parity.shape and 0 < deviation < seed_change
