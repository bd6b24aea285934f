"""One call from files to a video: ``magicanimate.animate(reference, motion, **settings)``.

The settings are those of :mod:`magicanimate.settings` (the CLI's flags and the keys of ``configs/animation.yaml``,
same names). A raw video of a person goes in ``driving=`` instead of ``motion=``: its DensePose is extracted first,
the same way for the CLI, batch jobs and the demo. Scripts that animate many clips load the pipeline once with
:func:`load_pipeline` and pass it in.
"""

import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .io import VideoWriter, load_image, read_video, write_gif, write_png_frames
from .io.image import MIN_SIDE
from .io.output import output_kind
from .io.video import has_audio
from .loading import call_arguments, load_pipeline
from .settings import frame_size, load_config

__all__ = ["Video", "animate", "estimate_seconds", "grid_frames", "load_pipeline"]

log = logging.getLogger("magicanimate")

# Clips longer than this get a warning with the expected time.
LONG_CLIP_FRAMES = 300
# Rough cost of one frame and one denoising step at 512x512 (guidance, ControlNet and reference included): the
# original takes 0.57 s per frame for 25 steps on an H100 in float16 (shared/docs/performance-anchor.md); on a CPU
# the same step is about 4.2 TFLOP, done at very roughly 50 GFLOP/s per core.
GPU_SECONDS_PER_FRAME_STEP = 0.025
CPU_FLOP_PER_FRAME_STEP = 4.2e12
CPU_FLOPS_PER_THREAD = 5e10


@dataclass
class Video:
    """Frames ``(F, H, W, 3)`` uint8 RGB at ``fps``; ``audio`` is a file whose sound track goes into saved mp4s
    (the driving video's, set by :func:`animate`; ``None`` for a silent video). From :func:`animate`, ``motion`` is
    the DensePose sequence the animation followed (the one given, or the one extracted from a driving video)."""

    frames: np.ndarray
    fps: float
    audio: Path | None = None
    motion: np.ndarray | None = None

    def save(self, path: str | Path, crf: int = 18) -> Path:
        """Write ``.mp4`` (H.264 + AAC audio when there is ``audio``; plays in browsers), ``.gif``, or PNG frames into
        a folder (no suffix). Whatever the kind, the output appears only when complete, so an interrupted save
        never leaves a half-written file that looks finished."""
        path = Path(path)
        kind = output_kind(path)
        if kind == ".mp4":
            with VideoWriter(path, fps=self.fps, crf=crf, audio_from=self.audio) as writer:
                for frame in self.frames:
                    writer.write(frame)
        elif kind == ".gif":
            write_gif(path, self.frames, fps=self.fps)
        else:
            write_png_frames(path, self.frames)
        return path


def grid_frames(reference: np.ndarray, motion: np.ndarray, result: np.ndarray) -> np.ndarray:
    """``reference | motion | result`` side by side."""
    return np.concatenate([np.broadcast_to(reference, result.shape), motion, result], axis=2)


def estimate_seconds(num_frames: int, steps: int, height: int, width: int, device: str, guidance: bool) -> float:
    """A rough time for the denoising on ``device`` (a GPU of the H100 class, or this machine's CPU threads)."""
    frame_steps = num_frames * steps * height * width / 512**2 * (1.0 if guidance else 0.55)
    if device.startswith("cuda"):
        return frame_steps * GPU_SECONDS_PER_FRAME_STEP
    import torch

    return frame_steps * CPU_FLOP_PER_FRAME_STEP / (CPU_FLOPS_PER_THREAD * torch.get_num_threads())


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def read_motion(motion, max_frames: int | None) -> tuple[np.ndarray, float, str]:
    """``(frames, fps, name)`` of a DensePose motion given as a video path, frames or a list of images."""
    if isinstance(motion, (str, os.PathLike)):
        frames, fps = read_video(motion, max_frames=max_frames)
        return frames, fps, os.fspath(motion)
    if isinstance(motion, (list, tuple)):
        motion = np.stack([np.asarray(load_image(frame)) for frame in motion]) if motion else np.zeros((0,))
    frames = np.asarray(motion)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0 or frames.dtype != np.uint8:
        raise InputError(
            f"motion frames must be a non-empty uint8 array (F, H, W, 3), got {frames.dtype} {frames.shape}"
        )
    return frames[:max_frames], 25.0, "the motion frames"


def animate(
    reference,
    motion=None,
    *,
    driving=None,
    densepose_model=None,
    align_to_reference: bool = False,
    pipeline=None,
    config: str | Path | dict | None = None,
    progress: Callable[[int, int], None] | None = None,
    **settings,
) -> Video:
    """Animate ``reference`` (path, PIL image or array) with a motion: ``motion`` is a DensePose video (path,
    ``(F, H, W, 3)`` uint8 frames, or a list of images); ``driving`` instead is a raw video of a person, whose
    DensePose is extracted first with ``densepose_model`` (a TorchScript file, a loaded extractor, or ``None`` for
    ``$MAGICANIMATE_DENSEPOSE_MODEL`` / the hub file), optionally ``align_to_reference`` (the motion scaled and
    centred onto the person in the photo).

    ``settings`` are the keys of ``configs/animation.yaml`` (``steps=25``, ``guidance_scale=7.5``, ``seed=1``,
    ``size=512``, ``grid=False``, ...); ``config`` is a YAML file or mapping of them. ``progress(step, total)`` is
    called after every denoising step. The result keeps the motion's frame count and frame rate (unless ``fps`` is
    set) and, when the motion or driving video has a sound track and the frame rate is kept, its audio.

    Raises:
        InputError: a bad setting or input (checked before any model loads). CheckpointError: unusable weights.
        ResourceError: out of memory or disk, NaN latents.
    """
    config = load_config(config, **settings)
    if (motion is None) == (driving is None):
        raise InputError("give exactly one of motion (a DensePose video) and driving (a video of a person)")
    if align_to_reference and driving is None:
        raise InputError("align_to_reference works on a driving video (a video of a person), not on DensePose motion")
    if pipeline is None:
        from .devices import resolve_device

        resolve_device(config.device, config.dtype)  # an unusable device fails before anything is read
    reference = load_image(reference, min_side=MIN_SIDE)
    source = driving if driving is not None else motion
    audio = Path(source) if isinstance(source, (str, os.PathLike)) and has_audio(source) else None
    if driving is not None:
        from .densepose import extract_motion
        from .io.files import check_readable

        check_readable(driving, "driving video")
        log.info(f"extracting DensePose from {os.fspath(driving)}")
        frames, motion_fps = extract_motion(
            driving,
            model=densepose_model,
            size=config.size or 512,
            fps=25.0,  # the checkpoints' rate; the duration (and so the sound) is kept
            align_to=reference if align_to_reference else None,
            max_frames=config.max_frames,
            device=config.device,
            progress=progress is None,  # a caller with its own progress display gets no terminal bar
        )
    else:
        frames, motion_fps, name = read_motion(motion, config.max_frames)
        if config.check_motion:
            from .densepose.palette import check_motion

            check_motion(frames, name)
    if config.fps is not None and config.fps != motion_fps:
        audio = None  # a resampled clip no longer lines up with the sound
    height, width = frame_size(*frames.shape[1:3], config.size)
    if pipeline is None:
        from .loading import locate_weights

        locate_weights(config)  # a missing checkpoint fails before the plan and the long loading
    _tell_plan(len(frames), height, width, config, pipeline)
    pipe = pipeline if pipeline is not None else load_pipeline(config)

    import torch

    from .distributed import is_distributed  # imports torch: only once the inputs are known to be good
    from .pipelines.schedulers import scheduler_for_call

    def on_step(pipe, step, timestep, tensors):
        if progress is not None:
            progress(step + 1, config.steps)
        return tensors

    # The scheduler setting holds for this call only: batch jobs and the demo share one pipeline.
    with scheduler_for_call(pipe, config.scheduler):
        result = pipe(
            reference,
            frames,
            height=height,
            width=width,
            generator=torch.Generator(pipe._execution_device).manual_seed(config.seed),
            callback_on_step_end=on_step,
            distributed=is_distributed(),
            **call_arguments(config, pipe),
        ).frames
    video = (result * 255).round().astype(np.uint8)
    if config.grid:
        sized_reference = np.asarray(reference.resize((width, height)))
        video = grid_frames(sized_reference, pipe.resize_frames(frames, height, width), video)
    return Video(frames=video, fps=config.fps or motion_fps, audio=audio, motion=frames)


def _tell_plan(num_frames: int, height: int, width: int, config, pipeline) -> None:
    """Log the work ahead in one line (and warn when the size was rounded or the clip is long)."""
    from .pipelines.context_windows import context_windows

    if config.size is not None and min(height, width) != config.size:
        warnings.warn(
            f"size {config.size} is not a multiple of 8 (the VAE's factor): the output is {width}x{height}",
            stacklevel=3,
        )
    padded = -(-num_frames // config.context_frames) * config.context_frames
    windows = len(context_windows(padded, config.context_frames, config.context_overlap, config.context_schedule))
    device = str(pipeline.device) if pipeline is not None else config.device
    if device == "auto":
        from .devices import resolve_device

        device = str(resolve_device(config.device, config.dtype)[0])
    guidance = config.guidance_scale > 1
    seconds = estimate_seconds(num_frames, config.steps, height, width, device, guidance)
    log.info(
        f"animating {num_frames} frames at {width}x{height}: {windows} window(s) of {config.context_frames}, "
        f"{config.steps} steps, guidance {config.guidance_scale:g}, on {device}; roughly {_duration(seconds)}"
        + (" (a CPU is slow: the preview preset is a quicker first look)" if device == "cpu" and seconds > 600 else "")
    )
    if num_frames > LONG_CLIP_FRAMES:
        warnings.warn(
            f"the motion has {num_frames} frames: expect roughly {_duration(seconds)}; use max_frames to animate "
            "only the start",
            stacklevel=3,
        )
