"""Shared, session-scoped fixtures: the tiny original-layout tree, a pipeline loaded from it, one baseline run, and
the reference-parity fixture (which lives in ../shared and is only present in CI).

Threads: torch runs single-threaded here unless OMP_NUM_THREADS or MAGICANIMATE_TEST_THREADS says otherwise. With
its default (one thread per core) a loaded 2-core machine slows these tiny models down 20-40x (threads spin-waiting
on each other); one thread costs ~1.4x on an idle machine. The parity tolerances hold for either thread count.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # so test modules can `import tiny_models`
    sys.path.insert(0, str(TESTS))

from tiny_models import build_tiny_original_tree, make_motion, make_reference  # noqa: E402

if "OMP_NUM_THREADS" not in os.environ or "MAGICANIMATE_TEST_THREADS" in os.environ:
    torch.set_num_threads(int(os.environ.get("MAGICANIMATE_TEST_THREADS", "1")))

SHARED = Path(__file__).resolve().parents[2] / "shared"
PARITY = SHARED / "fixtures" / "reference-parity"

TINY_STEPS = 2
TINY_FRAMES = 16
TINY_SIZE = 64

# Tolerance for frames (floats in [0, 1]) of one tiny run computed along two code paths that agree up to float32
# rounding: different loading paths, memory layouts, batch sizes or CPUs. Measured on the tiny run (16 frames, 64 px,
# 2 steps, guidance 7.5): float32 deviates from the same run in float64 by at most 4.0e-6 with AVX-512 kernels and
# 6.2e-6 with AVX2 dispatch forced (ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2); float32 AVX-512 vs AVX2
# runs differ by 7.6e-6 (an AMD EPYC saw 7.4e-6 between two loading paths). About 5x the larger float32-vs-float64
# deviation:
FRAME_ATOL = 3e-5
# uint8 frames (round(255 x)) of such runs: a value moves by at most one level, and only where a rounding boundary
# lies within 255 * FRAME_ATOL of it, i.e. (for fractional parts spread evenly) for at most that fraction of values.
UINT8_FLIP_FRACTION = 255 * FRAME_ATOL


def assert_frames_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """``actual`` equals ``expected`` up to float32 rounding (see :data:`FRAME_ATOL`)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if actual.dtype == np.uint8:
        difference = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
        assert difference.max() <= 1, f"uint8 frames differ by up to {difference.max()} levels"
        assert (difference > 0).mean() <= UINT8_FLIP_FRACTION, f"{(difference > 0).mean():.3%} of values differ"
    else:
        np.testing.assert_allclose(actual, expected, rtol=0, atol=FRAME_ATOL)


def parity_dir() -> Path:
    if not PARITY.is_dir():
        pytest.skip("../shared not found: parity fixtures run in CI only")
    return PARITY


@pytest.fixture(scope="session")
def parity() -> Path:
    return parity_dir()


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory) -> Path:
    return build_tiny_original_tree(tmp_path_factory.mktemp("tiny-original-tree"))


def load_tiny_pipeline(tree: Path, **kwargs):
    from magicanimate import MagicAnimatePipeline

    pipe = MagicAnimatePipeline.from_pretrained(tree, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_pipe(tiny_tree):
    """Loaded once. Tests may run it but must not change its components or dtype (load a fresh one for that)."""
    return load_tiny_pipeline(tiny_tree)


@pytest.fixture(scope="session")
def reference_image() -> np.ndarray:
    return make_reference(TINY_SIZE)


@pytest.fixture(scope="session")
def motion16() -> np.ndarray:
    return make_motion(TINY_FRAMES, TINY_SIZE)


def tiny_latents(num_frames: int, seed: int = 1, size: int = TINY_SIZE) -> torch.Tensor:
    """Independent (not tiled) Gaussian latents ``(1, 4, F, size/8, size/8)``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((1, 4, num_frames, size // 8, size // 8), generator=generator)


@pytest.fixture(scope="session")
def tiny_baseline(tiny_pipe, reference_image, motion16) -> np.ndarray:
    """Frames of the reference tiny run: 16 frames, 64x64, 2 steps, guidance 7.5, fixed latents."""
    return tiny_pipe(
        reference_image,
        motion16,
        num_inference_steps=TINY_STEPS,
        guidance_scale=7.5,
        latents=tiny_latents(TINY_FRAMES),
        output_type="np",
    ).frames
