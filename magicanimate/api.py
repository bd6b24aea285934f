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
import PIL.Image

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
    the DensePose sequence the animation followed (the one given, or the one extracted from a driving video), and
    ``reference`` the photo generated from the ``prompt`` setting (``None`` when a photo was given; the CLI and
    batch save it as ``NAME.reference.png``)."""

    frames: np.ndarray
    fps: float
    audio: Path | None = None
    motion: np.ndarray | None = None
    reference: PIL.Image.Image | None = None

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


def estimate_seconds(
    num_frames: int, steps: int, height: int, width: int, device: str, guidance: bool, work: float = 1.0
) -> float:
    """A rough time for the denoising on ``device`` (a GPU of the H100 class, or this machine's CPU threads);
    ``work``: the settings' share of a plain guided step's work (:func:`step_work`)."""
    frame_steps = num_frames * steps * height * width / 512**2 * (1.0 if guidance else 0.55) * work
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
    reference=None,
    motion=None,
    *,
    driving=None,
    densepose_model=None,
    align_to_reference: bool = False,
    pipeline=None,
    config: str | Path | dict | None = None,
    progress: Callable[[int, int], None] | None = None,
    reference_end=None,
    references=None,
    **settings,
) -> Video:
    """Animate ``reference`` (path, PIL image or array; or ``None`` with the ``prompt`` setting: the photo is then
    generated from that text first, at the motion's aspect ratio) with a motion: ``motion`` is a DensePose video (path,
    ``(F, H, W, 3)`` uint8 frames, or a list of images); ``driving`` instead is a raw video of a person, whose
    DensePose is extracted first with ``densepose_model`` (a TorchScript file, a loaded extractor, or ``None`` for
    ``$MAGICANIMATE_DENSEPOSE_MODEL`` / the hub file), optionally ``align_to_reference`` (the motion scaled and
    centred onto the person in the photo).

    ``settings`` are the keys of ``configs/animation.yaml`` (``steps=25``, ``guidance_scale=7.5``, ``seed=1``,
    ``size=512``, ``grid=False``, ...); ``config`` is a YAML file or mapping of them. ``progress(step, total)`` is
    called after every denoising step of every stage (the photo from a prompt, the animation, the refine pass) with
    the steps done so far and in all (:func:`denoising_steps`). The result keeps the motion's frame count and frame
    rate (unless ``fps`` is set) and, when the motion or driving video has a sound track and the frame rate is kept,
    its audio; with ``refine_size`` it is at that size. With ``frame_stride`` k > 1 only every k-th motion frame
    (and the last) is animated and the frames between are interpolated, guided by their DensePose; ``interpolator``
    is the setting's name or an interpolator object (see :mod:`magicanimate.interpolation`).

    Keyframes: ``reference_end`` is a second photo the clip ends at (its last frame shows that look: another outfit,
    the person's back, ...); ``references`` a list of ``(frame, photo)`` pairs along the clip (motion frame indices,
    from 0; ``reference``, if given, is the one at frame 0). Every step then blends a forward estimate with a
    time-reversed one, each attending to its keyframe (see :mod:`magicanimate.pipelines.keyframes`): about twice the
    UNet work, whatever the number of keyframes; ``keyframe_blend`` shapes the blend.

    Raises:
        InputError: a bad setting or input (checked before any model loads). CheckpointError: unusable weights.
        ResourceError: out of memory or disk, NaN latents.
    """
    # The interpolator setting is a name; the API also takes an interpolator object (see magicanimate.interpolation).
    plug_in = settings.pop("interpolator") if not isinstance(settings.get("interpolator", ""), str) else None
    config = load_config(config, **settings)
    if (motion is None) == (driving is None):
        raise InputError("give exactly one of motion (a DensePose video) and driving (a video of a person)")
    if align_to_reference and driving is None:
        raise InputError("align_to_reference works on a driving video (a video of a person), not on DensePose motion")
    keyframes = read_keyframes(references, reference_end)
    check_reference_source(reference, config, align_to_reference, keyframes)
    interpolator = None
    if config.frame_stride > 1:  # found (or refused) before anything is read or loaded
        from .interpolation import load_interpolator

        interpolator = load_interpolator(plug_in if plug_in is not None else config.interpolator)
    if pipeline is None:
        from .devices import resolve_device

        resolve_device(config.device, config.dtype)  # an unusable device fails before anything is read
    if reference is not None:
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
            align_to=(reference if reference is not None else keyframes[0][1]) if align_to_reference else None,
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
    motion_frames = frames  # all of them: the interpolation's guide, the grid's panel, Video.motion
    if interpolator is not None:
        from .interpolation import stride_indices
        from .interpolation.protocol import interpolator_name

        keep = stride_indices(len(frames), config.frame_stride)
        keep = sorted(set(keep) | {frame for frame, _ in keyframes if frame is not None and frame < len(frames)})
        frames = frames[keep]  # the stages below animate only these
        log.info(
            f"frame_stride {config.frame_stride}: {len(keep)} of the {len(motion_frames)} frames are animated, the "
            f"others interpolated ({interpolator_name(interpolator)})"
        )
    # Keyframes as frames of the animated clip (every motion frame, or those that frame_stride keeps), checked
    # before any model loads.
    kept = {frame: k for k, frame in enumerate(keep)} if interpolator is not None else None
    keyframe_arguments = {"keyframes": keyframe_pairs(keyframes, len(motion_frames), kept)} if keyframes else {}
    height, width = frame_size(*frames.shape[1:3], config.size)
    if pipeline is None:
        from .loading import locate_weights

        locate_weights(config)  # a missing checkpoint fails before the plan and the long loading
    elif config.prompt is not None:
        from .loading import locate_prompt_weights, tree_root

        locate_prompt_weights(config, tree_root(config, pipeline))  # before the work, as locate_weights does
    _tell_plan(len(frames), height, width, config, pipeline, keyframes=len(keyframes) + (reference is not None))
    pipe = pipeline if pipeline is not None else load_pipeline(config)

    import torch

    from .distributed import is_distributed  # imports torch: only once the inputs are known to be good
    from .pipelines.schedulers import scheduler_for_call

    total, done = denoising_steps(config), [0]

    def tell(step: int) -> None:  # every stage's steps, counted on from the stages before
        if progress is not None:
            progress(done[0] + step + 1, total)

    def on_step(pipe, step, timestep, tensors):
        tell(step)
        return tensors

    generated = None
    if config.prompt is not None:
        from .loading import load_prompt_stage

        generated = load_prompt_stage(pipe, config)(
            config.prompt,
            height=height,
            width=width,
            negative_prompt=config.negative_prompt,
            steps=config.prompt_steps,
            guidance=config.prompt_guidance,
            seed=config.seed,
            on_step=tell,
        )
        reference, done[0] = generated, config.prompt_steps
    arguments = {**call_arguments(config, pipe), **keyframe_arguments}
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
            **arguments,
        ).frames
        if config.refine_size is not None:
            from .stages.refine import refine_video

            done[0] += config.steps
            height, width = frame_size(height, width, config.refine_size)  # as the plan says
            result = refine_video(
                pipe,
                result,
                reference,
                frames,
                height=height,
                width=width,
                strength=config.refine_strength,
                steps=config.refine_steps or config.steps,
                generator=torch.Generator(pipe._execution_device).manual_seed(config.seed),
                callback_on_step_end=on_step,
                distributed=is_distributed(),
                **arguments,
            )
    video = (result * 255).round().astype(np.uint8)
    if interpolator is not None:
        from .interpolation import fill_frames

        frames = motion_frames
        video = fill_frames(video, keep, len(frames), interpolator, motion=frames, progress=progress is None)
    if config.grid:
        first_photo = reference if reference is not None else keyframes[0][1]
        sized_reference = np.asarray(first_photo.resize((width, height)))
        video = grid_frames(sized_reference, pipe.resize_frames(frames, height, width), video)
    return Video(frames=video, fps=config.fps or motion_fps, audio=audio, motion=frames, reference=generated)


def read_keyframes(references, reference_end) -> list[tuple[int | None, PIL.Image.Image]]:
    """The keyframe photos, loaded and checked: ``references`` (``(frame, photo)`` pairs) and ``reference_end``
    (frame ``None``: the clip's last, known once the motion is read). One-line :class:`InputError` otherwise."""
    pairs = []
    for item in references or []:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise InputError(f"references must be (frame, photo) pairs, got {item!r:.80}")
        frame, photo = item
        if isinstance(frame, bool) or not isinstance(frame, int) or frame < 0:
            raise InputError(f"a keyframe's frame must be a motion frame index (0, 1, ...), got {frame!r}")
        pairs.append((frame, load_image(photo, min_side=MIN_SIDE)))
    if reference_end is not None:
        pairs.append((None, load_image(reference_end, min_side=MIN_SIDE)))
    return pairs


def keyframe_pairs(keyframes, num_frames: int, kept: dict[int, int] | None) -> list[tuple[int, PIL.Image.Image]]:
    """``(frame of the animated clip, photo)`` for the pipeline: ``None`` (``reference_end``) is the last frame, and
    with ``frame_stride`` the motion frame's index among the animated ones (``kept``)."""
    pairs = []
    for frame, photo in keyframes:
        frame = num_frames - 1 if frame is None else frame
        if frame >= num_frames:
            raise InputError(f"a keyframe at frame {frame}, but the motion has {num_frames} frames (0 to "
                             f"{num_frames - 1})")  # fmt: skip
        pairs.append((kept[frame] if kept is not None else frame, photo))
    return pairs


def check_reference_source(reference, config, align_to_reference: bool = False, keyframes=()) -> None:
    """Exactly one of a reference photo and the ``prompt`` setting (a non-empty text), or :class:`InputError`. With
    ``keyframes`` (``references`` / ``reference_end``) the first photo may also come from them alone; the photo for
    ``align_to_reference`` is then the first keyframe's."""
    from .settings import SettingError

    if config.prompt is not None and not config.prompt.strip():
        raise SettingError("prompt", "setting prompt must describe the person to generate, got an empty text")
    if reference is not None and config.prompt is not None:
        raise InputError("give exactly one of reference (a photo of the person) and prompt (a description to "
                         "generate the photo from), not both")  # fmt: skip
    if reference is None and config.prompt is None and not keyframes:
        raise InputError(
            "give exactly one of reference (a photo of the person) and prompt (a description to generate the photo "
            "from)"
        )
    if align_to_reference and reference is None and not (keyframes and config.prompt is None):
        raise InputError(
            "align_to_reference fits the motion to the person in a reference photo; with a prompt the photo is "
            "generated to fit the motion instead: leave align_to_reference out"
        )


def denoising_steps(config) -> int:
    """All the denoising steps of an animation under ``config``: the photo's from a prompt, the animation's, and
    those the refine pass runs; what ``progress(step, total)`` counts to."""
    from .stages.refine import refine_steps_run

    total = config.steps + (config.prompt_steps if config.prompt is not None else 0)
    if config.refine_size is not None:
        total += refine_steps_run(config.refine_steps or config.steps, config.refine_strength)
    return total


# Work of a step relative to a guided one at full size (benchmarks/RESULTS.md, FLOPs at 64 frames): a step with the
# conditional branch alone, and a step that reuses the cached deep features (cache_interval).
UNGUIDED_STEP_WORK = 0.61
CACHED_STEP_WORK = 0.43


def step_work(config, keyframes: int = 0) -> float:
    """The average work of the run's steps under ``config``, relative to guided full steps: the guidance interval,
    feature reuse and keyframes (two estimates per step) as the pipeline runs them."""
    steps = config.steps
    work = 0.0
    for i in range(steps):
        unguided = config.guidance_scale > 1 and not config.guidance_start <= i / steps < config.guidance_end
        cost = UNGUIDED_STEP_WORK if unguided else 1.0
        work += cost * (CACHED_STEP_WORK if i % config.cache_interval else 1.0)
    return work / steps * (2.0 if keyframes > 1 else 1.0)


def _tell_plan(num_frames: int, height: int, width: int, config, pipeline, keyframes: int = 0) -> None:
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
    seconds = estimate_seconds(num_frames, config.steps, height, width, device, guidance, step_work(config, keyframes))
    stages = ""
    if config.prompt is not None:  # one picture: about one frame's worth of steps (an upper bound)
        seconds += estimate_seconds(1, config.prompt_steps, height, width, device, config.prompt_guidance > 1)
        stages += f" from a photo generated from the prompt ({config.prompt_steps} steps)"
    refine = ""
    if config.refine_size is not None:
        from .stages.refine import refine_steps_run

        refine_height, refine_width = frame_size(height, width, config.refine_size)
        if min(refine_height, refine_width) != config.refine_size:
            warnings.warn(
                f"refine_size {config.refine_size} is not a multiple of 8 (the VAE's factor): the refined output is "
                f"{refine_width}x{refine_height}",
                stacklevel=3,
            )
        schedule = config.refine_steps or config.steps
        run = refine_steps_run(schedule, config.refine_strength)
        seconds += estimate_seconds(num_frames, run, refine_height, refine_width, device, guidance)
        refine = (
            f"; then refined at {refine_width}x{refine_height}: {run} of {schedule} steps (strength "
            f"{config.refine_strength:g})"
        )
    log.info(
        f"animating {num_frames} frames at {width}x{height}{stages}: {windows} window(s) of {config.context_frames}, "
        f"{config.steps} steps, guidance {config.guidance_scale:g}, on {device}{refine}; roughly {_duration(seconds)}"
        + (" (a CPU is slow: the preview preset is a quicker first look)" if device == "cpu" and seconds > 600 else "")
    )
    if num_frames > LONG_CLIP_FRAMES:
        warnings.warn(
            f"the motion has {num_frames} frames: expect roughly {_duration(seconds)}; use max_frames to animate "
            "only the start",
            stacklevel=3,
        )
