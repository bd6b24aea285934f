"""What one demo request does, without any Gradio: read the uploads, check them, animate, write the outputs.

Kept apart from the UI so the rules that protect a shared server (limits, one scratch folder per run, no paths built
from user strings, cancellation between denoising steps) live in plain code.
"""

import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
from PIL import Image

from ..api import Video, animate, grid_frames, looks_like_densepose, output_size
from ..errors import InputError
from ..io.video import has_audio

# progress(description, done, total), counted in denoising steps: reading is 0 of them, writing all of them.
Progress = Callable[[str, int, int], None]
# DensePose extraction: (raw video, output size, max frames) -> (DensePose frames (F, size, size, 3) uint8, fps).
Extractor = Callable[[Path, int, int], tuple[np.ndarray, float]]

RAW_VIDEO_MESSAGE = (
    "This looks like an ordinary video of a person, not a DensePose video. Turning it into DensePose needs a "
    "DensePose model, and this demo was started without one (restart it with --densepose-model "
    "densepose_r50_fpn_dl.torchscript, from huggingface.co/LayerNorm/DensePose-TorchScript-with-hint-image). "
    "Or upload a DensePose video (body parts in viridis colours on a purple background, like MagicAnimate's "
    "samples); if this already is one, set 'Driving video is' to 'DensePose'."
)


@dataclass
class Limits:
    """What one request may ask of a shared server; exceeding a limit gives a message, never a crash."""

    max_upload_mb: int = 100  # per file, enforced by Gradio before the upload reaches us
    max_frames: int = 300  # longer driving videos are cut (12 s at 25 fps), with a warning
    max_size: int = 1024  # largest output side the size slider offers
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


def read_driving(path: str | Path, size: int, max_frames: int) -> tuple[np.ndarray, float, bool]:
    """``(frames, fps, cut)``: at most ``max_frames`` frames, scaled while decoding to the output size.

    Scaling as frames are decoded keeps memory bounded for large uploads (a 1080p clip is never held at full size).
    ``cut`` says whether the video had more frames than ``max_frames``.
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
        height, width = output_size(stream.codec_context.height, stream.codec_context.width, size)
        frames, cut = [], False
        try:
            for frame in container.decode(stream):
                if len(frames) == max_frames:
                    cut = True
                    break
                frames.append(frame.to_ndarray(format="rgb24", width=width, height=height))
        except (av.FFmpegError, OSError, ValueError):
            pass  # a damaged tail: keep what was decoded
    if not frames:
        raise InputError("No frame of the driving video could be decoded; the file is empty or damaged.")
    return np.stack(frames), fps, cut


def densepose_extractor(model: str | Path, device: str = "auto") -> Extractor:
    """Load the DensePose model now (once, like the other models); the result extracts one video per call."""
    from ..densepose import extract_motion, load_extractor

    loaded = load_extractor(model, device=device)

    def extract(video: Path, size: int, max_frames: int) -> tuple[np.ndarray, float]:
        return extract_motion(video, model=loaded, size=size, max_frames=max_frames, progress=False)

    return extract


class Animator:
    """The loaded pipeline plus a private scratch folder; turns one request into output files.

    Output files are named by the server (``run-<uuid>/animation.mp4``), never after anything the user sent. Runs
    older than ``limits.keep_seconds`` are swept at the start of each run, and :meth:`close` removes everything.
    """

    def __init__(self, pipeline, limits: Limits | None = None, extractor: Extractor | None = None):
        self.pipeline = pipeline
        self.limits = limits or Limits()
        self.extractor = extractor
        self.workdir = Path(tempfile.mkdtemp(prefix="magicanimate-demo-"))
        self._lock = threading.Lock()  # the pipeline is not re-entrant; the queue already serialises runs

    def run(
        self,
        reference: Image.Image | np.ndarray,
        driving: str | Path,
        settings: dict,
        *,
        driving_kind: str = "auto",
        max_frames: int | None = None,
        grid: bool = False,
        preview: bool = False,
        progress: Progress | None = None,
        warn: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> RunResult:
        """Animate ``reference`` with the uploaded ``driving`` video; ``settings`` are keys of animation.yaml.

        ``warn`` is told at once about things the user should know but that do not stop the run (a clip cut to the
        frame limit); the same messages end up in ``RunResult.warnings``.
        """
        progress = progress or (lambda desc, done, total: None)
        if reference is None:
            raise InputError("Upload a reference image of the person to animate.")
        if driving is None:
            raise InputError("Upload a driving video (DensePose, or a video of a person).")
        self.sweep()
        limit = self.limits.max_frames
        wanted = min(int(max_frames), limit) if max_frames else limit
        total = int(settings["steps"])
        progress("reading video", 0, total)
        frames, fps, cut = read_driving(driving, int(settings["size"]), wanted)
        result_warnings = []
        if cut and wanted == limit:
            result_warnings.append(
                f"The driving video is longer than this demo's limit of {limit} frames ({limit / fps:.1f} s): "
                f"only the first {limit} are animated. Use `magicanimate animate` for longer clips."
            )
            if warn is not None:
                warn(result_warnings[-1])
        raw = driving_kind == "raw" or (driving_kind == "auto" and not looks_like_densepose(frames))
        if raw and self.extractor is None:
            raise InputError(RAW_VIDEO_MESSAGE)

        def on_step(step: int, total: int) -> None:
            if cancel is not None and cancel.is_set():
                raise Cancelled
            progress("denoising", step, total)

        if isinstance(reference, np.ndarray):
            reference = Image.fromarray(reference)
        reference = reference.convert("RGB")
        with self._lock:  # the models (the DensePose one too) serve one request at a time
            if raw:
                progress("extracting DensePose", 0, total)
                frames, fps = self.extractor(Path(driving), int(settings["size"]), wanted)
            video = animate(reference, frames, pipeline=self.pipeline, progress=on_step, fps=fps, **settings)
        video.audio = Path(driving) if has_audio(driving) else None
        progress("writing video", total, total)
        run_dir = self.workdir / f"run-{uuid.uuid4().hex}"
        result = RunResult(animation=video.save(run_dir / "animation.mp4"), warnings=result_warnings)
        height, width = video.frames.shape[1:3]
        if grid:
            sized = np.asarray(reference.resize((width, height), Image.BICUBIC))
            panels = Video(grid_frames(sized, frames, video.frames), fps, video.audio)
            result.grid = panels.save(run_dir / "grid.mp4")
        if preview:
            result.preview = Video(frames, fps).save(run_dir / "densepose.mp4")
        return result

    def sweep(self) -> None:
        """Delete runs older than ``keep_seconds`` (their files were copied into Gradio's cache long ago)."""
        cutoff = time.time() - self.limits.keep_seconds
        for run_dir in self.workdir.glob("run-*"):
            if run_dir.stat().st_mtime < cutoff:
                shutil.rmtree(run_dir, ignore_errors=True)

    def close(self) -> None:
        """Remove the scratch folder and everything in it."""
        shutil.rmtree(self.workdir, ignore_errors=True)
