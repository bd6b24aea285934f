"""Tests of magicanimate.io: image loading and PyAV video reading/writing."""

import ctypes
import io
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from magicanimate.errors import InputError, ResourceError
from magicanimate.io import (
    VideoWriter,
    has_audio,
    iter_frames,
    load_image,
    open_video,
    probe_fps,
    read_video,
    write_gif,
    write_png_frames,
    write_video,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURE_INPUTS = SHARED / "fixtures" / "reference-parity" / "inputs"
SAMPLE_VIDEO = SHARED / "samples" / "densepose" / "running.mp4"


def smooth_clip(frames=10, height=48, width=64):
    """Gradients that move over time: smooth content that H.264 at crf 18 reproduces closely."""
    t = np.arange(frames)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    channels = [(x * 4 + t * 8) % 256, y * 5 % 256, (x + y + t * 4) % 256]
    return np.stack([np.broadcast_to(c, (frames, height, width)) for c in channels], -1).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------- video


@pytest.mark.parametrize("fps", [25.0, 29.97])
def test_round_trip(tmp_path, fps):
    clip = smooth_clip()
    path = write_video(tmp_path / "clip.mp4", clip, fps=fps)
    frames, read_fps = read_video(path)
    assert frames.shape == clip.shape and frames.dtype == np.uint8
    assert abs(read_fps - fps) < 1e-3
    assert abs(probe_fps(path) - fps) < 1e-3
    assert np.abs(frames.astype(int) - clip).mean() < 3
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_float_frames_and_max_frames(tmp_path):
    clip = smooth_clip(frames=5)
    path = write_video(tmp_path / "nested" / "dir" / "clip.mp4", (frame / 255.0 for frame in clip))
    frames, _ = read_video(path, max_frames=3)
    assert frames.shape == (3, 48, 64, 3)
    assert np.abs(frames.astype(int) - clip[:3]).mean() < 3


def test_odd_size_is_padded_to_even(tmp_path):
    clip = smooth_clip(frames=4, height=21, width=33)
    frames, _ = read_video(write_video(tmp_path / "odd.mp4", clip))
    assert frames.shape == (4, 22, 34, 3)
    assert np.abs(frames[:, :21, :33].astype(int) - clip).mean() < 3


def test_failure_inside_writer_leaves_nothing(tmp_path):
    target = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(target) as writer:
            writer.write(smooth_clip(frames=1)[0])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    target.write_bytes(b"previous result")
    with pytest.raises(RuntimeError):
        with VideoWriter(target) as writer:
            writer.write(smooth_clip(frames=1)[0])
            raise RuntimeError("boom")
    assert target.read_bytes() == b"previous result"
    assert list(tmp_path.iterdir()) == [target]


def test_zero_frames_raises_and_leaves_nothing(tmp_path):
    with pytest.raises(InputError, match="no frames"):
        write_video(tmp_path / "empty.mp4", [])
    assert list(tmp_path.iterdir()) == []


def test_bad_frames_are_rejected(tmp_path):
    with pytest.raises(InputError, match="shape"):
        write_video(tmp_path / "bad.mp4", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(InputError, match="unlike the first frame"):
        write_video(tmp_path / "bad.mp4", [np.zeros((8, 8, 3), np.uint8), np.zeros((16, 8, 3), np.uint8)])
    assert list(tmp_path.iterdir()) == []


def test_read_missing_and_non_video(tmp_path):
    with pytest.raises(InputError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4")
    text = tmp_path / "x.mp4"
    text.write_text("this is not a video\n" * 20)
    with pytest.raises(InputError, match="x.mp4"):
        read_video(text)


def test_read_truncated_returns_decodable_frames(tmp_path):
    # Documented behaviour: a damaged file yields the frames that still decode; only zero frames raise InputError.
    data = write_video(tmp_path / "full.mp4", smooth_clip(frames=30)).read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) * 9 // 10])
    frames, fps = read_video(truncated)
    assert 0 < len(frames) < 30 and frames.shape[1:] == (48, 64, 3) and fps == 25.0
    truncated.write_bytes(data[:200])
    with pytest.raises(InputError, match="truncated.mp4"):
        read_video(truncated)


@pytest.mark.skipif(not (FIXTURE_INPUTS / "motion.mp4").exists(), reason=f"fixture clip not found in {FIXTURE_INPUTS}")
def test_fixture_clip_is_lossless():
    frames, fps = read_video(FIXTURE_INPUTS / "motion.mp4")
    np.testing.assert_array_equal(frames, np.load(FIXTURE_INPUTS / "motion.npy"))
    assert fps == 25.0


@pytest.mark.skipif(not SAMPLE_VIDEO.exists(), reason=f"sample video not found at {SAMPLE_VIDEO}")
def test_sample_video():
    frames, fps = read_video(SAMPLE_VIDEO)
    assert frames.shape == (42, 512, 512, 3)
    assert fps == 25.0


def test_gif_and_png_frames(tmp_path):
    clip = smooth_clip(frames=3)
    gif = write_gif(tmp_path / "clip.gif", clip, fps=10)
    with Image.open(gif) as image:
        assert image.n_frames == 3 and image.size == (64, 48)
    paths = write_png_frames(tmp_path / "frames", clip)
    assert [p.name for p in paths] == ["00000.png", "00001.png", "00002.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(paths[1])), clip[1])


# ----------------------------------------------------------------------------------------------------- image


def test_rgba_composited_over_white_with_warning(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, ..., 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    with pytest.warns(UserWarning, match="white"):
        image = load_image(tmp_path / "a.png")
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert (pixels[:2] == [200, 0, 0]).all() and (pixels[2:] == 255).all()


def test_palette_with_transparency_warns(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.paste(0, (0, 2, 4, 4))  # bottom half uses the transparent index 0
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.save(tmp_path / "p.png", transparency=0)
    with pytest.warns(UserWarning, match="p.png"):
        pixels = np.asarray(load_image(tmp_path / "p.png"))
    assert (pixels[:2] == [10, 20, 30]).all() and (pixels[2:] == 255).all()


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("L", (5, 3), 77), [77, 77, 77]),
        (lambda: Image.fromarray(np.full((3, 5), 65535, np.uint16)), [255, 255, 255]),
        (lambda: Image.fromarray(np.full((3, 5), 32896, np.uint16)), [128, 128, 128]),
        (lambda: Image.new("RGB", (5, 3), (10, 20, 30)).quantize(), [10, 20, 30]),
        (lambda: Image.new("CMYK", (5, 3), (0, 255, 255, 0)), [255, 0, 0]),
    ],
    ids=["grayscale", "16-bit-white", "16-bit-mid", "palette", "cmyk"],
)
def test_modes_convert_to_8bit_rgb(tmp_path, make, expected):
    path = tmp_path / ("image.tif" if make().mode == "CMYK" else "image.png")
    make().save(path)
    for source in (path, make()):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # opaque images must not warn
            image = load_image(source)
        assert image.mode == "RGB" and image.size == (5, 3)
        assert (np.asarray(image) == expected).all()


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    image = np.asarray(load_image(tmp_path / "photo.jpg"))
    assert image.shape == (40, 20, 3)
    assert image[:15].mean() > 240 and image[25:].mean() < 15  # the white left half is now on top


def test_bad_image_files(tmp_path):
    with pytest.raises(InputError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(InputError, match="notes.png"):
        load_image(str(tmp_path / "notes.png"))
    with pytest.raises(InputError, match="zero size"):
        load_image(Image.new("RGB", (0, 0)))


@pytest.mark.parametrize("shape", [(6, 8), (6, 8, 3), (6, 8, 4)])
def test_numpy_inputs(shape):
    array = np.full(shape, 90, np.uint8)
    if len(shape) == 3 and shape[2] == 4:
        array[..., 3] = 255  # opaque, so the colour survives compositing
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an opaque alpha channel does not warn
        image = load_image(array)
    assert image.mode == "RGB" and image.size == (8, 6)
    assert (np.asarray(image) == 90).all()


def test_numpy_rgba_and_bad_arrays():
    array = np.zeros((2, 2, 4), np.uint8)
    array[0, :, 3] = 255  # top row opaque black, bottom row transparent
    with pytest.warns(UserWarning, match="white"):
        pixels = np.asarray(load_image(array))
    assert (pixels[0] == 0).all() and (pixels[1] == 255).all()
    with pytest.raises(InputError, match="uint8"):
        load_image(np.zeros((2, 2, 3), np.float32))


# ------------------------------------------------------------------------------------------- helpers (also used by
# test_bad_inputs.py): a clip whose frame size changes, files unreadable by mode bits, a disk that fills up


def _ts_segment(frames: np.ndarray, start: int) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mpegts") as container:
        stream = container.add_stream("libx264", rate=25, options={"crf": "18"})
        stream.pix_fmt, stream.height, stream.width = "yuv420p", *frames.shape[1:3]
        for index, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            picture.pts, picture.time_base = start + index, Fraction(1, 25)
            container.mux(stream.encode(picture))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def resizing_video(path: Path, first: np.ndarray, second: np.ndarray) -> Path:
    """An MPEG-TS clip of the frames ``first`` followed by ``second``, of another size: two H.264 segments joined
    byte for byte, as joined camera or broadcast clips are (MPEG-TS, unlike mp4, allows a new size mid-stream)."""
    path.write_bytes(_ts_segment(first, 0) + _ts_segment(second, len(first)))
    return path


PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2  # <linux/prctl.h>, <linux/capability.h>


def _drop_permission_override() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def permission_bits_apply(scratch: Path):
    """A ``preexec_fn`` under which a child process is refused files by their mode bits (``None`` when it already
    is), or a skip. Root reads and writes anything whatever its mode, so as root the child drops CAP_DAC_OVERRIDE
    and CAP_DAC_READ_SEARCH; it stays uid 0, so it still reaches the interpreter and the project under /root."""
    preexec = _drop_permission_override if os.geteuid() == 0 else None
    probe = scratch / "mode-000-probe"
    probe.write_bytes(b"x")
    probe.chmod(0)
    try:
        command = [sys.executable, "-c", f"open({str(probe)!r}).read()"]
        result = subprocess.run(command, preexec_fn=preexec, capture_output=True, text=True, timeout=120)
    except subprocess.SubprocessError as err:
        pytest.skip(f"cannot start a process without root's file-permission override: {err}")
    finally:
        probe.unlink()
    if "PermissionError" not in result.stderr:
        pytest.skip("a file with mode 000 is still readable here (root with capabilities that cannot be dropped)")
    return preexec


def _mount(arguments: list[str], why: str) -> None:
    try:
        result = subprocess.run(["mount", *arguments], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"{why}: cannot run mount ({err})")
    if result.returncode:
        pytest.skip(f"{why}: mount is not permitted here (needs root or CAP_SYS_ADMIN): {result.stderr.strip()}")


@contextmanager
def small_disk(folder: Path, size: str = "256k") -> Iterator[Path]:
    """``folder`` as a tmpfs of ``size``: a disk that really fills up (or a skip where mounting is not allowed)."""
    folder.mkdir()
    _mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], "a full disk is tested on a small tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True, timeout=60)


@contextmanager
def read_only_folder(folder: Path) -> Iterator[Path]:
    """``folder`` bind-mounted onto itself read-only: a read-only file system, which stops root too."""
    folder.mkdir()
    _mount(["--bind", str(folder), str(folder)], "a read-only location is tested on a read-only bind mount")
    try:
        result = subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot remount a bind mount read-only here: {result.stderr.strip()}")
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True, timeout=60)


def snapshot(path: Path):
    """The bytes of a file, or of every file in a folder, to compare before and after a failed write."""
    if path.is_dir():
        return {entry.name: entry.read_bytes() for entry in sorted(path.iterdir())}
    return path.read_bytes()


def noise_clip(frames: int, side: int, seed: int = 0) -> np.ndarray:
    """Random pixels: incompressible, so the size on disk is predictable (about 3 bytes a pixel in PNG)."""
    return np.random.default_rng(seed).integers(0, 256, (frames, side, side, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------- what readers report

LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 1048576\n"
READERS = {
    "load_image": load_image,
    "open_video": lambda path: open_video(path)[0].close(),
    "iter_frames": iter_frames,  # opens at once: the error comes at the call, not at the first frame
    "read_video": read_video,
    "probe_fps": probe_fps,
    "has_audio": has_audio,
}


def _missing(path: Path) -> None:
    pass


def _folder(path: Path) -> None:
    path.mkdir()


def _broken_link(path: Path) -> None:
    path.symlink_to(path.with_name("gone"))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _lfs_pointer(path: Path) -> None:
    path.write_bytes(LFS_POINTER)


PROBLEMS = {
    "missing": (_missing, "not found"),
    "folder": (_folder, "is a folder"),
    "broken-link": (_broken_link, "broken link"),
    "empty": (_empty, "is empty (0 bytes)"),
    "lfs-pointer": (_lfs_pointer, "Git LFS pointer"),
}


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("reader", READERS)
def test_readers_name_the_file_problem(tmp_path, reader, problem):
    make, fragment = PROBLEMS[problem]
    path = tmp_path / ("input.png" if reader == "load_image" else "input.mp4")
    make(path)
    with pytest.raises(InputError) as caught:
        READERS[reader](path)
    message = str(caught.value)
    assert fragment in message and str(path) in message, message
    assert "corrupt" not in message


UNREADABLE_SCRIPT = """
import json, os, sys
from magicanimate.io import has_audio, iter_frames, load_image, open_video, probe_fps, read_video

image, video, lying = sys.argv[1], sys.argv[2], sys.argv[3] == "lying"
if lying:  # as ACLs or a network file system may: access() says yes, the open itself is refused
    os.access = lambda *args, **kwargs: True
calls = {
    "load_image": lambda: load_image(image),
    "open_video": lambda: open_video(video),
    "iter_frames": lambda: iter_frames(video),
    "read_video": lambda: read_video(video),
    "probe_fps": lambda: probe_fps(video),
    "has_audio": lambda: has_audio(video),
}
messages = {}
for name, call in calls.items():
    try:
        call()
        messages[name] = None
    except Exception as err:
        messages[name] = f"{type(err).__name__}: {err}"
print(json.dumps(messages))
"""


@pytest.mark.parametrize("access", ["honest", "lying"])
def test_unreadable_file_is_reported_as_such_not_as_corrupt(tmp_path, access):
    """A file without read permission, found by check_readable (``honest``) or only when the open fails."""
    preexec = permission_bits_apply(tmp_path)
    image, video = tmp_path / "photo.png", tmp_path / "clip.mp4"
    Image.fromarray(smooth_clip(frames=1)[0]).save(image)
    write_video(video, smooth_clip(frames=2))
    image.chmod(0)
    video.chmod(0)
    command = [sys.executable, "-c", UNREADABLE_SCRIPT, str(image), str(video), access]
    result = subprocess.run(command, preexec_fn=preexec, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    messages = json.loads(result.stdout)
    assert set(messages) == set(READERS)
    for reader, message in messages.items():
        assert message is not None, f"{reader} read a file without read permission"
        assert message.startswith("InputError: ") and "permission denied" in message, (reader, message)
        assert "corrupt" not in message, (reader, message)


# ------------------------------------------------------------------------------------------- frame size changes


def test_frame_size_change_mid_stream_is_one_clear_error(tmp_path):
    first, second = smooth_clip(frames=4, height=64, width=64), smooth_clip(frames=4, height=48, width=80)
    path = resizing_video(tmp_path / "joined.ts", first, second)
    for read in (read_video, lambda p: list(iter_frames(p))):
        with pytest.raises(InputError) as caught:
            read(path)
        message = str(caught.value)
        assert "joined.ts" in message and "frame 4 is 80x48" in message and "frame 0 is 64x64" in message, message
    frames, fps = read_video(path, max_frames=4)  # the frames before the change are a consistent clip
    assert frames.shape == (4, 64, 64, 3) and fps == 25.0
    assert np.abs(frames.astype(int) - first).mean() < 3


# ------------------------------------------------------------------------------------------- writers: atomic


WRITERS = {
    "mp4": (write_video, "clip.mp4"),
    "gif": (write_gif, "clip.gif"),
    "png-frames": (write_png_frames, "frames"),
}


@pytest.mark.parametrize("kind", WRITERS)
def test_full_disk_is_a_resource_error_and_keeps_the_earlier_output(tmp_path, kind):
    write, name = WRITERS[kind]
    with small_disk(tmp_path / "disk") as disk:
        target = disk / name
        write(target, noise_clip(2, 16))  # an earlier result, small enough to fit
        before = snapshot(target)
        with pytest.raises(ResourceError, match="disk is full") as caught:
            write(target, noise_clip(40, 128))  # several times the disk's 256 KiB in every format
        assert caught.value.exit_code == 4
        assert snapshot(target) == before
        assert [p.name for p in disk.iterdir()] == [name], "a temporary file was left behind"


def test_png_frames_replace_only_an_earlier_frame_folder(tmp_path):
    folder = tmp_path / "frames"
    write_png_frames(folder, smooth_clip(frames=5))
    paths = write_png_frames(folder, smooth_clip(frames=2))  # a shorter rerun leaves no stale frames behind
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png", "00001.png"] == [p.name for p in paths]
    np.testing.assert_array_equal(np.asarray(Image.open(paths[1])), smooth_clip(frames=2)[1])

    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a folder of PNG frames.*notes.txt"):
        write_png_frames(folder, smooth_clip(frames=2))
    assert (folder / "notes.txt").read_text() == "keep me" and len(list(folder.iterdir())) == 3

    (tmp_path / "file").write_bytes(b"a file")
    with pytest.raises(InputError, match="not a folder of PNG frames"):
        write_png_frames(tmp_path / "file", smooth_clip(frames=1))
    with pytest.raises(InputError, match="no frames"):
        write_png_frames(tmp_path / "empty", [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "frames"]


def test_failed_gif_and_png_writes_leave_nothing(tmp_path):
    def frames():
        yield smooth_clip(frames=1)[0]
        raise RuntimeError("boom")

    for write, name in ((write_gif, "clip.gif"), (write_png_frames, "frames")):
        with pytest.raises(RuntimeError, match="boom"):
            write(tmp_path / name, frames())
    with pytest.raises(InputError, match="no frames"):
        write_gif(tmp_path / "clip.gif", [])
    assert list(tmp_path.iterdir()) == []


def test_audio_source_gone_gives_a_silent_video_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="gone.mp4.*without sound"):
        path = write_video(tmp_path / "out.mp4", smooth_clip(frames=2), audio_from=tmp_path / "gone.mp4")
    with av.open(str(path)) as container:
        assert not container.streams.audio and len(container.streams.video) == 1
