"""``benchmarks/quality_vs_speed.py`` on the tiny random-weight models: it runs, times and compares each variant
with parity mode, and reports a lever that raises as unavailable. (Random weights cannot judge quality: this tests
the benchmark, not the levers.)"""

import json
import math
import sys
from pathlib import Path

import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio
from tiny_models import make_motion, make_reference

from magicanimate.api import animate
from magicanimate.io import write_video

FRAMES, SIZE, STEPS = 8, 64, 2


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import quality_vs_speed
    finally:
        sys.path.pop(0)
    return quality_vs_speed


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    Image.fromarray(make_reference(SIZE)).save(folder / "photo.png")
    write_video(folder / "motion.mp4", make_motion(FRAMES, SIZE), fps=25)
    return folder / "photo.png", folder / "motion.mp4"


def test_benchmark_compares_each_variant_with_parity_mode(bench, clip, tiny_tree, tiny_pipe, tmp_path, capsys):
    reference, motion = clip
    out = tmp_path / "quality.json"
    code = bench.main(
        [
            "--pretrained",
            str(tiny_tree),
            "--reference",
            str(reference),
            "--motion",
            str(motion),
            "--max-frames",
            str(FRAMES),
            "--size",
            str(SIZE),
            "--steps",
            str(STEPS),
            "--few-steps",
            "1",
            "--only",
            "guidance_end",
            "dpmpp_2m",
            "--device",
            "cpu",
            "--no-check-motion",
            "--no-warmup",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "guidance_end" in printed and "PSNR" in printed
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["parity", "dpmpp_2m", "guidance_end"]
    assert rows["parity"]["status"] == "reference" and rows["parity"]["speedup"] == 1.0
    for key in ("dpmpp_2m", "guidance_end"):
        row = rows[key]
        assert row["status"] == "ok" and row["seconds"] > 0
        assert row["speedup"] == pytest.approx(rows["parity"]["seconds"] / row["seconds"])
        assert 0 < row["ssim"] < 1 and math.isfinite(row["psnr"])
    # The same two calls made here, compared by scikit-image: the benchmark's PSNR is that of these frames.
    settings = {"size": SIZE, "steps": STEPS, "max_frames": FRAMES, "check_motion": False}
    parity = animate(reference, motion, pipeline=tiny_pipe, **settings).frames
    guided = animate(reference, motion, pipeline=tiny_pipe, **settings, guidance_end=0.4).frames
    expected = peak_signal_noise_ratio(parity, guided, data_range=255)  # of the mse over the whole clip
    assert rows["guidance_end"]["psnr"] == pytest.approx(expected, abs=1e-3)  # float32 frames vs float64


def test_a_lever_that_raises_is_unavailable_and_one_that_changes_nothing_is_flagged(bench, clip, tiny_pipe):
    reference, motion = clip
    base = {"size": SIZE, "steps": 1, "max_frames": FRAMES, "check_motion": False}
    chosen = [
        bench.Variant("parity", "parity"),
        bench.Variant("broken", "a setting this version refuses", {"cache_interval": 0}),
        bench.Variant("same", "a no-op", {"crf": 30}),  # the mp4 quality: the frames are parity mode's
    ]
    rows = {
        row["variant"]: row
        for row in bench.run_variants(tiny_pipe, reference, motion, base, chosen, progress=lambda line: None)
    }
    assert rows["broken"]["status"] == "unavailable" and "cache_interval" in rows["broken"]["notes"][0]
    assert rows["broken"]["psnr"] is None
    same = rows["same"]
    assert same["status"] == "ok" and same["psnr"] == math.inf
    assert any("identical to parity" in note for note in same["notes"])


def test_preset_variants_keep_their_own_settings(bench):
    base = {"size": 512, "steps": 25, "seed": 1, "max_frames": 32}
    known = {v.key: v for v in bench.variants(10)}
    assert bench.variant_settings(base, known["fast"]) == {"size": 512, "seed": 1, "max_frames": 32, "preset": "fast"}
    assert "size" not in bench.variant_settings(base, known["preview"])
    assert bench.variant_settings(base, known["unipc"])["steps"] == 10
