"""``magicanimate densepose`` and ``magicanimate animate --driving`` through the real command line.

They need the subcommand and flag wired into magicanimate/cli.py; until then they skip saying so.
"""

import argparse
import os
import subprocess
import sys

import av
import pytest
from PIL import Image
from test_densepose import save_stand_in, scene, walking_video

from magicanimate.cli import build_parser


def _wired() -> tuple[bool, bool]:
    """Whether cli.py registers ``densepose`` and ``animate --driving``."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    animate_flags = {flag for action in commands["animate"]._actions for flag in action.option_strings}
    return "densepose" in commands, "--driving" in animate_flags


DENSEPOSE_WIRED, DRIVING_WIRED = _wired()


def run_cli(*args, env=None):
    # One thread: the tiny models gain nothing from more, and lose a lot on a loaded CI runner.
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "magicanimate.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    return save_stand_in(tmp_path_factory.mktemp("densepose-cli-model") / "stand_in.torchscript")


@pytest.mark.skipif(not DENSEPOSE_WIRED, reason="`densepose` is not wired into magicanimate/cli.py yet")
def test_densepose_command_end_to_end(stand_in, tmp_path):
    video = walking_video(tmp_path / "walk.mp4", frames=60, fps=30.0)
    out = tmp_path / "motion.mp4"
    result = run_cli("densepose", video, "-o", out, "--model", stand_in, "--size", 64, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert sum(1 for _ in container.decode(stream)) == 50

    gif = run_cli("densepose", video, "-o", tmp_path / "m.gif", "--model", stand_in)
    assert gif.returncode == 2 and gif.stderr.strip().startswith("error:") and len(gif.stderr.splitlines()) == 1
    empty_cache = {"HF_HUB_CACHE": str(tmp_path / "empty-cache"), "MAGICANIMATE_DENSEPOSE_MODEL": ""}
    missing = run_cli("densepose", video, "-o", out, env=empty_cache)
    assert missing.returncode == 3 and "--model" in missing.stderr and len(missing.stderr.splitlines()) == 1


@pytest.mark.skipif(not DRIVING_WIRED, reason="`animate --driving` is not wired into magicanimate/cli.py yet")
def test_animate_from_a_raw_driving_video(stand_in, tiny_tree, tmp_path):
    video = walking_video(tmp_path / "walk.mp4", frames=30, fps=30.0)
    reference = tmp_path / "reference.png"
    Image.fromarray(scene(width=64, height=64, red=(20, 10, 44, 60))).save(reference)
    out = tmp_path / "animation.mp4"
    result = run_cli(
        "animate", "--reference", reference, "--driving", video, "--densepose-model", stand_in,
        "--align-to-reference", "-o", out, "--pretrained", tiny_tree, "--steps", 1, "--size", 64,
        "--max-frames", 16, "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and float(stream.average_rate) == pytest.approx(25.0)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(frames) == 16 and frames[0].shape == (64, 64, 3)
