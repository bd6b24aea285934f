"""End to end through the installed ``magicanimate`` command, as a user runs it."""

import os
import subprocess
import sys
from pathlib import Path

import av
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURE = SHARED / "fixtures" / "reference-parity"
SAMPLE = SHARED / "samples" / "densepose" / "running.mp4"
needs_shared = pytest.mark.skipif(not FIXTURE.is_dir(), reason="../shared not found: CLI end-to-end runs in CI only")


def run_cli(*args, env=None, cwd=None):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    command = [sys.executable, "-m", "magicanimate.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=environment, cwd=cwd, timeout=600)


@needs_shared
def test_animate_writes_playable_h264_with_every_motion_frame(tmp_path):
    out = tmp_path / "nested" / "out.mp4"
    result = run_cli(
        "animate",
        "--reference",
        FIXTURE / "inputs" / "reference.png",
        "--motion",
        SAMPLE,
        "-o",
        out,
        "--pretrained",
        FIXTURE / "pretrained",
        "--steps",
        2,
        "--size",
        64,
        "--seed",
        3,
    )
    assert result.returncode == 0, result.stderr
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert float(stream.average_rate) == pytest.approx(25.0)
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    assert len(frames) == 42  # running.mp4 has 42 frames: padding to 48 is cropped off again
    assert frames[0].shape == (64, 64, 3)
    assert len(list(tmp_path.glob("nested/.*"))) == 0  # no temporary leftovers


@needs_shared
def test_grid_and_settings_flags(tmp_path):
    out = tmp_path / "grid.mp4"
    result = run_cli(
        "animate",
        "--reference",
        FIXTURE / "inputs" / "reference.png",
        "--motion",
        FIXTURE / "inputs" / "motion.mp4",
        "-o",
        out,
        "--pretrained",
        FIXTURE / "pretrained",
        "--steps",
        1,
        "--grid",
        "--context-overlap",
        8,
        "--size",
        64,
        "--context-schedule",
        "sliding",
        "--fps",
        12.5,
    )
    assert result.returncode == 0, result.stderr
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (3 * 64, 64)
        assert float(stream.average_rate) == pytest.approx(12.5)
        assert sum(1 for _ in container.decode(stream)) == 32


def test_missing_weights_offline_is_one_line(tmp_path):
    reference = tmp_path / "ref.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 100, 50)).save(reference)
    motion = tmp_path / "motion.mp4"
    import numpy as np

    from magicanimate.io import write_video

    write_video(motion, np.full((4, 64, 64, 3), (68, 1, 84), np.uint8), fps=25)
    result = run_cli(
        "animate",
        "--reference",
        reference,
        "--motion",
        motion,
        "-o",
        tmp_path / "out.mp4",
        env={"MAGICANIMATE_PRETRAINED": str(tmp_path / "weights")},
    )
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "download" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.mp4").exists()


def test_bad_input_exits_2_without_traceback(tmp_path):
    result = run_cli(
        "animate", "--reference", tmp_path / "nope.png", "--motion", tmp_path / "nope.mp4", "-o", tmp_path / "out.mp4"
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "nope.png" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_config_key_is_rejected(tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text("stepz: 3\n")
    reference = tmp_path / "ref.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(reference)
    result = run_cli(
        "animate", "--reference", reference, "--motion", reference, "-o", tmp_path / "o.mp4", "--config", config
    )
    assert result.returncode == 2
    assert "stepz" in result.stderr and "Traceback" not in result.stderr
