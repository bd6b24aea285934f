"""The ``magicanimate`` command: ``animate`` a photo with a DensePose video, ``download`` the weights.

Every setting of ``configs/animation.yaml`` is a flag of ``animate`` under the same name (``context_overlap`` is
``--context-overlap``). Problems the user can fix print one ``error: ...`` line and exit non-zero (2 input,
3 checkpoints, 4 resources); ``--debug`` shows the traceback instead.
"""

import argparse
import sys
import traceback
from pathlib import Path

import numpy as np

from .config import default_config, load_config
from .errors import InputError, MagicAnimateError, ResourceError

# Types of the settings whose default is null, so argparse can parse them.
_NULL_TYPES = {"max_frames": int, "fps": float}
# Settings that have their own short, documented flags below.
_OWN_FLAGS = {"pretrained"}
PIECE_KEYS = (
    "pretrained_model_path",
    "pretrained_vae_path",
    "pretrained_appearance_encoder_path",
    "pretrained_controlnet_path",
    "motion_module",
)


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for key, default in default_config().items():
        if key in _OWN_FLAGS:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = _NULL_TYPES.get(key, type(default) if default is not None else str)
            parser.add_argument(
                flag, dest=key, type=kind, default=None, metavar=key.upper(), help=f"(default: {default})"
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magicanimate", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    animate = commands.add_parser("animate", help="animate a reference photo with a DensePose motion video")
    animate.add_argument("--reference", required=True, help="reference photo of the person")
    animate.add_argument("--motion", required=True, help="DensePose video (viridis part map, as MagicAnimate uses)")
    animate.add_argument("-o", "--output", required=True, help="output video (.mp4, or .gif)")
    animate.add_argument("--pretrained", default=None, help="root of the weights tree (see pretrained/README.md)")
    animate.add_argument("--config", default=None, help="YAML file of settings (keys as in configs/animation.yaml)")
    animate.add_argument("--debug", action="store_true", help="show tracebacks")
    _add_setting_flags(animate)

    download = commands.add_parser("download", help="fetch SD 1.5, sd-vae-ft-mse and MagicAnimate weights")
    download.add_argument("--to", default=None, help="target folder (default: $MAGICANIMATE_PRETRAINED or ~/.cache)")
    download.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def output_size(height: int, width: int, size: int | None) -> tuple[int, int]:
    """Scale ``height x width`` so the shorter side is ``size``, both multiples of 8 (the VAE's factor)."""
    if size is None:
        return height // 8 * 8, width // 8 * 8
    scale = size / min(height, width)
    return max(8, round(height * scale / 8) * 8), max(8, round(width * scale / 8) * 8)


def resolve_device(config):
    import torch

    cuda = torch.cuda.is_available()
    device = ("cuda" if cuda else "cpu") if config.device == "auto" else config.device
    names = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    if config.dtype == "auto":
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    elif config.dtype in names:
        dtype = names[config.dtype]
    else:
        raise InputError(f"dtype must be auto, float16, bfloat16 or float32, got {config.dtype!r}")
    return device, dtype


def load_pipeline(config):
    """The pipeline for ``config``'s checkpoints, fetching the default tree on first use when online."""
    from .weights import default_pretrained_dir, ensure_weights

    pieces = {key: config[key] for key in PIECE_KEYS if config[key]}
    root = Path(config.pretrained) if config.pretrained else default_pretrained_dir()
    if len(pieces) < len(PIECE_KEYS):
        ensure_weights(root, download=config.pretrained is None)
    from .pipelines import MagicAnimatePipeline

    device, dtype = resolve_device(config)
    pipe = MagicAnimatePipeline.from_pretrained(
        root, **pieces, motion_only=config.motion_only, fusion_blocks=config.fusion_blocks, torch_dtype=dtype
    )
    return pipe.to(device)


def grid_frames(reference: np.ndarray, motion: np.ndarray, result: np.ndarray):
    """``reference | motion | result`` side by side, uint8, one frame at a time."""
    for motion_frame, result_frame in zip(motion, result, strict=True):
        yield np.concatenate([reference, motion_frame, (result_frame * 255).round().astype(np.uint8)], axis=1)


def animate_command(args) -> Path:
    from .io import VideoWriter, load_image, read_video, write_gif

    settings = {k: v for k, v in vars(args).items() if k in default_config() and v is not None}
    config = load_config(args.config, **settings)
    reference = load_image(args.reference)
    motion, motion_fps = read_video(args.motion, max_frames=config.max_frames)
    height, width = output_size(*motion.shape[1:3], config.size)
    output = Path(args.output)
    if output.suffix.lower() not in (".mp4", ".gif"):
        raise InputError(f"output must end in .mp4 or .gif, got {output.name}")

    pipe = load_pipeline(config)
    import torch

    generator = torch.Generator(pipe.device).manual_seed(config.seed)
    result = pipe(
        reference,
        motion,
        num_inference_steps=config.steps,
        guidance_scale=config.guidance_scale,
        height=height,
        width=width,
        generator=generator,
        context_frames=config.context_frames,
        context_overlap=config.context_overlap,
        context_schedule=config.context_schedule,
        context_batch_size=config.context_batch_size,
        controlnet_conditioning_scale=config.controlnet_conditioning_scale,
        eta=config.eta,
    ).frames

    fps = config.fps or motion_fps
    frames = iter(result)
    if config.grid:
        sized_reference = np.asarray(reference.resize((width, height)))
        frames = grid_frames(sized_reference, pipe.resize_frames(motion, height, width), result)
    if output.suffix.lower() == ".gif":
        write_gif(output, frames, fps=fps)
    else:
        with VideoWriter(output, fps=fps, crf=config.crf) as writer:
            for frame in frames:
                writer.write(frame)
    return output


def download_command(args) -> Path:
    from .weights import download_weights

    return download_weights(args.to)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "animate":
            print(f"wrote {animate_command(args)}")
        elif args.command == "download":
            print(f"weights are in {download_command(args)}")
        return 0
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure ends in one line unless --debug
        if args.debug:
            traceback.print_exc()
        error = _as_user_error(err)
        if error is None:
            if not args.debug:
                traceback.print_exc()
            return 1
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


def _as_user_error(err: Exception) -> MagicAnimateError | None:
    """The user-facing form of ``err``, or None for a bug (which keeps its traceback)."""
    if isinstance(err, MagicAnimateError):
        return err
    if type(err).__name__ == "OutOfMemoryError" or isinstance(err, MemoryError):
        return ResourceError("out of memory; try a smaller --size, fewer frames (--max-frames) or --dtype float16")
    return None


if __name__ == "__main__":
    sys.exit(main())
