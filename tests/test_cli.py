"""End to end through the ``magicanimate`` command, as a user runs it, on the tiny tree built in code (conftest's
``tiny_tree``) with a reference photo and a DensePose video written here: nothing from ../shared is needed."""

import os
import subprocess
import sys

import av
import numpy as np
import pytest
from PIL import Image
from tiny_models import make_motion, make_reference

from magicanimate.io import write_video


def run_cli(*args, env=None, cwd=None):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "magicanimate.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=environment, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """``(reference.png, motion.mp4 of 20 frames at 25 fps, motion24.mp4 of 24 frames)``, 64x64."""
    folder = tmp_path_factory.mktemp("cli-inputs")
    Image.fromarray(make_reference(64)).save(folder / "reference.png")
    write_video(folder / "motion.mp4", make_motion(20, 64), fps=25)
    write_video(folder / "motion24.mp4", make_motion(24, 64, seed=1), fps=25)
    return folder / "reference.png", folder / "motion.mp4", folder / "motion24.mp4"


def _decoded(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        info = (stream.codec_context.name, stream.codec_context.pix_fmt, float(stream.average_rate))
        return info, [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]


def test_animate_writes_playable_h264_with_every_motion_frame(tiny_tree, inputs, tmp_path):
    reference, motion, _ = inputs
    out = tmp_path / "nested" / "out.mp4"
    result = run_cli(
        "animate", "--reference", reference, "--motion", motion, "-o", out, "--pretrained", tiny_tree,
        "--steps", 1, "--size", 64, "--seed", 3,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (codec, pix_fmt, fps), frames = _decoded(out)
    assert (codec, pix_fmt) == ("h264", "yuv420p")
    assert fps == pytest.approx(25.0)
    assert len(frames) == 20  # padded to 32 (two 16-frame windows), cropped back
    assert frames[0].shape == (64, 64, 3)
    assert len(list(tmp_path.glob("nested/.*"))) == 0  # no temporary leftovers


def test_grid_and_settings_flags(tiny_tree, inputs, tmp_path):
    reference, _, motion = inputs
    out = tmp_path / "grid.mp4"
    result = run_cli(
        "animate", "--reference", reference, "--motion", motion, "-o", out, "--pretrained", tiny_tree,
        "--steps", 1, "--grid", "--context-overlap", 8, "--size", 64, "--context-schedule", "sliding", "--fps", 12.5,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (_, _, fps), frames = _decoded(out)
    assert frames[0].shape == (64, 3 * 64, 3)
    assert fps == pytest.approx(12.5)
    assert len(frames) == 24


def test_missing_weights_offline_is_one_line(inputs, tmp_path):
    reference, _, _ = inputs
    motion = tmp_path / "motion.mp4"
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
    assert "offline mode is set" in lines[0] and "while online" not in lines[0], lines[0]
    assert "pretrained/README.md" not in lines[0], lines[0]
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
    Image.new("RGB", (8, 8)).save(reference)
    result = run_cli(
        "animate", "--reference", reference, "--motion", reference, "-o", tmp_path / "o.mp4", "--config", config
    )
    assert result.returncode == 2
    assert "stepz" in result.stderr and "Traceback" not in result.stderr
