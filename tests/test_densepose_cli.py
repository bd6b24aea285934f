"""``magicanimate densepose`` and ``magicanimate animate --driving`` through the real command line."""

import os
import socket
import subprocess
import sys
import time

import av
import pytest
from PIL import Image
from test_densepose import save_stand_in, scene, walking_video

from magicanimate.densepose.extractor import HUB_FILE, HUB_REPO, MODEL_ENV


def run_cli(*args, env=None):
    # One thread: the tiny models gain nothing from more, and lose a lot on a loaded CI runner.
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "magicanimate.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    return save_stand_in(tmp_path_factory.mktemp("densepose-cli-model") / "stand_in.torchscript")


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
    missing = run_cli("densepose", video, "-o", tmp_path / "other.mp4", env=empty_cache)
    assert missing.returncode == 3 and "--model" in missing.stderr and len(missing.stderr.splitlines()) == 1


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


def closed_port() -> int:
    """A local port nobody listens on: connecting to it fails at once, as with no network."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("network", ["offline mode", "no network"])
def test_no_model_and_no_hub_fails_at_once_in_one_line(tmp_path, network):
    """Without --model, offline (HF_HUB_OFFLINE) or with the hub unreachable, the command fails within seconds
    (huggingface_hub alone retries for ~24 s, logging each try) with one whole line saying what to do."""
    video = walking_video(tmp_path / "walk.mp4", frames=5)
    env = {"HF_HUB_CACHE": str(tmp_path / "empty-cache"), MODEL_ENV: ""}
    if network == "no network":
        env.update(HF_HUB_OFFLINE="", HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    start = time.monotonic()
    result = run_cli("densepose", video, "-o", tmp_path / "motion.mp4", env=env)
    assert time.monotonic() - start < 15
    assert result.returncode == 3, result.stderr
    (line,) = result.stderr.splitlines()  # no "Retrying in 1s" or HTTP lines before it
    assert line.startswith("error: no DensePose model given and ")
    assert HUB_FILE in line and HUB_REPO in line and "--model PATH" in line and line.endswith(f"${MODEL_ENV})")
    assert not (tmp_path / "motion.mp4").exists()


def test_long_hub_errors_are_cut_at_a_word_boundary():
    from magicanimate.densepose.extractor import _reason

    words = ["An", "error", "happened", "while", "trying", "to", "locate", "the", "file", "on", "the", "Hub"] * 4
    reason = _reason(OSError(" ".join(words) + "\nsecond line"), limit=60)
    assert len(reason) <= 60 and reason.endswith(" ...") and "second" not in reason
    assert reason.removesuffix(" ...").split() == ["OSError:", *words[: len(reason.split()) - 2]]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--size", "0"], "--size must be an integer from 8 to 4096, got 0"),
        (["--size", "64.5"], "--size must be an integer from 8 to 4096, got 64.5"),
        (["--size", "1e9"], "--size must be an integer from 8 to 4096, got 1e+09"),
        (["--size", "big"], "--size must be an integer from 8 to 4096, got 'big'"),
        (["--fps", "nan"], "--fps must be a number from 0 to 1000, got nan"),
        (["--fps", "-25"], "--fps must be a number from 0 to 1000, got -25"),
        (["--smooth", "0"], "--smooth must be an integer from 1 to 255, got 0"),
        (["--crf", "99"], "--crf must be an integer from 0 to 51, got 99"),
        (["--max-frames", "-1"], "--max-frames must be an integer from 1 to 10000000, got -1"),
        (["--device", "gpu"], "--device must be one of auto, cpu, cuda, mps, got 'gpu'"),
        (
            ["--reference-box", "0,0,nan,5"],
            "--reference-box must be X0,Y0,X1,Y1 with X1 > X0 and Y1 > Y0, got '0,0,nan,5'",
        ),
        (["--reference-box", "1,2,3"], "--reference-box must be X0,Y0,X1,Y1 with X1 > X0 and Y1 > Y0, got '1,2,3'"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, flags, message):
    video = walking_video(tmp_path / "walk.mp4", frames=5)
    result = run_cli("densepose", video, "-o", tmp_path / "motion.mp4", "--model", tmp_path / "unused", *flags)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"error: {message}"], result.stderr


def test_outputs_that_would_lose_data_are_refused(tmp_path):
    video = walking_video(tmp_path / "walk.mp4", frames=5)
    before = video.read_bytes()
    folder = tmp_path / "folder.mp4"
    folder.mkdir()
    model = tmp_path / "model.torchscript"  # never loaded: the output is refused first
    model.write_bytes(b"stand-in")
    cases = [
        (video, "is one of the inputs"),
        (tmp_path / "." / "walk.mp4", "is one of the inputs"),  # the same file, spelled differently
        (folder, "is a folder"),
        (tmp_path / "walk.mp4" / "motion.mp4", "which is a file, not a folder"),
    ]
    for output, message in cases:
        result = run_cli("densepose", video, "-o", output, "--model", model, "--overwrite")
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith("error: ") and message in line, line
    assert video.read_bytes() == before and list(folder.iterdir()) == []
