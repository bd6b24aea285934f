"""Reading and writing videos with PyAV.

Only PyAV is used (never an ``ffmpeg`` executable), so video I/O works wherever the ``av`` wheel installs. Frames are
always uint8 RGB arrays of shape ``(H, W, 3)``; a clip is an array of shape ``(F, H, W, 3)``.

Every reader asks :func:`~magicanimate.io.files.check_readable` first (a missing file, a folder, an empty file, a
Git LFS pointer, no read permission: each named as what it is, never as "corrupt"). Every writer goes through
:func:`~magicanimate.io.output.atomic_output`, so an output appears only when complete and a full disk is a
:class:`~magicanimate.errors.ResourceError` with nothing left behind.
"""

import os
import re
import warnings
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from ..errors import InputError
from .files import check_readable, permission_denied
from .output import atomic_output

DEFAULT_FPS = 25.0
PathLike = str | os.PathLike


def open_video(path: PathLike):
    """``(container, first video stream)`` of ``path``, header only; the caller closes the container.

    Raises:
        InputError: the file is missing or unreadable (see :func:`~magicanimate.io.files.check_readable`), is not a
            video, or has no video stream.
    """
    name = os.fspath(check_readable(path, "video file"))
    try:
        container = av.open(name)
    except PermissionError:  # PyAV's subclasses FFmpegError too: a file we may not read is not a corrupt one
        raise permission_denied(name, "video file") from None
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
    """Whether `path` has an audio stream we can decode (header only, nothing decoded). A file that is not a media
    file has none; one that cannot be read at all is an error, as for the other readers.

    Raises:
        InputError: the file is missing or unreadable (see :func:`~magicanimate.io.files.check_readable`).
    """
    name = os.fspath(check_readable(path, "video file"))
    try:
        with av.open(name) as container:
            return any(stream.codec_context is not None for stream in container.streams.audio)
    except PermissionError:
        raise permission_denied(name, "video file") from None
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

    The file is opened at once, so a missing or unreadable video fails here rather than at the first frame. A
    damaged tail (for example a truncated download) ends the clip instead of failing it, since a partial motion
    sequence is still usable; only a file with no decodable frame at all raises.

    A stream whose frame size changes part-way (possible in MPEG-TS or raw H.264, e.g. a concatenation of clips) is
    refused at the first frame of another size rather than rescaled: a clip is one ``(F, H, W, 3)`` array, and
    stretching the later frames would silently move the body parts of a DensePose motion (or the person of a
    driving video) relative to the first ones.

    Raises:
        InputError: the file is missing or unreadable, is not a video, has no video stream, has no decodable
            frame, or changes its frame size.
    """
    container, stream = open_video(path)
    return _decode(container, stream, os.fspath(path), max_frames)


def _decode(container, stream, name: str, max_frames: int | None) -> Iterator[np.ndarray]:
    count, first = 0, None
    with container:
        try:
            for frame in container.decode(stream):
                if max_frames is not None and count >= max_frames:
                    break
                image = upright(frame)
                first = image.shape if first is None else first
                if image.shape != first:
                    raise InputError(
                        f"the frame size of {name} changes mid-stream: frame {count} is {image.shape[1]}x"
                        f"{image.shape[0]}, frame 0 is {first[1]}x{first[0]}; re-export it at one frame size"
                    )
                yield image
                count += 1
        except InputError:  # ours (a ValueError too), not a damaged tail
            raise
        except (av.FFmpegError, OSError, ValueError):
            pass  # damaged tail: keep what was decoded
    if count == 0:
        raise InputError(f"no frame could be decoded from {name}; the file is empty or corrupted")


def read_video(path: PathLike, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode the first video stream of `path` into a uint8 RGB array `(F, H, W, 3)` and its frame rate.

    At most `max_frames` frames are decoded when it is given; frames are upright and a damaged tail is dropped (see
    :func:`iter_frames`). Every decoded frame is kept in order: a variable-frame-rate clip (phones record those)
    is read as a constant-rate one at its *average* rate, so its duration is kept and only the spacing of frames
    within it is evened out.

    Raises:
        InputError: the file is missing or unreadable, is not a video, has no video stream, has no decodable
            frame, or changes its frame size mid-stream (see :func:`iter_frames`).
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

    Frames go to the temporary file of :func:`~magicanimate.io.output.atomic_output`, which replaces `path` only
    when the ``with`` block exits without an exception: an interrupted run never leaves a half-written or clobbered
    video behind, and a full disk ends as :class:`~magicanimate.errors.ResourceError` with nothing left.

    ``audio_from`` names a file whose first audio track is re-encoded to AAC into the result (the driving video's
    sound, so a dance keeps its music), cut to the length of the video; a file without audio adds none, and one
    that has become unreadable since (a moved upload) adds none with a warning rather than losing the frames.

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
        self.audio_from = None
        if audio_from is not None:
            try:
                self.audio_from = audio_from if has_audio(audio_from) else None
            except InputError as err:
                warnings.warn(f"{err}; writing the video without sound", stacklevel=2)
        self.frame_count = 0
        self._container = self._stream = self._audio_stream = self._output = self._temp_path = None

    def __enter__(self) -> "VideoWriter":
        self._output = atomic_output(self.path)
        self._temp_path = self._output.__enter__()
        try:
            self._container = av.open(str(self._temp_path), "w", format="mp4", options={"movflags": "faststart"})
        except BaseException as err:
            self._output.__exit__(type(err), err, err.__traceback__)  # raises its form of err (EACCES, ENOSPC)
            raise
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
        # Converted to yuv420p here, not inside encode(): with PyAV's implicit conversion there the same frames gave
        # 8 different files in 10 encodes in one process (measured); converted here, repeated encodes in a process
        # agree. (The first encode of a fresh process can still differ: x264's output is not promised bit-exact.)
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24").reformat(format="yuv420p")
        video_frame.pts, video_frame.time_base = self.frame_count, 1 / self.rate
        self._container.mux(self._stream.encode(video_frame))
        self.frame_count += 1

    def __exit__(self, exc_type, exc_value, traceback) -> bool:
        container, self._container = self._container, None
        output, self._output = self._output, None
        try:
            if exc_type is None:
                if self.frame_count == 0:
                    raise InputError(f"no frames to write to {self.path}; the video would be empty")
                container.mux(self._stream.encode(None))  # flush frames buffered by the encoder
                if self._audio_stream is not None:
                    _mux_audio(container, self._audio_stream, self.audio_from, self.frame_count / self.rate)
                container.close()  # writes the index: the disk can fill up here too
        except BaseException as err:
            _close_quietly(container)
            # atomic_output removes the temporary file and raises a full disk as a ResourceError; else err goes on.
            output.__exit__(type(err), err, err.__traceback__)
            raise
        if exc_type is not None:
            _close_quietly(container)  # before atomic_output deletes the file
        return bool(output.__exit__(exc_type, exc_value, traceback))


def _close_quietly(container) -> None:
    try:
        container.close()
    except Exception:  # noqa: BLE001 - already failing; the first error is the one to report
        pass


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
    """Write frames to a looping GIF (for previews where mp4 is not welcome; colours are quantised to 256), through
    :func:`~magicanimate.io.output.atomic_output`."""
    images = [Image.fromarray(_to_uint8(frame)) for frame in frames]
    if not images:
        raise InputError(f"no frames to write to {path}; the GIF would be empty")
    path = Path(path)
    with atomic_output(path) as temp:
        images[0].save(temp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


_FRAME_NAME = re.compile(r"\d{5}\.png")


def write_png_frames(directory: PathLike, frames: Iterable) -> list[Path]:
    """Write frames losslessly as `directory/00000.png, 00001.png, ...` and return their paths.

    The folder is written whole under a temporary name and then put in place (see
    :func:`~magicanimate.io.output.atomic_output`): an earlier frame folder is replaced completely (no stale frames
    of a longer earlier run), but a folder holding anything else is refused, so a typo never deletes files.

    Raises:
        InputError: `directory` is a file or a folder with other files in it, or there are no frames.
        ResourceError: the disk is full; nothing is left behind.
    """
    directory = Path(directory)
    if os.path.lexists(directory):
        if directory.is_symlink() or not directory.is_dir():
            raise InputError(f"{directory} exists and is not a folder of PNG frames; choose another output")
        others = [entry.name for entry in directory.iterdir() if not _FRAME_NAME.fullmatch(entry.name)]
        if others:
            raise InputError(
                f"{directory} exists and is not a folder of PNG frames (it holds {others[0]}); choose another output"
            )
    paths = []
    with atomic_output(directory, folder=True) as temp:
        for index, frame in enumerate(frames):
            name = f"{index:05d}.png"
            Image.fromarray(_to_uint8(frame)).save(temp / name, format="PNG")
            paths.append(directory / name)
        if not paths:
            raise InputError(f"no frames to write to {directory}; the folder would be empty")
    return paths
