"""``preset: fast``: the quality-trading levers together, each still a setting of its own, at under a quarter of
the original's work.

The work is counted as ``benchmarks/bench_pipeline.py --flops-only --preset fast`` counts it: every network call at
full size (SD 1.5 widths, 512x512, 64 frames) on the meta device, times how often the pipeline makes it. The
original's 6,635 TFLOP for that clip is the performance anchor's figure (shared/docs/performance-anchor.md).
"""

import sys
from pathlib import Path

import pytest

from magicanimate.settings import BY_NAME, PRESETS, load_config

ORIGINAL_TFLOP_64 = 6635


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_pipeline
    finally:
        sys.path.pop(0)
    return bench_pipeline


def test_every_lever_of_the_preset_is_a_setting_and_yours_win():
    assert set(PRESETS["fast"]) <= set(BY_NAME)
    config = load_config(preset="fast", steps=20, guidance_end=1.0)
    assert config.steps == 20 and config.guidance_end == 1.0 and config.scheduler == "dpmpp_2m"


@pytest.mark.parametrize("share_down_path", [True, False])
def test_fast_preset_counts_at_most_a_quarter_of_the_original_work(bench, share_down_path):
    """With or without the shared down path (parity mode's exact lever), so the target does not rest on it."""
    fast = bench.count_flops_meta(64, "parity", None, False, share_down_path, preset="fast")
    parity = bench.count_flops_meta(64, "parity", None, False, share_down_path)
    print(f"share_down_path={share_down_path}: fast {fast['tflop']:.0f} TFLOP "
          f"({fast['tflop'] / ORIGINAL_TFLOP_64:.3f}x the original), parity {parity['tflop']:.0f}")  # fmt: skip
    assert fast["tflop"] <= 0.25 * ORIGINAL_TFLOP_64
    assert fast["calls"]["appearance_encoder"] == PRESETS["fast"]["steps"]
    # 10 steps instead of 25, 4 of them guided, 5 windows instead of 6: the UNet's share shrinks the most.
    assert fast["tflop_by_network"]["unet"] < 0.3 * parity["tflop_by_network"]["unet"]
