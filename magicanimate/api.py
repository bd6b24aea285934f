"""One call from files to a video: ``magicanimate.animate(reference, motion, **settings)``.

The settings are those of ``configs/animation.yaml`` (the CLI's flags, same names). Scripts that animate many
clips load the pipeline once with :func:`load_pipeline` and pass it in.
"""

import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from .config import load_config
from .errors import CheckpointError, InputError
from .io import VideoWriter, load_image, read_video, write_gif, write_png_frames
from .io.image import MIN_SIDE
from .io.video import has_audio

PIECE_KEYS = (
    "pretrained_model_path",
    "pretrained_vae_path",
    "pretrained_appearance_encoder_path",
    "pretrained_controlnet_path",
    "motion_module",
)
VIDEO_SUFFIXES = (".mp4", ".gif", "")  # "" = a folder of PNG frames
_FRAME_NAME = re.compile(r"\d{5}\.png")
# Below this share of pixels near the DensePose palette a --motion video is refused (renderings score 0.93-0.97
# even after H.264, photos and ordinary videos under 0.3).
MOTION_PALETTE_SHARE = 0.5
# Clips longer than this get a warning with the expected time; SECONDS_PER_FRAME_STEP is a rough figure for one
# frame and one denoising step at 512x512 in float16 on a recent GPU (guidance, ControlNet and reference included).
LONG_CLIP_FRAMES = 300
SECONDS_PER_FRAME_STEP = 0.1


@dataclass
class Video:
    """Frames ``(F, H, W, 3)`` uint8 RGB at ``fps``; ``audio`` is a file whose sound track goes into saved mp4s
    (the driving video's, set by :func:`animate`; ``None`` for a silent video)."""

    frames: np.ndarray
    fps: float
    audio: Path | None = None

    def save(self, path: str | Path, crf: int = 18) -> Path:
        """Write ``.mp4`` (H.264 + AAC audio when there is ``audio``; plays in browsers), ``.gif``, or PNG frames into
        a folder (no suffix). Whatever the kind, the output appears only when complete, so an interrupted save
        never leaves a half-written file that looks finished."""
        path = Path(path)
        suffix = check_output_path(path)
        if suffix == ".mp4":
            with VideoWriter(path, fps=self.fps, crf=crf, audio_from=self.audio) as writer:
                for frame in self.frames:
                    writer.write(frame)
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial{suffix}")
        try:
            if suffix == ".gif":
                write_gif(temp, self.frames, fps=self.fps)
                os.replace(temp, path)
            else:
                write_png_frames(temp, self.frames)
                _replace_frame_folder(temp, path)
        finally:
            if temp.is_dir():
                shutil.rmtree(temp)
            elif temp.exists():
                temp.unlink()
        return path


def _replace_frame_folder(new: Path, path: Path) -> None:
    """Move the finished folder ``new`` to ``path``, replacing an earlier frame folder but never other files."""
    if path.exists():
        if not path.is_dir() or any(not _FRAME_NAME.fullmatch(entry.name) for entry in path.iterdir()):
            raise InputError(f"{path} exists and is not a folder of PNG frames; choose another output")
        shutil.rmtree(path)
    os.replace(new, path)


def looks_like_densepose(frames: np.ndarray, threshold: float = 0.8) -> bool:
    """Whether ``frames`` ``(F, H, W, 3)`` are a DensePose video rather than a raw video of a person.

    MagicAnimate's DensePose videos are drawn only in the 25 viridis part colours, so about 0.93-0.97 of their pixels
    lie near one even after H.264; photos and ordinary videos score under 0.05 (see
    :func:`magicanimate.densepose.palette_share`). Up to 8 frames spread over the clip are checked.
    """
    from .densepose.palette import palette_share

    frames = np.asarray(frames)
    sample = frames[:: max(1, len(frames) // 8)][:8]
    stride = max(1, min(frames.shape[1:3]) // 128)
    return float(np.mean([palette_share(frame, stride=stride) for frame in sample])) >= threshold


def check_motion(frames: np.ndarray, name: str = "the motion") -> None:
    """Refuse motion frames that are not a DensePose rendering (a raw video of a person passed as motion).

    Raises:
        InputError: on average fewer than :data:`MOTION_PALETTE_SHARE` of the pixels of up to 8 frames spread over
            the clip lie near the DensePose palette.
    """
    from .densepose.palette import palette_share

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        return  # not frames at all: the pipeline's own check names the problem
    sample = frames[:: max(1, len(frames) // 8)][:8]
    stride = max(1, min(frames.shape[1:3]) // 128)
    share = float(np.mean([palette_share(frame, stride=stride) for frame in sample]))
    if share < MOTION_PALETTE_SHARE:
        raise InputError(
            f"{name} is not a DensePose video (only {share:.0%} of its pixels have DensePose colours, renderings have "
            "over 90%); for a video of a person use --driving instead of --motion (or `magicanimate densepose` first)"
        )


def warn_if_long(num_frames: int, steps: int, height: int, width: int) -> None:
    """Warn, with a rough time estimate, before animating a clip longer than :data:`LONG_CLIP_FRAMES`."""
    if num_frames <= LONG_CLIP_FRAMES:
        return
    minutes = num_frames * steps * SECONDS_PER_FRAME_STEP * height * width / 512**2 / 60
    warnings.warn(
        f"the motion has {num_frames} frames: at {steps} steps and {width}x{height} expect roughly {minutes:.0f} min "
        "on a recent GPU (much longer on CPU); use --max-frames to animate only the start",
        stacklevel=3,
    )


DTYPES = ("auto", "float16", "bfloat16", "float32")


def check_settings(config) -> None:
    """Refuse settings that cannot work, before anything is read or loaded (the pipeline checks them again)."""
    from .config import default_config

    for key, default in default_config().items():
        value, numeric = config[key], (int, float)
        if key in ("size", "max_frames", "fps"):  # may be null
            if value is None:
                continue
            default = 0
        if isinstance(default, bool) and not isinstance(value, bool):
            raise InputError(f"setting {key} must be true or false, got {value!r}")
        if isinstance(default, numeric) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, numeric):
                raise InputError(f"setting {key} must be a number, got {value!r}")
    if config.dtype not in DTYPES:
        raise InputError(f"dtype must be {', '.join(DTYPES)}, got {config.dtype!r} (--dtype)")
    if config.steps < 1:
        raise InputError(f"steps must be at least 1, got {config.steps} (--steps)")
    if config.size is not None and config.size < 8:
        raise InputError(f"size must be at least 8, got {config.size} (--size)")
    if config.max_frames is not None and config.max_frames < 1:
        raise InputError(f"max_frames must be at least 1, got {config.max_frames} (--max-frames)")
    if config.context_frames < 1 or not 0 <= config.context_overlap < config.context_frames:
        raise InputError(
            f"context_overlap ({config.context_overlap}) must be at least 0 and smaller than context_frames "
            f"({config.context_frames}) (--context-overlap, --context-frames)"
        )
    if config.context_schedule not in ("uniform", "sliding"):
        raise InputError(f"context_schedule must be 'uniform' or 'sliding', got {config.context_schedule!r}")
    if config.fps is not None and config.fps <= 0:
        raise InputError(f"fps must be positive, got {config.fps} (--fps)")


def check_overwrite(path: str | Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless ``overwrite`` (the CLI's ``--overwrite``)."""
    if not overwrite and os.path.lexists(path):
        raise InputError(f"{path} already exists; pass --overwrite to replace it, or choose another output")


def check_output_path(path: str | Path) -> str:
    """The output kind by suffix; fails before any work is done if it is not one we write."""
    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise InputError(f"output must end in .mp4 or .gif (or have no suffix for PNG frames), got {Path(path).name}")
    return suffix


def output_size(height: int, width: int, size: int | None) -> tuple[int, int]:
    """Scale ``height x width`` so the shorter side is ``size``, both multiples of 8 (the VAE's factor)."""
    if size is None:
        return height // 8 * 8, width // 8 * 8
    scale = size / min(height, width)
    return max(8, round(height * scale / 8) * 8), max(8, round(width * scale / 8) * 8)


def resolve_device(config):
    """``(device, dtype)`` from the ``device``/``dtype`` settings (auto: CUDA in float16 when present)."""
    import torch

    cuda = torch.cuda.is_available()
    device = ("cuda" if cuda else "cpu") if config.device == "auto" else config.device
    names = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    if config.dtype == "auto":
        return device, torch.float16 if device.startswith("cuda") else torch.float32
    if config.dtype not in names:
        raise InputError(f"dtype must be auto, float16, bfloat16 or float32, got {config.dtype!r}")
    return device, names[config.dtype]


def load_pipeline(config: DictConfig | str | Path | None = None, **settings):
    """The pipeline for the configured checkpoints; the default tree is fetched on first use when online."""
    from .weights import EXPECTED_TREE, default_pretrained_dir, ensure_weights, missing_weights

    if not isinstance(config, DictConfig):
        config = load_config(config, **settings)
    pieces = {key: config[key] for key in PIECE_KEYS if config[key]}
    root = Path(config.pretrained) if config.pretrained else default_pretrained_dir()
    converted = (root / "model_index.json").is_file()  # a tree written by `magicanimate convert`
    if len(pieces) < len(PIECE_KEYS) and not converted:
        if config.pretrained is None:
            ensure_weights(root, download=True)
        elif missing := missing_weights(root):
            raise CheckpointError(
                f"incomplete checkpoint tree, missing {', '.join(missing)} in {root}; {EXPECTED_TREE.format(root=root)}"
                f"; run 'magicanimate download --to {root}' or see pretrained/README.md"
            )
    from .pipelines import MagicAnimatePipeline

    device, dtype = resolve_device(config)
    with quiet_loading():
        pipe = MagicAnimatePipeline.from_pretrained(
            root, **pieces, motion_only=config.motion_only, fusion_blocks=config.fusion_blocks, torch_dtype=dtype
        ).to(device)
    return apply_speed_settings(pipe, config)


@contextmanager
def quiet_loading():
    """No per-tensor "Loading weights" progress bars from transformers (seconds of noise, and lines in front of an
    error message when a checkpoint is broken)."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def apply_speed_settings(pipe, config):
    """The speed switches of ``configs/animation.yaml`` that change how the models run, not what they compute."""
    import torch

    if config.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.controlnet.to(memory_format=torch.channels_last)
    if config.motion_attention == "bmm":
        # Sequence length 16 with a huge batch: two batched GEMMs can beat fused SDPA kernels (the original's path).
        from diffusers.models.attention_processor import AttnProcessor

        processors = pipe.unet.attn_processors
        pipe.unet.set_attn_processor(
            {name: AttnProcessor() if "motion_modules" in name else proc for name, proc in processors.items()}
        )
    elif config.motion_attention != "sdpa":
        raise InputError(f"motion_attention must be sdpa or bmm, got {config.motion_attention!r}")
    if config.compile:
        pipe.unet = torch.compile(pipe.unet)
    return pipe


def grid_frames(reference: np.ndarray, motion: np.ndarray, result: np.ndarray) -> np.ndarray:
    """``reference | motion | result`` side by side."""
    return np.concatenate([np.broadcast_to(reference, result.shape), motion, result], axis=2)


def animate(
    reference,
    motion,
    *,
    pipeline=None,
    config: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    **settings,
) -> Video:
    """Animate ``reference`` (path, PIL image or array) with ``motion`` (DensePose video path or uint8 frames).

    ``settings`` are the keys of ``configs/animation.yaml`` (``steps=25``, ``guidance_scale=7.5``, ``seed=1``,
    ``size=512``, ``grid=False``, ...); ``config`` is a YAML file of them. ``progress(step, total)`` is called after
    every denoising step. The result keeps the motion's frame count and frame rate (unless ``fps`` is set) and, when
    the motion video has a sound track and the frame rate is kept, its audio (``Video.audio``).
    """
    config = load_config(config, **settings)
    check_settings(config)
    reference = load_image(reference, min_side=MIN_SIDE)
    audio = None
    name = "the motion frames"
    if isinstance(motion, (str, Path)):
        name = os.fspath(motion)
        audio = Path(motion) if has_audio(motion) else None
        motion, motion_fps = read_video(motion, max_frames=config.max_frames)
    else:
        motion, motion_fps = np.asarray(motion)[: config.max_frames], 25.0
    if config.check_motion:
        check_motion(motion, name)
    if config.fps is not None and config.fps != motion_fps:
        audio = None  # a resampled clip no longer lines up with the sound
    height, width = output_size(*motion.shape[1:3], config.size)
    warn_if_long(len(motion), config.steps, height, width)
    pipe = pipeline if pipeline is not None else load_pipeline(config)

    import torch

    from .distributed import is_distributed  # imports torch: only once the inputs are known to be good

    def on_step(pipe, step, timestep, tensors):
        if progress is not None:
            progress(step + 1, config.steps)
        return tensors

    result = pipe(
        reference,
        motion,
        num_inference_steps=config.steps,
        guidance_scale=config.guidance_scale,
        height=height,
        width=width,
        generator=torch.Generator(pipe.device).manual_seed(config.seed),
        context_frames=config.context_frames,
        context_overlap=config.context_overlap,
        context_schedule=config.context_schedule,
        context_batch_size=config.context_batch_size,
        controlnet_conditioning_scale=config.controlnet_conditioning_scale,
        eta=config.eta,
        decode_chunk_size=config.decode_chunk_size,
        callback_on_step_end=on_step,
        distributed=is_distributed(),
    ).frames
    frames = (result * 255).round().astype(np.uint8)
    if config.grid:
        sized_reference = np.asarray(reference.resize((width, height)))
        frames = grid_frames(sized_reference, pipe.resize_frames(motion, height, width), frames)
    return Video(frames=frames, fps=config.fps or motion_fps, audio=audio)
