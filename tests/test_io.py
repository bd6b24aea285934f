"""Tests of magicanimate.io: image loading and PyAV video reading/writing."""

import warnings
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from magicanimate.errors import InputError
from magicanimate.io import VideoWriter, load_image, probe_fps, read_video, write_gif, write_png_frames, write_video

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
