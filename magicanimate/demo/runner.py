"""What one demo request does, without any Gradio: check the values, read the uploads, animate, write the outputs.

Kept apart from the UI so the rules that protect a shared server (limits, one scratch folder per run, no paths built
from user strings, cancellation between denoising steps and DensePose frames) live in plain code.
"""

import math
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ..api import Video, animate, grid_frames
from ..densepose.palette import looks_like_densepose
from ..errors import InputError
from ..io.video import has_audio, upright
from ..settings import SettingError, frame_size, load_config

# progress(stage, done, total, unit): "reading video" and "DensePose" count frames (total None when the file does
# not say), "denoising" counts steps, "writing video" counts the files written.
Progress = Callable[[str, int, int | None, str], None]

RAW_VIDEO_MESSAGE = (
    "This looks like an ordinary video of a person, not a DensePose video. Turning it into DensePose needs a "
    "DensePose model, and this demo was started without one (restart it with --densepose-model "
    "densepose_r50_fpn_dl.torchscript, from huggingface.co/LayerNorm/DensePose-TorchScript-with-hint-image). "
    "Or upload a DensePose video (body parts in viridis colours on a purple background, like MagicAnimate's "
    "samples); if this already is one, set 'Driving video is' to 'DensePose'."
)
# The settings one request may choose (the rest, such as the device or eta, are the server's).
REQUEST_SETTINGS = (
    "steps",
    "guidance_scale",
    "seed",
    "size",
    "context_frames",
    "context_overlap",
    "context_schedule",
    "max_frames",
    "prompt",
    "negative_prompt",
    "refine_size",
    "refine_strength",
    "frame_stride",
    "noise_prior",
    "keyframe_blend",
)
DRIVING_KINDS = ("auto", "densepose", "raw")
DENSEPOSE_FPS = 25.0  # extracted motion is resampled to the checkpoints' rate (what `animate --driving` does)


@dataclass
class Limits:
    """What one request may ask of a shared server; exceeding a limit gives a message, never a crash."""

    max_upload_mb: int = 100  # per file, enforced by Gradio before the upload reaches us
    max_frames: int = 300  # longer driving videos are cut (12 s at 25 fps), with a warning
    max_size: int = 1024  # largest output side a request may ask for
    max_steps: int = 100  # most denoising steps a request may ask for
    keep_seconds: int = 900  # finished runs' files are deleted after this (Gradio has copied them by then)


class Cancelled(Exception):
    """The user pressed Stop; raised from the step callback so the pipeline stops between steps."""


@dataclass
class RunResult:
    """Files of one finished run and the warnings to show."""

    animation: Path
    grid: Path | None = None
    preview: Path | None = None
    warnings: list[str] = field(default_factory=list)
    reference: Path | None = None  # the photo generated from the request's prompt


@dataclass
class Driving:
    """A decoded driving video: ``frames`` at output size, upright; ``cut`` when it had more than were wanted;
    ``frame_count`` is the container's count (``None`` when the header does not say)."""

    frames: np.ndarray
    fps: float
    cut: bool
    frame_count: int | None


def request_settings(defaults: Mapping, limits: Limits, **values) -> DictConfig:
    """The server's settings (``defaults``) with one request's ``values`` on top, checked by the settings schema
    (the same rules as the CLI and the Python API) and then by this server's ``limits``.

    Values come from a browser or a script as sent: floats for integers, ``nan``, strings. ``None`` keeps the
    server's value.

    Raises:
        SettingError: a value the schema or the server refuses; ``err.key`` names the setting.
        InputError: a name that is not one of :data:`REQUEST_SETTINGS`.
    """
    unknown = sorted(set(values) - set(REQUEST_SETTINGS))
    if unknown:
        raise InputError(f"the demo does not take setting(s) {', '.join(unknown)}")
    if isinstance(defaults, DictConfig):
        defaults = OmegaConf.to_container(defaults)
    config = load_config(dict(defaults), **values)
    if config.size is None:
        raise SettingError("size", "setting size must be a number on this demo (the output's shorter side), got null")
    limited = (("steps", limits.max_steps), ("size", limits.max_size), ("max_frames", limits.max_frames))
    for key, most in (*limited, ("refine_size", limits.max_size)):
        if config[key] is not None and config[key] > most:
            raise SettingError(key, f"setting {key} must be at most {most} on this demo, got {config[key]}")
    return config


def read_driving(
    path: str | Path, size: int, max_frames: int, progress: Callable[[int, int | None], None] | None = None
) -> Driving:
    """At most ``max_frames`` frames of the video at ``path``, upright (phone rotation applied, as the CLI does)
    and scaled while decoding so that the shorter displayed side is ``size``.

    Scaling as frames are decoded keeps memory bounded for large uploads (a 1080p clip is never held at full size):
    the scaler writes the coded picture straight at the size that, once turned upright, is the output size.
    ``progress(done, total)`` is told after every frame.
    """
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError):
        raise InputError("The driving video could not be read: upload an mp4, webm, mov or gif file.") from None
    with container:
        if not container.streams.video:
            raise InputError("The driving video has no video track.")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 25.0)
        if not stream.codec_context.height or not stream.codec_context.width:
            raise InputError("The driving video has no picture size; it is damaged or not a video.")
        frame_count = stream.frames or None
        total = min(frame_count, max_frames) if frame_count else None
        frames, cut, coded = [], False, None
        try:
            for frame in container.decode(stream):
                if len(frames) == max_frames:
                    cut = True
                    break
                if coded is None:  # the rotation is known only once a frame is decoded
                    coded = _coded_size(frame, size)
                frames.append(upright(frame.reformat(width=coded[1], height=coded[0], format="rgb24")))
                if progress is not None:
                    progress(len(frames), total)
        except (av.FFmpegError, OSError, ValueError):
            pass  # a damaged tail: keep what was decoded
    if not frames:
        raise InputError("No frame of the driving video could be decoded; the file is empty or damaged.")
    return Driving(np.stack(frames), fps, cut, frame_count)


def _coded_size(frame: av.VideoFrame, size: int) -> tuple[int, int]:
    """``(height, width)`` to scale the coded picture to, so that it is the output size once upright: a clip shown
    turned by 90 or 270 degrees has its displayed height along the coded width."""
    sideways = round((frame.rotation or 0) / 90) % 2 == 1
    shown = (frame.width, frame.height) if sideways else (frame.height, frame.width)
    height, width = frame_size(*shown, size)
    return (width, height) if sideways else (height, width)


def densepose_extractor(model: str | Path, device: str = "auto"):
    """Load the DensePose model now (once, like the other models); :class:`Animator` runs it on raw videos."""
    from ..densepose import load_extractor

    return load_extractor(model, device=device)


class _CountingExtractor:
    """A loaded DensePose extractor that reports every frame it has looked at (``on_frame`` may raise
    :class:`Cancelled` to stop the extraction between two frames)."""

    def __init__(self, extractor, on_frame: Callable[[int], None]):
        self.extractor = extractor
        self.on_frame = on_frame

    def extract(self, frames: Iterable[np.ndarray]) -> Iterator:
        for done, persons in enumerate(self.extractor.extract(frames), start=1):
            self.on_frame(done)
            yield persons

    def __call__(self, frame: np.ndarray):
        return self.extractor(frame)


class Animator:
    """The loaded pipeline plus a private scratch folder; turns one request into output files.

    Output files are named by the server (``run-<uuid>/animation.mp4``), never after anything the user sent. Runs
    older than ``limits.keep_seconds`` are swept at the start of each run, and :meth:`close` removes everything.
    """

    def __init__(self, pipeline, limits: Limits | None = None, extractor=None):
        self.pipeline = pipeline
        self.limits = limits or Limits()
        self.extractor = extractor
        self.workdir = Path(tempfile.mkdtemp(prefix="magicanimate-demo-"))
        self._lock = threading.Lock()  # the pipeline is not re-entrant; the queue already serialises runs

    def run(
        self,
        reference: Image.Image | np.ndarray,
        driving: str | Path,
        config: Mapping,
        *,
        driving_kind: str = "auto",
        grid: bool = False,
        preview: bool = False,
        progress: Progress | None = None,
        warn: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        reference_end: Image.Image | np.ndarray | None = None,
    ) -> RunResult:
        """Animate ``reference`` with the uploaded ``driving`` video under ``config`` (from :func:`request_settings`;
        ``max_frames`` there is the request's, the server's limit applies on top). Without a ``reference``, the
        config's ``prompt`` describes the person: the photo is generated first (``RunResult.reference``). With a
        ``reference_end`` photo the clip ends at it (keyframes: about twice the work).

        ``warn`` is told at once about things the user should know but that do not stop the run (a clip cut to the
        frame limit); the same messages end up in ``RunResult.warnings``.
        """
        progress = progress or (lambda stage, done, total, unit: None)
        prompt = config.get("prompt")
        if reference is None and prompt is None:
            raise InputError("Upload a reference image of the person to animate, or describe one in the prompt box.")
        if reference is not None and prompt is not None:
            raise InputError("Give either a reference image or a prompt, not both: clear one of them.")
        if driving is None:
            raise InputError("Upload a driving video (DensePose, or a video of a person).")
        if driving_kind not in DRIVING_KINDS:
            raise InputError(f"driving_kind must be one of {', '.join(DRIVING_KINDS)}, got {driving_kind!r}")

        def check_cancel() -> None:
            if cancel is not None and cancel.is_set():
                raise Cancelled

        self.sweep()
        limit = self.limits.max_frames
        wanted = min(config["max_frames"] or limit, limit)
        size = int(config["size"])
        progress("reading video", 0, None, "frames")
        clip = read_driving(driving, size, wanted, lambda done, total: progress("reading video", done, total, "frames"))
        result_warnings = []
        if clip.cut and wanted == limit:
            result_warnings.append(
                f"The driving video is longer than this demo's limit of {limit} frames ({limit / clip.fps:.1f} s): "
                f"only the first {limit} are animated. Use `magicanimate animate` for longer clips."
            )
            if warn is not None:
                warn(result_warnings[-1])
        raw = driving_kind == "raw" or (driving_kind == "auto" and not looks_like_densepose(clip.frames))
        if raw and self.extractor is None:
            raise InputError(RAW_VIDEO_MESSAGE)
        if isinstance(reference, np.ndarray):
            reference = Image.fromarray(reference)
        if reference is not None:
            reference = reference.convert("RGB")
        keyframes = {}
        if reference_end is not None:
            end = Image.fromarray(reference_end) if isinstance(reference_end, np.ndarray) else reference_end
            keyframes["reference_end"] = end.convert("RGB")
        frames, fps = clip.frames, clip.fps

        def on_step(step: int, total: int) -> None:
            check_cancel()
            progress("denoising", step, total, "steps")

        settings = {key: value for key, value in config.items() if key not in ("grid", "preset")}
        settings.update(fps=None, check_motion=False, max_frames=wanted)  # the demo decided what the video is, above
        with self._lock:  # the models (the DensePose one too) serve one request at a time
            if raw:  # the same path as `animate --driving` and batch jobs, with the extraction's progress shown
                extractor = self._counting_extractor(size, wanted, clip, progress, check_cancel)
                video = animate(reference, driving=Path(driving), densepose_model=extractor, pipeline=self.pipeline,
                                config=settings, progress=on_step, **keyframes)  # fmt: skip
            else:
                video = animate(reference, frames, pipeline=self.pipeline, config=settings, progress=on_step,
                                **keyframes)  # fmt: skip
                video.fps = fps  # the uploaded video's own rate (frames given as an array carry none)
        frames, fps = video.motion, video.fps
        video.audio = Path(driving) if has_audio(driving) else None
        files = 1 + grid + preview
        progress("writing video", 0, files, "videos")
        run_dir = self.workdir / f"run-{uuid.uuid4().hex}"
        result = RunResult(animation=video.save(run_dir / "animation.mp4", crf=config["crf"]), warnings=result_warnings)
        if video.reference is not None:
            reference = video.reference
            result.reference = run_dir / "reference.png"
            reference.save(result.reference)
        progress("writing video", 1, files, "videos")
        height, width = video.frames.shape[1:3]
        if grid:
            sized = np.asarray(reference.resize((width, height), Image.BICUBIC))
            panels = Video(grid_frames(sized, _resized(frames, height, width), video.frames), fps, video.audio)
            result.grid = panels.save(run_dir / "grid.mp4", crf=config["crf"])
            progress("writing video", 2, files, "videos")
        if preview:
            result.preview = Video(frames, fps).save(run_dir / "densepose.mp4", crf=config["crf"])
            progress("writing video", files, files, "videos")
        return result

    def _counting_extractor(self, size: int, wanted: int, clip: Driving, progress: Progress, check_cancel):
        """The loaded DensePose model, reporting every source frame it looks at (and stopping on Stop)."""
        # The extraction reads enough source frames for `wanted` frames at 25 fps, plus one.
        total = len(clip.frames) if not clip.cut else math.ceil(wanted * clip.fps / DENSEPOSE_FPS) + 1
        if clip.frame_count:
            total = min(total, clip.frame_count)

        def on_frame(done: int) -> None:
            check_cancel()
            progress("DensePose", done, total, "frames")

        progress("DensePose", 0, total, "frames")
        return _CountingExtractor(self.extractor, on_frame)

    def sweep(self) -> None:
        """Delete runs older than ``keep_seconds`` (their files were copied into Gradio's cache long ago)."""
        cutoff = time.time() - self.limits.keep_seconds
        for run_dir in self.workdir.glob("run-*"):
            if run_dir.stat().st_mtime < cutoff:
                shutil.rmtree(run_dir, ignore_errors=True)

    def close(self) -> None:
        """Remove the scratch folder and everything in it."""
        shutil.rmtree(self.workdir, ignore_errors=True)


def _resized(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """``frames`` at ``height x width`` (the DensePose panel of the grid; a no-op when they already are)."""
    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack([np.asarray(Image.fromarray(frame).resize((width, height), Image.NEAREST)) for frame in frames])
