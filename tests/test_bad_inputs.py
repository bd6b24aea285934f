"""A corpus of bad inputs, generated here, each run through the real command line.

Every case asserts the exit code (2 input/usage, 3 checkpoints, 4 resources), that stderr is exactly one
``error: ...`` line without a traceback, and that no output (nor a hidden partial file) is left behind. Cases that
fail before any model loads take well under a second (they are given a checkpoint folder that does not exist, so a
check that came after loading would end in exit 3 instead, and each must finish within :data:`BEFORE_LOADING`
seconds); the checkpoint cases copy the tiny tree and break one file.
"""

import errno
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from test_io import LFS_POINTER, permission_bits_apply, read_only_folder, resizing_video, small_disk
from tiny_models import make_motion, make_reference

from magicanimate.io import load_image, write_video

CKPT = Path("MagicAnimate/temporal_attention/temporal_attention.ckpt")
VAE_WEIGHTS = Path("sd-vae-ft-mse/diffusion_pytorch_model.safetensors")
FAST = ["--steps", "1", "--size", "64", "--device", "cpu", "--dtype", "float32", "--context-frames", "8"]
# A run refused before any model loads takes about a second (Python, the CLI's imports, reading the inputs); one that
# loads even the tiny models takes longer on a busy machine, and one that loads the real ones far longer.
BEFORE_LOADING = 20.0


def run_cli(*args, preexec_fn=None):
    """The real command line in a subprocess; ``result.seconds`` is how long it took."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "magicanimate", *map(str, args)]
    start = time.monotonic()
    result = subprocess.run(
        command, capture_output=True, text=True, env=environment, timeout=300, preexec_fn=preexec_fn
    )
    result.seconds = time.monotonic() - start
    return result


PROGRESS_LINES = ("animating ", "loading the models from ", "models loaded in ")


def assert_one_error_line(result, exit_code: int, *fragments: str, progress: bool = False):
    """Exit code, one ``error:`` line (the only line of stderr, or with ``progress`` the last one after the run's
    progress output), no traceback, and every fragment in that line."""
    # The plan and model-loading lines (the library's progress, told before long work) may precede the error.
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith(PROGRESS_LINES)]
    assert result.returncode == exit_code, result.stderr
    if progress:
        assert lines and lines[-1].startswith("error: "), result.stderr
        assert sum(line.startswith("error: ") for line in lines) == 1, result.stderr
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_before_loading(result):
    assert result.seconds < BEFORE_LOADING, f"took {result.seconds:.1f} s: refused only after loading models?"


def assert_nothing_written(output: Path):
    assert not output.exists(), f"{output} was written"
    assert_no_partials(output.parent)


def assert_no_partials(folder: Path):
    leftovers = [p.name for p in folder.glob(".*")] if folder.is_dir() else []
    assert not leftovers, f"temporary files were left behind in {folder}: {leftovers}"


# ------------------------------------------------------------------------------------------------ inputs


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    """Valid files the cases break one at a time: a reference photo and an 8-frame DensePose-like motion video."""
    root = tmp_path_factory.mktemp("good")
    Image.fromarray(make_reference(64)).save(root / "reference.png")
    write_video(root / "motion.mp4", make_motion(8, 64), fps=25)
    return {"reference": root / "reference.png", "motion": root / "motion.mp4"}


def _png_bytes(size=64) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(make_reference(size)).save(buffer, format="PNG")
    return buffer.getvalue()


def _audio_only(path: Path) -> Path:
    """An mp4 holding one second of AAC audio and no video stream, written with PyAV."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=44100)
        stream.layout = "mono"
        samples = (0.2 * np.sin(np.arange(44100) * 2 * np.pi * 440 / 44100)).astype(np.float32)[None]
        for start in range(0, 44100, 1024):
            frame = av.AudioFrame.from_ndarray(samples[:, start : start + 1024].copy(), format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 44100, start, Fraction(1, 44100)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def _no_frames(path: Path) -> Path:
    """An mp4 with a video stream but not one frame in it."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
    return path


def _photo_video(path: Path) -> Path:
    """An ordinary (non-DensePose) video: a drifting photo."""
    photo = make_reference(64, seed=3)
    write_video(path, np.stack([np.roll(photo, shift, axis=1) for shift in range(8)]), fps=25)
    return path


# Each case: (id, what it breaks, exit code, fragments of the message). `break_` returns the changed CLI arguments.
def _image(make):
    def break_(tmp, good):
        path = make(tmp)
        return {"--reference": path}

    return break_


def _video(make):
    def break_(tmp, good):
        return {"--motion": make(tmp) if make.__code__.co_argcount == 1 else make(tmp, good)}

    return break_


def _write(name: str, data: bytes):
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name

    return make


def _tiny_image(tmp: Path) -> Path:
    Image.new("RGB", (4, 4), (200, 10, 10)).save(tmp / "tiny.png")
    return tmp / "tiny.png"


def _folder_named(name: str):
    def make(tmp: Path) -> Path:
        return _mkdir(tmp / name)

    return make


def _resizing_motion(tmp: Path) -> Path:
    """A DensePose-like motion whose frames become smaller after frame 4 (two clips joined in MPEG-TS)."""
    return resizing_video(tmp / "joined.ts", make_motion(4, 64), make_motion(4, 48, seed=1))


INPUT_CASES = [
    ("image-is-text", _image(_write("reference.png", b"this is not an image\n")), 2, ["cannot read image"]),
    ("image-zero-bytes", _image(_write("reference.png", b"")), 2, ["is empty (0 bytes)", "reference.png"]),
    ("image-is-folder", _image(_folder_named("reference.png")), 2, ["is a folder", "reference.png"]),
    ("image-lfs-pointer", _image(_write("reference.png", LFS_POINTER)), 2, ["Git LFS pointer", "git lfs pull"]),
    ("image-truncated", _image(lambda tmp: _write("reference.png", _png_bytes()[:300])(tmp)), 2, ["cannot read"]),
    ("image-4x4", _image(_tiny_image), 2, ["too small", "4x4"]),
    ("image-missing", lambda tmp, good: {"--reference": tmp / "nope.png"}, 2, ["not found", "nope.png"]),
    ("video-is-text", _video(_write("motion.mp4", b"not a video at all\n" * 10)), 2, ["cannot read video"]),
    ("video-zero-bytes", _video(_write("motion.mp4", b"")), 2, ["is empty (0 bytes)", "motion.mp4"]),
    ("video-is-folder", _video(_folder_named("motion.mp4")), 2, ["is a folder", "motion.mp4"]),
    ("video-lfs-pointer", _video(_write("motion.mp4", LFS_POINTER)), 2, ["Git LFS pointer", "motion.mp4"]),
    (
        "video-size-changes-mid-stream",
        _video(_resizing_motion),
        2,
        ["joined.ts", "changes mid-stream", "frame 4 is 48x48", "frame 0 is 64x64"],
    ),
    (
        "video-truncated",
        _video(lambda tmp, good: _write("motion.mp4", good["motion"].read_bytes()[:200])(tmp)),
        2,
        ["motion.mp4"],
    ),
    ("video-audio-only", _video(lambda tmp: _audio_only(tmp / "song.mp4")), 2, ["no video stream"]),
    ("video-no-frames", _video(lambda tmp: _no_frames(tmp / "empty.mp4")), 2, ["empty.mp4"]),
    ("video-not-densepose", _video(lambda tmp: _photo_video(tmp / "dance.mp4")), 2, ["--driving", "dance.mp4"]),
    ("setting-unknown", lambda tmp, good: {"--config": _yaml(tmp, "stepz: 3\n")}, 2, ["stepz"]),
    ("setting-wrong-type", lambda tmp, good: {"--config": _yaml(tmp, "guidance_scale: lots\n")}, 2, ["guidance_scale"]),
    (
        "config-malformed",
        lambda tmp, good: {"--config": _yaml(tmp, "steps: 3\nseed: 1\nguidance_scale: 7.5: 2\n")},
        2,
        ["settings.yaml", "line 3"],
    ),
    ("config-a-list", lambda tmp, good: {"--config": _yaml(tmp, "- steps\n- 3\n")}, 2, ["settings.yaml", "mapping"]),
    ("config-a-string", lambda tmp, good: {"--config": _yaml(tmp, "steps 3\n")}, 2, ["settings.yaml", "mapping"]),
    ("overlap-too-big", lambda tmp, good: {"--context-overlap": 8}, 2, ["context_overlap"]),
    ("dtype-bad", lambda tmp, good: {"--dtype": "float8"}, 2, ["float8"]),
    ("steps-zero", lambda tmp, good: {"--steps": 0}, 2, ["steps"]),
    ("output-bad-suffix", lambda tmp, good: {"-o": tmp / "out.avi"}, 2, ["out.avi"]),
    ("pretrained-empty", lambda tmp, good: {"--pretrained": _mkdir(tmp / "weights")}, 3, ["missing", "expected"]),
]


def _yaml(tmp: Path, text: str) -> Path:
    (tmp / "settings.yaml").write_text(text)
    return tmp / "settings.yaml"


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _arguments(changes: dict, good: dict, output: Path, pretrained, without: tuple[str, ...] = ()) -> list:
    """The ``animate`` command line: the good inputs with ``changes``, and the FAST flags that are not changed or
    named in ``without`` (a flag would win over the same key in a --config file)."""
    values = {"--reference": good["reference"], "--motion": good["motion"], "-o": output, "--pretrained": pretrained}
    values.update(changes)
    arguments = ["animate"]
    for flag, value in values.items():
        arguments += [flag, value]
    fast = dict(zip(FAST[::2], FAST[1::2], strict=True))
    for flag, value in fast.items():
        if flag not in changes and flag not in without:
            arguments += [flag, value]
    return arguments


@pytest.mark.parametrize("case", INPUT_CASES, ids=[case[0] for case in INPUT_CASES])
def test_bad_input_is_one_line(case, good, tmp_path):
    """Everything here fails before a model loads (no checkpoint tree needed at all)."""
    _, break_, exit_code, fragments = case
    output = tmp_path / "out" / "animation.mp4"
    changes = break_(tmp_path, good)
    output = Path(changes.get("-o", output))
    result = run_cli(*_arguments(changes, good, output, tmp_path / "no-weights-needed"))
    assert_one_error_line(result, exit_code, *fragments)
    assert_before_loading(result)
    assert_nothing_written(output)


def test_existing_output_is_kept_without_overwrite(good, tmp_path):
    output = tmp_path / "animation.mp4"
    output.write_bytes(b"an earlier result")
    result = run_cli(*_arguments({}, good, output, tmp_path / "weights"))
    assert_one_error_line(result, 2, "already exists", "--overwrite", "animation.mp4")
    assert output.read_bytes() == b"an earlier result"

    densepose_out = tmp_path / "motion.mp4"
    densepose_out.write_bytes(b"keep me")
    model = tmp_path / "model.torchscript"  # never loaded: the existing output is refused first
    model.write_bytes(b"stand-in")
    result = run_cli("densepose", good["motion"], "-o", densepose_out, "--model", model)
    assert_one_error_line(result, 2, "already exists", "--overwrite")
    assert densepose_out.read_bytes() == b"keep me"


def test_overwrite_flag_reaches_the_models(good, tmp_path):
    """With --overwrite the existing-output check passes: the run goes on to the (here missing) checkpoints."""
    output = tmp_path / "animation.mp4"
    output.write_bytes(b"an earlier result")
    result = run_cli(*_arguments({}, good, output, _mkdir(tmp_path / "weights")), "--overwrite")
    assert_one_error_line(result, 3, "missing")
    assert output.read_bytes() == b"an earlier result"  # a failed run never clobbers the earlier output


# ------------------------------------------------------------------------------------------------ numeric settings

BIG = str(2**64)  # one past the largest 64-bit unsigned integer
BAD_NUMBERS = {
    "fps": ["nan", "inf", "0", "-5", BIG],
    "steps": ["nan", "inf", "0", "-1", "2.5", BIG],
    "seed": ["nan", "inf", "-1", "1.5", BIG],
    "decode_chunk_size": ["nan", "inf", "0", "-1", "2.5", BIG],
    "context_batch_size": ["nan", "inf", "0", "-1", "2.5", BIG],
    "guidance_scale": ["nan", "inf", "-1", BIG],
    "eta": ["nan", "inf", "-1", BIG],
}
YAML_SPELLING = {"nan": ".nan", "inf": ".inf"}  # YAML's float literals; a bare `nan` would be a string
SETTING_CASES = [
    (key, value, source) for key, values in BAD_NUMBERS.items() for value in values for source in ("flag", "config")
]


@pytest.fixture(scope="module")
def setting_runs(good, tmp_path_factory) -> dict:
    """Every bad number, as a flag and in a --config file, run a few at a time (each is a fresh Python process)."""

    def run(case):
        key, value, source = case
        folder = tmp_path_factory.mktemp(f"{key}-{source}")
        output = folder / "out.mp4"
        flag = "--" + key.replace("_", "-")
        if source == "flag":
            changes = {flag: value}
        else:
            changes = {"--config": _yaml(folder, f"{key}: {YAML_SPELLING.get(value, value)}\n")}
        return run_cli(*_arguments(changes, good, output, folder / "no-weights-needed", without=(flag,))), output

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(SETTING_CASES, pool.map(run, SETTING_CASES), strict=True))


@pytest.mark.parametrize("case", SETTING_CASES, ids=[f"{key}={value}-{source}" for key, value, source in SETTING_CASES])
def test_bad_number_is_a_setting_error(case, setting_runs, good):
    """nan, inf, 0, negative, fractional where an integer is meant and beyond 64 bits: one line naming the setting
    and the value, before anything loads, and never blamed on an input file."""
    key, value, _ = case
    result, output = setting_runs[case]
    line = assert_one_error_line(result, 2, value)
    assert key in line or "--" + key.replace("_", "-") in line, line
    assert good["motion"].name not in line and good["reference"].name not in line, line
    assert_before_loading(result)
    assert_nothing_written(output)


def test_negative_fps_is_blamed_on_the_setting_not_the_video(good, tmp_path):
    output = tmp_path / "out.mp4"
    result = run_cli(*_arguments({"--fps": "-5"}, good, output, tmp_path / "no-weights-needed"))
    line = assert_one_error_line(result, 2, "fps", "-5")
    assert "setting" in line or "--fps" in line, line
    assert "motion.mp4" not in line and "video" not in line.lower(), line
    assert_before_loading(result)
    assert_nothing_written(output)


def test_bogus_fusion_blocks_is_refused_before_loading(good, tiny_tree, tmp_path):
    """A setting error (exit 2) at once, even with a complete checkpoint tree to load, not a checkpoint error."""
    output = tmp_path / "out.mp4"
    result = run_cli(*_arguments({"--fusion-blocks": "bogus"}, good, output, tiny_tree))
    line = assert_one_error_line(result, 2, "bogus")
    assert "fusion_blocks" in line or "--fusion-blocks" in line, line
    assert_before_loading(result)
    assert_nothing_written(output)


def test_cuda_without_cuda_is_one_line_before_loading(good, tiny_tree, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: --device cuda is a valid choice")
    output = tmp_path / "out.mp4"
    result = run_cli(*_arguments({"--device": "cuda"}, good, output, tiny_tree))
    line = assert_one_error_line(result, 2)
    assert "cuda" in line.lower() and "device" in line, line
    assert_before_loading(result)
    assert_nothing_written(output)


# ------------------------------------------------------------------------------------------------ outputs


@pytest.mark.parametrize("spelling", ["same-path", "same-path-overwrite", "symlink-overwrite"])
def test_output_that_is_the_motion_is_refused(good, tmp_path, spelling):
    """``-o`` naming the motion video (itself, or through a link) is refused even with --overwrite."""
    motion = tmp_path / "motion.mp4"
    shutil.copy(good["motion"], motion)
    original = motion.read_bytes()
    output = motion
    if spelling.startswith("symlink"):
        output = tmp_path / "alias.mp4"
        output.symlink_to(motion)
    extra = ["--overwrite"] if spelling.endswith("overwrite") else []
    result = run_cli(*_arguments({"--motion": motion}, good, output, tmp_path / "no-weights-needed"), *extra)
    assert_one_error_line(result, 2, "input", output.name)
    assert_before_loading(result)
    assert motion.read_bytes() == original, "the motion video was changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"motion.mp4", output.name})
    assert_no_partials(tmp_path)


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_output_that_is_a_folder_is_refused(good, tmp_path, overwrite):
    output = _mkdir(tmp_path / "result.mp4")
    (output / "keep.txt").write_text("keep me")
    extra = ["--overwrite"] if overwrite else []
    result = run_cli(*_arguments({}, good, output, tmp_path / "no-weights-needed"), *extra)
    assert_one_error_line(result, 2, "folder", "result.mp4")
    assert_before_loading(result)
    assert [p.name for p in output.iterdir()] == ["keep.txt"] and (output / "keep.txt").read_text() == "keep me"
    assert_no_partials(tmp_path)


def test_output_under_a_file_is_refused(good, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("a file, not a folder")
    output = notes / "out.mp4"
    result = run_cli(*_arguments({}, good, output, tmp_path / "no-weights-needed"))
    assert_one_error_line(result, 2, "notes.txt", "file")
    assert_before_loading(result)
    assert notes.read_text() == "a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("how", ["read-only-mount", "no-permission"])
def test_output_on_a_read_only_location_is_refused(good, tmp_path, how):
    """Permission bits do not stop root, so ``no-permission`` runs the CLI without root's override (as a normal
    user it just is one); ``read-only-mount`` stops root too."""
    if how == "no-permission":
        preexec = permission_bits_apply(tmp_path)
        folder = _mkdir(tmp_path / "locked")
        folder.chmod(0o555)
        output = folder / "out.mp4"
        result = run_cli(*_arguments({}, good, output, tmp_path / "no-weights-needed"), preexec_fn=preexec)
    else:
        with read_only_folder(tmp_path / "locked") as folder:
            output = folder / "out.mp4"
            result = run_cli(*_arguments({}, good, output, tmp_path / "no-weights-needed"))
    assert_one_error_line(result, 2, "cannot write", "locked")
    assert_before_loading(result)
    assert_nothing_written(output)


@pytest.mark.parametrize("which", ["--reference", "--motion"])
def test_unreadable_input_is_reported_as_such_not_as_corrupt(good, tmp_path, which):
    preexec = permission_bits_apply(tmp_path)
    source = good["reference"] if which == "--reference" else good["motion"]
    unreadable = tmp_path / source.name
    shutil.copy(source, unreadable)
    unreadable.chmod(0)
    output = tmp_path / "out" / "animation.mp4"
    result = run_cli(*_arguments({which: unreadable}, good, output, tmp_path / "no-weights"), preexec_fn=preexec)
    line = assert_one_error_line(result, 2, "permission denied", source.name)
    assert "corrupt" not in line and "cannot read image" not in line and "cannot read video" not in line, line
    assert_before_loading(result)
    assert_nothing_written(output)


def _fill(disk: Path) -> None:
    """Write zeros into ``disk`` until it is full."""
    descriptor = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(descriptor, bytes(65536))
    except OSError as err:
        assert err.errno == errno.ENOSPC, err
    finally:
        os.close(descriptor)


def test_full_disk_is_exit_4_and_leaves_nothing(good, tiny_tree, tmp_path):
    """A real run of the tiny models whose output lands on a full (tmpfs) disk (the GIF and PNG writers are tested
    on a full disk in test_io.py)."""
    with small_disk(tmp_path / "disk") as disk:
        _fill(disk)
        output = disk / "animation.mp4"
        result = run_cli(*_arguments({}, good, output, tiny_tree))
        assert_one_error_line(result, 4, "disk is full", "animation.mp4", progress=True)
        assert_nothing_written(output)
        assert [p.name for p in disk.iterdir()] == ["filler"]


# ------------------------------------------------------------------------------------------------ checkpoints


class _RunsCode:
    """Unpickling this creates a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _remove_vae(tree: Path, tmp: Path) -> None:
    shutil.rmtree(tree / "sd-vae-ft-mse")


def _garbage_safetensors(tree: Path, tmp: Path) -> None:
    (tree / VAE_WEIGHTS).write_bytes(os.urandom(4096))


def _truncate_ckpt(tree: Path, tmp: Path) -> None:
    data = (tree / CKPT).read_bytes()
    (tree / CKPT).write_bytes(data[: len(data) // 2])


def _code_pickle(tree: Path, tmp: Path) -> None:
    state = torch.load(tree / CKPT, weights_only=True)
    state["evil"] = _RunsCode(tmp / "code-ran")
    torch.save(state, tree / CKPT)


def _wrong_shape(tree: Path, tmp: Path) -> None:
    state = torch.load(tree / CKPT, weights_only=True)
    state["conv_in.weight"] = torch.zeros(state["conv_in.weight"].shape[0] + 1, *state["conv_in.weight"].shape[1:])
    torch.save(state, tree / CKPT)


CHECKPOINT_CASES = [
    ("tree-missing-vae", _remove_vae, ["missing", "sd-vae-ft-mse", "expected"]),
    ("safetensors-garbage", _garbage_safetensors, ["sd-vae-ft-mse"]),
    ("ckpt-truncated", _truncate_ckpt, ["temporal_attention.ckpt"]),
    ("ckpt-runs-code", _code_pickle, ["would run code", "magicanimate convert"]),
    ("ckpt-wrong-shape", _wrong_shape, ["conv_in.weight", "(33, 4, 3, 3)", "(32, 4, 3, 3)"]),
]


@pytest.fixture(scope="module")
def checkpoint_runs(good, tiny_tree, tmp_path_factory) -> dict:
    """Each broken tree's CLI run, started together (each spends seconds importing torch and loading models)."""
    runs = {}
    for name, break_, _ in CHECKPOINT_CASES:
        folder = tmp_path_factory.mktemp(name)
        tree = folder / "pretrained"
        shutil.copytree(tiny_tree, tree)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            break_(tree, folder)
        output = folder / "out.mp4"
        command = [sys.executable, "-m", "magicanimate", *map(str, _arguments({}, good, output, tree))]
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
        runs[name] = (process, folder, output)
    results = {}
    for name, (process, folder, output) in runs.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = (subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), folder, output)
    return results


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=[case[0] for case in CHECKPOINT_CASES])
def test_broken_checkpoint_is_one_line(case, checkpoint_runs):
    name, _, fragments = case
    result, folder, output = checkpoint_runs[name]
    assert_one_error_line(result, 3, *fragments)
    assert_nothing_written(output)
    assert not (folder / "code-ran").exists(), "a checkpoint ran code while loading"


# ------------------------------------------------------------------------------------------------ API


def test_transparent_reference_is_a_warning_not_an_error(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[4:12, 4:12, 3] = 255, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    with pytest.warns(UserWarning, match="transparency"):
        image = load_image(tmp_path / "cutout.png")
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)


def test_huge_reference_is_downscaled_with_a_warning():
    with pytest.warns(UserWarning, match="downscaling"):
        image = load_image(np.zeros((10, 5000, 3), np.uint8))
    assert image.size == (4096, 8)


def test_every_troubleshooting_message_is_in_the_code():
    """The README's table quotes the messages; each quoted fragment must still be in the source."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    table = readme.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[2] for line in table.splitlines() if line.startswith("| ") and "`" in line.split("|")[2]]
    fragments = [part for row in rows for part in re.findall(r"`([^`]+)`", row)]
    source = "\n".join(path.read_text() for path in (root / "magicanimate").rglob("*.py"))
    assert len(fragments) >= 20
    missing = [fragment for fragment in fragments if fragment not in source]
    assert not missing, f"README troubleshooting quotes messages the code no longer has: {missing}"
