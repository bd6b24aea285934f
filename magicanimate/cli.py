"""The ``magicanimate`` command: ``animate`` a photo with a DensePose video, ``batch`` many, ``demo``, ``download``,
``convert``.

Every setting of ``configs/animation.yaml`` is a flag of ``animate`` under the same name (``context_overlap`` is
``--context-overlap``). Problems the user can fix print one ``error: ...`` line and exit non-zero (2 input,
3 checkpoints, 4 resources); ``--debug`` shows the traceback instead.
"""

import argparse
import os
import sys
import traceback
import warnings
from pathlib import Path

from . import batch, convert, demo
from .config import default_config, load_config
from .densepose import command as densepose
from .errors import MagicAnimateError, ResourceError

# Types of the settings whose default is null, so argparse can parse them.
_NULL_TYPES = {"max_frames": int, "fps": float}
# Settings that have their own short, documented flags below.
_OWN_FLAGS = {"pretrained"}


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
    source = animate.add_mutually_exclusive_group(required=True)
    source.add_argument("--motion", help="DensePose video (viridis part map, as MagicAnimate uses)")
    source.add_argument("--driving", help="raw video of a person; its DensePose is extracted first (as `densepose`)")
    animate.add_argument(
        "--densepose-model",
        default=None,
        help="DensePose TorchScript file for --driving (default: $MAGICANIMATE_DENSEPOSE_MODEL, else the hub file)",
    )
    animate.add_argument(
        "--align-to-reference",
        action="store_true",
        help="with --driving: scale and centre the motion onto the person in --reference",
    )
    animate.add_argument("-o", "--output", required=True, help="output video (.mp4, or .gif)")
    animate.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    animate.add_argument("--pretrained", default=None, help="root of the weights tree (see pretrained/README.md)")
    animate.add_argument("--config", default=None, help="YAML file of settings (keys as in configs/animation.yaml)")
    animate.add_argument("--debug", action="store_true", help="show tracebacks")
    _add_setting_flags(animate)

    densepose.add_parser(commands)
    download = commands.add_parser("download", help="fetch SD 1.5, sd-vae-ft-mse and MagicAnimate weights")
    download.add_argument("--to", default=None, help="target folder (default: $MAGICANIMATE_PRETRAINED or ~/.cache)")
    download.add_argument("--debug", action="store_true", help="show tracebacks")
    batch.add_parser(commands, _add_setting_flags)  # `batch`, `demo`, `densepose` run through `args.run`
    demo.add_parser(commands, _add_setting_flags)
    convert.add_parser(commands)
    return parser


def animate_command(args) -> Path | None:
    """Animate and write the video (rank 0 writes it when launched with torchrun)."""
    from .api import animate, check_output_path, check_overwrite, check_settings

    check_output_path(args.output)
    check_overwrite(args.output, args.overwrite)
    settings = {k: v for k, v in vars(args).items() if k in default_config() and v is not None}
    config = load_config(args.config, **settings)
    check_settings(config)
    rank = 0
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # under torchrun: one clip split across the ranks
        from .distributed import init_from_env, rank_and_world

        settings["device"] = str(init_from_env())
        rank = rank_and_world()[0]
    motion = args.motion
    if args.driving:
        from .densepose import extract_motion

        motion, _ = extract_motion(
            args.driving,
            model=args.densepose_model,
            size=config.size,
            fps=25.0,  # the checkpoints' rate; animate() takes array motion as 25 fps (--fps still sets the output)
            align_to=args.reference if args.align_to_reference else None,
            max_frames=config.max_frames,
            device=config.device,
        )
    video = animate(args.reference, motion, config=args.config, **settings)
    return video.save(args.output, crf=config.crf) if rank == 0 else None


def download_command(args) -> Path:
    from .weights import download_weights

    return download_weights(args.to)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        warnings.formatwarning = _format_warning  # one readable line per warning, not the source location
    try:
        if args.command == "animate":
            output = animate_command(args)
            if output is not None:
                print(f"wrote {output}")
        elif args.command == "download":
            print(f"weights are in {download_command(args)}")
        else:
            return args.run(args)
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
    if type(err).__name__ == "OutOfMemoryError" or isinstance(err, MemoryError) or _is_oom(err):
        return ResourceError(OUT_OF_MEMORY)
    return None


OUT_OF_MEMORY = (
    "out of memory; to use less: --dtype float16 (on a GPU), --context-batch-size 1, --decode-chunk-size 4, "
    "a smaller --size (e.g. 384), fewer frames with --max-frames, or close other programs using the GPU"
)


def _is_oom(err: Exception) -> bool:
    """A RuntimeError that is an allocation failure (older torch, MPS, cuDNN) rather than a bug."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "failed to allocate memory" in text)


if __name__ == "__main__":
    sys.exit(main())
