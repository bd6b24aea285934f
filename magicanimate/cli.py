"""The ``magicanimate`` command line.

Every setting of :mod:`magicanimate.settings` is a flag under the same name (``context_overlap`` is
``--context-overlap``). Settings and output locations are checked before any model loads. Problems the user can fix
print one ``error: ...`` line and exit non-zero (2 input, 3 checkpoints, 4 resources); ``--debug`` shows the
traceback instead.
"""

import argparse
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

from . import batch, convert, demo
from .densepose import command as densepose
from .errors import InputError, as_user_error
from .evaluation import command as evaluate
from .settings import BY_NAME, SettingError, add_setting_flags, load_config, settings_from_args
from .training import command as train_command
from .training import export as export_command
from .training import prepare as prepare_data

DESCRIPTION = (
    "Animate a photo of a person with a motion (a DensePose video, or a video of someone moving). Commands: "
    "animate (one clip), batch (many), demo (web UI), densepose (extract a motion), evaluate (metrics), download "
    "(weights), convert (weights to safetensors), prepare-data, train and export (training your own). Run "
    "'magicanimate COMMAND --help' for a command's options."
)
OUTPUT_HELP = (
    "where to write the result: NAME.mp4 (H.264, with the motion's sound), NAME.gif, or a name without suffix for a "
    "folder of PNG frames (00000.png, ...)"
)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: argument --steps: must be ...`` and where to read the options,
    instead of the whole usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="magicanimate", description=DESCRIPTION)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    animate = commands.add_parser(
        "animate",
        help="animate a reference photo with a DensePose video (or a video of a person)",
        description="Animate a reference photo. Give the motion as --motion (a DensePose video) or --driving (a video "
        "of a person; its DensePose is extracted first). Settings come from the defaults, then --config, then flags. "
        "For a quick first look on a CPU: --preset preview.",
    )
    photo = animate.add_mutually_exclusive_group()  # one of them, from a flag or (the prompt) --config
    photo.add_argument("--reference", help="reference photo of the person (PNG, JPEG, WebP)")
    photo.add_argument(
        "--prompt",
        default=None,
        metavar="TEXT",
        help=f"{BY_NAME['prompt'].help}; exclusive with --reference (see also --negative-prompt, --prompt-steps, "
        "--prompt-guidance, --prompt-model)",
    )
    animate.add_argument(
        "--reference-end",
        metavar="PHOTO",
        help="a second photo the clip ends at (its last frame): the look changes from --reference to it along the clip "
        "(bidirectional sampling; about twice the work)",
    )
    animate.add_argument(
        "--keyframe",
        action="append",
        type=keyframe_argument,
        metavar="FRAME:PHOTO",
        help="a photo the clip passes through at that motion frame (from 0); repeat for several. --reference is the "
        "keyframe at frame 0; the cost does not grow with the number of keyframes",
    )
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
    animate.add_argument("-o", "--output", required=True, help=OUTPUT_HELP)
    animate.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    animate.add_argument("--config", default=None, help="YAML file of settings (keys as in configs/animation.yaml)")
    animate.add_argument("--debug", action="store_true", help="show tracebacks")
    add_setting_flags(animate)

    densepose.add_parser(commands)
    evaluate.add_parser(commands)
    download = commands.add_parser("download", help="fetch SD 1.5, sd-vae-ft-mse and MagicAnimate weights")
    download.add_argument("--to", default=None, help="target folder (default: $MAGICANIMATE_PRETRAINED or ~/.cache)")
    download.add_argument("--debug", action="store_true", help="show tracebacks")
    batch.add_parser(commands, add_setting_flags)  # `batch`, `demo`, `densepose`, `convert` run through `args.run`
    demo.add_parser(commands, add_setting_flags)
    convert.add_parser(commands)
    prepare_data.add_parser(commands)
    train_command.add_parser(commands)
    export_command.add_parser(commands)
    return parser


def keyframe_argument(text: str) -> tuple[int, str]:
    """``FRAME:PHOTO`` -> ``(frame, photo)`` (the photo may contain ``:``)."""
    frame, colon, photo = text.partition(":")
    if not colon or not photo or not frame.strip().isdigit():
        raise argparse.ArgumentTypeError(f"must be FRAME:PHOTO with a frame number from 0, got {text!r}")
    return int(frame), photo


def animate_command(args) -> Path | None:
    """Check everything, animate and write the output (rank 0 writes it when launched with torchrun)."""
    from .io.output import check_output

    config = load_config(args.config, **settings_from_args(args))
    if args.align_to_reference and not args.driving:
        raise SettingError("align_to_reference", "--align-to-reference works with --driving (a video of a person)")
    if args.reference is None and config.prompt is None and not args.keyframe:
        raise InputError("give the person to animate: --reference PHOTO, or --prompt TEXT to generate the photo")
    if args.reference is not None and config.prompt is not None:
        raise InputError(f"--reference and a prompt (prompt: in {args.config}) are exclusive; give one")
    keyframes = [photo for _, photo in args.keyframe or []]
    inputs = [
        args.reference,
        args.reference_end,
        *keyframes,
        args.motion,
        args.driving,
        args.config,
        args.densepose_model,
    ]
    check_output(args.output, inputs=inputs, overwrite=args.overwrite)
    if config.prompt is not None:  # the generated photo is written next to the output
        from .stages.prompt_reference import reference_output_path

        check_output(reference_output_path(args.output), inputs=inputs, overwrite=args.overwrite, suffixes=(".png",))
    rank = 0
    settings = dict(config)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # under torchrun: one clip split across the ranks
        from .distributed import init_from_env, rank_and_world

        settings["device"] = str(init_from_env())
        rank = rank_and_world()[0]
    from .api import animate

    video = animate(
        args.reference,
        args.motion,
        driving=args.driving,
        densepose_model=args.densepose_model,
        align_to_reference=args.align_to_reference,
        reference_end=args.reference_end,
        references=args.keyframe,
        **settings,
    )
    if rank != 0:
        return None
    if video.reference is not None:
        from .stages.prompt_reference import save_reference

        print(f"wrote {save_reference(video.reference, args.output)}")
    return video.save(args.output, crf=config.crf)


def download_command(args) -> Path:
    from .weights import download_weights

    return download_weights(args.to)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def _log_to_terminal() -> None:
    """The library's progress lines (the plan, model loading) go to stderr as plain lines."""
    logger = logging.getLogger("magicanimate")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def user_message(error) -> str:
    """The error's line, with the flag that sets the setting it names (the library speaks of settings only)."""
    text = str(error)
    key = getattr(error, "key", None)
    if isinstance(error, SettingError) and key in BY_NAME and BY_NAME[key].flag not in text:
        text += f" ({BY_NAME[key].flag}, or {key}: in --config)"
    return text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        warnings.formatwarning = _format_warning  # one readable line per warning, not the source location
    _log_to_terminal()
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
        error = as_user_error(err)
        if error is None:
            if not args.debug:
                traceback.print_exc()
            return 1
        print(f"error: {user_message(error)}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
