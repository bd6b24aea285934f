"""Guidance interval (``guidance_start`` / ``guidance_end``): classifier-free guidance only on the steps whose index
fraction ``i / steps`` lies in ``[start, end)``; the other steps run the conditional branch alone.

Off (0, 1) it must be the same computation as before; an empty interval must be exactly guidance off; the steps
outside must run no unconditional rows (about half a guided step's work); inside it, the result moves towards full
guidance. Random weights cannot judge quality: the deviation test only bounds how far the lever moves the frames.
"""

import numpy as np
import pytest
from conftest import TINY_SIZE, tiny_latents
from tiny_models import make_motion
from torch.utils.flop_counter import FlopCounterMode

from magicanimate import animate
from magicanimate.errors import InputError
from magicanimate.settings import SettingError, load_config, pipeline_arguments

STEPS = 4


@pytest.fixture(scope="module")
def motion32():
    return make_motion(32, TINY_SIZE, seed=5)  # 3 uniform windows of 16


def _run(pipe, reference, motion, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("latents", tiny_latents(len(motion), seed=2))
    return pipe(reference, motion, **kwargs).frames


def test_defaults_are_bit_identical_to_not_passing_them(tiny_pipe, reference_image, motion16):
    plain = _run(tiny_pipe, reference_image, motion16)
    defaults = _run(tiny_pipe, reference_image, motion16, guidance_start=0.0, guidance_end=1.0)
    np.testing.assert_array_equal(defaults, plain)


def test_an_empty_interval_is_exactly_guidance_off(tiny_pipe, reference_image, motion16):
    off = _run(tiny_pipe, reference_image, motion16, guidance_scale=1.0)
    empty = _run(tiny_pipe, reference_image, motion16, guidance_start=0.5, guidance_end=0.5)
    np.testing.assert_array_equal(empty, off)


def test_steps_outside_the_interval_run_only_conditional_rows(tiny_pipe, reference_image, motion32):
    """4 steps, interval [0.25, 0.75): steps 1 and 2 guided. Rows through the UNet's output layer per step are
    windows x frames x branches (3 x 16 x 2 guided, 3 x 16 alone), and no row of an unguided step skips the
    reference (every batch item conditional)."""
    rows, masks, per_step = [], [], []
    readers = list(tiny_pipe.reference_control.readers.values())
    hooks = [
        tiny_pipe.unet.conv_out.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0])),
        tiny_pipe.unet.register_forward_pre_hook(lambda m, args: masks.append(readers[0].conditional)),
    ]

    def end_of_step(pipe, step, timestep, tensors):
        per_step.append((sum(rows), list(masks)))
        rows.clear()
        masks.clear()
        return tensors

    try:
        _run(tiny_pipe, reference_image, motion32, guidance_start=0.25, guidance_end=0.75,
             callback_on_step_end=end_of_step)  # fmt: skip
    finally:
        for hook in hooks:
            hook.remove()
    assert [count for count, _ in per_step] == [48, 96, 96, 48]
    for step in (0, 3):
        assert all(all(mask) for mask in per_step[step][1])
    for step in (1, 2):
        assert all(False in mask and True in mask for mask in per_step[step][1])


def test_flops_are_linear_in_the_guided_steps(tiny_pipe, reference_image, motion16):
    """Each step costs the same but for its branches, so a run with k of n steps guided costs exactly
    ``off + k / n * (full - off)`` (FLOPs counted by torch). An unguided step's video-UNet work is half a guided
    one's without the shared down path and ``1 / (2 - down share)`` with it (0.61 measured on the tiny models)."""

    def flops(**kwargs):
        with FlopCounterMode(display=False) as counter:
            _run(tiny_pipe, reference_image, motion16, **kwargs)
        return counter.get_total_flops(), sum(counter.get_flop_counts()["VideoUNet"].values())

    (full, full_unet), (off, off_unet) = flops(), flops(guidance_start=0.0, guidance_end=0.0)
    half, half_unet = flops(guidance_end=0.5)
    print(f"video-UNet FLOPs: guided {full_unet:.4g}, unguided {off_unet:.4g} ({off_unet / full_unet:.3f}x)")
    assert 0.49 * full_unet < off_unet < 0.7 * full_unet
    assert 2 * half == full + off and 2 * half_unet == full_unet + off_unet


def test_the_deviation_from_full_guidance_is_bounded_by_guidance_off(tiny_pipe, reference_image, motion16):
    """Guiding the first half of the steps ends nearer the fully guided frames than not guiding at all."""
    full = _run(tiny_pipe, reference_image, motion16)
    first_half = _run(tiny_pipe, reference_image, motion16, guidance_end=0.5)
    off = _run(tiny_pipe, reference_image, motion16, guidance_scale=1.0)
    interval_dev, off_dev = np.abs(first_half - full), np.abs(off - full)
    print(
        f"deviation from full guidance: interval [0, 0.5) max {interval_dev.max():.4f} mean {interval_dev.mean():.4f};"
        f" guidance off max {off_dev.max():.4f} mean {off_dev.mean():.4f}"
    )
    assert interval_dev.mean() > 1e-4  # the lever does something
    assert interval_dev.mean() < off_dev.mean()


def test_the_settings_reach_the_pipeline(tiny_pipe, reference_image, motion16):
    """Through animate (as the CLI, batch jobs and the demo call it): guidance_end=0 is guidance off, bit for bit."""
    common = dict(pipeline=tiny_pipe, steps=2, size=TINY_SIZE, check_motion=False)
    off = animate(reference_image, motion16, guidance_scale=1.0, **common).frames
    none_guided = animate(reference_image, motion16, guidance_end=0.0, **common).frames
    np.testing.assert_array_equal(none_guided, off)
    arguments = pipeline_arguments(load_config(guidance_start=0.2, guidance_end=0.6))
    assert arguments["guidance_start"] == 0.2 and arguments["guidance_end"] == 0.6


def test_bad_intervals_are_refused(tiny_pipe, reference_image, motion16):
    with pytest.raises(SettingError, match="guidance_start"):
        load_config(guidance_start=0.7, guidance_end=0.3)
    for start, end in ((0.7, 0.3), (-0.1, 1.0), (0.0, 1.5), (float("nan"), 1.0)):
        with pytest.raises(InputError, match="guidance_"):
            _run(tiny_pipe, reference_image, motion16, guidance_start=start, guidance_end=end)


def test_the_interval_is_a_fraction_of_the_scheduler_s_steps(tiny_pipe, reference_image, motion16):
    """[0, 0.5) with 4 steps guides 2; with 2 steps 1: the same fraction, whatever the step count."""
    guided = []
    readers = list(tiny_pipe.reference_control.readers.values())
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda m, args: guided.append(False in readers[0].conditional))
    try:
        for steps in (4, 2):
            _run(tiny_pipe, reference_image, motion16, num_inference_steps=steps, guidance_end=0.5)
    finally:
        hook.remove()
    assert guided == [True, True, False, False, True, False]
