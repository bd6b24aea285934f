"""Reading and writing videos with PyAV.

Only PyAV is used (never an ``ffmpeg`` executable), so video I/O works wherever the ``av`` wheel installs. Frames are
always uint8 RGB arrays of shape ``(H, W, 3)``; a clip is an array of shape ``(F, H, W, 3)``.
"""

import os
import uuid
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from ..errors import InputError

DEFAULT_FPS = 25.0
PathLike = str | os.PathLike


def open_video(path: PathLike):
    if not os.path.isfile(path):
        raise InputError(f"video file not found: {os.fspath(path)}; check the path")
    try:
        container = av.open(os.fspath(path))
    except (av.FFmpegError, OSError, ValueError):
        message = f"cannot read video {os.fspath(path)}: not a video or corrupted; pass an mp4, webm, mov or gif file"
        raise InputError(message) from None
    if not container.streams.video:
        container.close()
        raise InputError(f"{os.fspath(path)} has no video stream; pass a file that contains video")
    return container, container.streams.video[0]


def stream_fps(stream) -> float:
    """The average frame rate (frames / duration), so variable-frame-rate clips keep their length."""
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else DEFAULT_FPS


def has_audio(path: PathLike) -> bool:
    """Whether `path` is a readable file with an audio stream we can decode (header only, nothing decoded)."""
    try:
        with av.open(os.fspath(path)) as container:
            return any(stream.codec_context is not None for stream in container.streams.audio)
    except (av.FFmpegError, OSError, ValueError):
        return False


def probe_fps(path: PathLike) -> float:
    """Frame rate of the first video stream of `path`, read from the header without decoding (25.0 if unknown)."""
    container, stream = open_video(path)
    with container:
        return stream_fps(stream)


def upright(frame) -> np.ndarray:
    """A decoded ``av.VideoFrame`` as an RGB uint8 array, upright: the rotation phones store as display-matrix
    metadata (portrait clips are usually encoded sideways) is applied."""
    image = frame.to_ndarray(format="rgb24")
    turns = round((getattr(frame, "rotation", 0) or 0) / 90) % 4  # counter-clockwise quarter turns for display
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def iter_frames(path: PathLike, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Decode RGB uint8 frames `(H, W, 3)` one at a time, upright (see :func:`upright`).

    A damaged tail (for example a truncated download) ends the clip instead of failing it, since a partial motion
    sequence is still usable; only a file with no decodable frame at all raises.

    Raises:
        InputError: the file is missing, is not a video, has no video stream, or has no decodable frame.
    """
    container, stream = open_video(path)
    count = 0
    with container:
        try:
            for frame in container.decode(stream):
                if max_frames is not None and count >= max_frames:
                    break
                yield upright(frame)
                count += 1
        except (av.FFmpegError, OSError, ValueError):
            pass  # damaged tail: keep what was decoded
    if count == 0:
        raise InputError(f"no frame could be decoded from {os.fspath(path)}; the file is empty or corrupted")


def read_video(path: PathLike, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode the first video stream of `path` into a uint8 RGB array `(F, H, W, 3)` and its frame rate.

    At most `max_frames` frames are decoded when it is given; frames are upright and a damaged tail is dropped (see
    :func:`iter_frames`). Every decoded frame is kept in order: a variable-frame-rate clip (phones record those)
    is read as a constant-rate one at its *average* rate, so its duration is kept and only the spacing of frames
    within it is evened out.

    Raises:
        InputError: the file is missing, is not a video, has no video stream, or has no decodable frame.
    """
    fps = probe_fps(path)
    return np.stack(list(iter_frames(path, max_frames))), fps


def _to_fraction(fps: float | Fraction) -> Fraction:
    """Exact rate for `fps`: NTSC rates such as 29.97 or 23.976 become 30000/1001 or 24000/1001."""
    if isinstance(fps, Fraction):
        return fps
    if fps <= 0:
        raise InputError(f"fps must be positive, got {fps}")
    ntsc = Fraction(round(fps * 1.001) * 1000, 1001)
    if fps != int(fps) and abs(fps - float(ntsc)) < 1e-3:
        return ntsc
    return Fraction(fps).limit_denominator(1001)


def _to_uint8(frame) -> np.ndarray:
    """Check an `(H, W, 3)` frame and convert floats in [0, 1] to uint8."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.shape[0] == 0 or frame.shape[1] == 0:
        raise InputError(f"a video frame must have shape (H, W, 3), got {frame.shape}")
    if frame.dtype == np.uint8:
        return frame
    if np.issubdtype(frame.dtype, np.floating):
        return np.round(np.clip(frame, 0.0, 1.0) * 255).astype(np.uint8)
    raise InputError(f"video frames must be uint8 or float in [0, 1], got {frame.dtype}")


class VideoWriter:
    """Stream RGB frames into an H.264 mp4 that plays in browsers.

    The video uses libx264 with the yuv420p pixel format and ``movflags=faststart`` (index at the front, so
    browsers can start playing before the download ends). yuv420p needs an even width and height, so frames with an
    odd size are padded by one row/column that repeats the edge pixels.

    Frames go to a hidden temporary file next to `path`, which replaces `path` only when the ``with`` block exits
    without an exception: an interrupted run never leaves a half-written or clobbered video behind.

    ``audio_from`` names a file whose first audio track is re-encoded to AAC into the result (the driving video's
    sound, so a dance keeps its music), cut to the length of the video; a file without audio adds none.

    Example:

    ```py
    >>> with VideoWriter("out/animation.mp4", fps=25.0) as writer:
    ...     for frame in frames:
    ...         writer.write(frame)
    ```
    """

    def __init__(
        self, path: PathLike, fps: float | Fraction = DEFAULT_FPS, crf: int = 18, audio_from: PathLike | None = None
    ):
        self.path = Path(path)
        self.rate = _to_fraction(fps)
        self.crf = crf
        self.audio_from = audio_from if audio_from is not None and has_audio(audio_from) else None
        self.frame_count = 0
        self._container = self._stream = self._audio_stream = self._temp_path = None

    def __enter__(self) -> "VideoWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Same directory, so os.replace is atomic; a unique name, so concurrent writers do not collide.
        self._temp_path = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.partial.mp4")
        self._container = av.open(str(self._temp_path), "w", format="mp4", options={"movflags": "faststart"})
        return self

    def write(self, frame) -> None:
        """Append one `(H, W, 3)` frame, uint8 or float in [0, 1]; all frames must have the same size."""
        if self._container is None:
            raise RuntimeError("VideoWriter.write must be called inside a `with VideoWriter(...)` block")
        frame = _to_uint8(frame)
        height, width = frame.shape[:2]
        if height % 2 or width % 2:
            frame = np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        if self._stream is None:
            self._stream = self._container.add_stream("libx264", rate=self.rate, options={"crf": str(self.crf)})
            self._stream.pix_fmt = "yuv420p"
            self._stream.height, self._stream.width = frame.shape[:2]
            if self.audio_from is not None:  # every stream must exist before the first packet is muxed
                self._audio_stream = _add_audio_stream(self._container, self.audio_from)
        elif frame.shape[:2] != (self._stream.height, self._stream.width):
            raise InputError(f"frame {self.frame_count} has size {width}x{height}, unlike the first frame")
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        video_frame.pts, video_frame.time_base = self.frame_count, 1 / self.rate
        self._container.mux(self._stream.encode(video_frame))
        self.frame_count += 1

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        container, self._container = self._container, None
        try:
            if exc_type is None and self.frame_count == 0:
                raise InputError(f"no frames to write to {self.path}; the video would be empty")
            if exc_type is None:
                container.mux(self._stream.encode(None))  # flush frames buffered by the encoder
                if self._audio_stream is not None:
                    _mux_audio(container, self._audio_stream, self.audio_from, self.frame_count / self.rate)
                container.close()
                os.replace(self._temp_path, self.path)
        finally:
            if self._temp_path.exists():
                try:
                    container.close()
                except Exception:
                    pass
                self._temp_path.unlink()


# Channel layouts the AAC encoder takes as they are; anything else is downmixed to stereo.
_AAC_LAYOUTS = {"mono", "stereo", "3.0", "4.0", "5.0", "5.1", "7.1"}


def _add_audio_stream(container, source: PathLike):
    """An AAC stream in `container` shaped like the first audio track of `source`."""
    with av.open(os.fspath(source)) as audio_input:
        codec = audio_input.streams.audio[0].codec_context
        rate, layout = codec.sample_rate or 48000, codec.layout.name
    stream = container.add_stream("aac", rate=rate)
    stream.layout = layout if layout in _AAC_LAYOUTS else "stereo"
    return stream


def _decoded_audio(container):
    """Frames of the first audio track, then ``None`` (the flush marker); a damaged tail just ends the track."""
    try:
        yield from container.decode(container.streams.audio[0])
    except (av.FFmpegError, OSError, ValueError):
        pass
    yield None


def _mux_audio(container, stream, source: PathLike, duration: Fraction) -> None:
    """Re-encode the first audio track of `source` into `stream`, cut at `duration` seconds."""
    rate, layout = stream.codec_context.sample_rate, stream.layout.name
    remaining = int(duration * rate)
    # Planar float at the output's rate and layout, so a frame can be cut at any sample.
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
    with av.open(os.fspath(source)) as audio_input:
        for frame in _decoded_audio(audio_input):
            for chunk in resampler.resample(frame):
                samples = chunk.to_ndarray()[:, :remaining]
                if samples.shape[1] == 0:
                    break
                out = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="fltp", layout=layout)
                out.sample_rate, out.pts, out.time_base = rate, int(duration * rate) - remaining, Fraction(1, rate)
                container.mux(stream.encode(out))
                remaining -= samples.shape[1]
            if remaining <= 0:
                break
    container.mux(stream.encode(None))


def write_video(
    path: PathLike,
    frames: Iterable,
    fps: float | Fraction = DEFAULT_FPS,
    crf: int = 18,
    audio_from: PathLike | None = None,
) -> Path:
    """Write an array `(F, H, W, 3)` or any iterable of frames to an H.264 mp4; see :class:`VideoWriter`."""
    with VideoWriter(path, fps=fps, crf=crf, audio_from=audio_from) as writer:
        for frame in frames:
            writer.write(frame)
    return writer.path


def write_gif(path: PathLike, frames: Iterable, fps: float = DEFAULT_FPS) -> Path:
    """Write frames to a looping GIF (for previews where mp4 is not welcome; colours are quantised to 256)."""
    images = [Image.fromarray(_to_uint8(frame)) for frame in frames]
    if not images:
        raise InputError(f"no frames to write to {path}; the GIF would be empty")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


def write_png_frames(directory: PathLike, frames: Iterable) -> list:
    """Write frames losslessly as `directory/00000.png, 00001.png, ...` and return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, frame in enumerate(frames):
        paths.append(directory / f"{index:05d}.png")
        Image.fromarray(_to_uint8(frame)).save(paths[-1])
    return paths
