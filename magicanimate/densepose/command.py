"""``magicanimate densepose INPUT.mp4 -o MOTION.mp4``: a raw video of a person -> the driving video.

Only argparse and the settings schema are imported here, so registering the subcommand costs nothing; the work is
imported by :func:`run`.
"""

import argparse
import math
import sys
from pathlib import Path

from ..errors import InputError
from ..settings import BY_NAME, Setting, SettingError


def _box(text: str) -> tuple[float, float, float, float] | str:
    """``X0,Y0,X1,Y1`` as four numbers; anything else stays text for :func:`check_options` to refuse in one line."""
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        return text
    return box if len(box) == 4 else text


def _valid_box(box) -> bool:
    return (
        isinstance(box, tuple)
        and len(box) == 4
        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
        and box[2] > box[0]
        and box[3] > box[1]
    )


# The numeric flags, typed and bounded like the settings of `animate` (nan, inf, fractions, out of range: refused).
OPTIONS = {
    "size": Setting("size", int, 512, "side of the square output", "densepose", low=8, high=4096),
    "fps": Setting("fps", float, 25.0, "output frame rate; 0 keeps the source's", "densepose", low=0, high=1000),
    "smooth": Setting("smooth", int, 3, "frames of the temporal majority; 1 = off", "densepose", low=1, high=255),
    "max_frames": Setting(
        "max_frames", int, None, "stop after this many output frames", "densepose", low=1, high=10_000_000,
        nullable=True,
    ),
    "crf": Setting("crf", int, 18, "H.264 quality, lower = better", "densepose", low=0, high=51),
    "device": BY_NAME["device"],
}  # fmt: skip


def _number(text: str):
    """A numeric flag's text as a number (or as is, when it is none): :func:`check_options` judges it, so a bad
    value is one ``error:`` line like every other mistake, not argparse's usage text."""
    try:
        return float(text)
    except ValueError:
        return text


def check_options(args) -> None:
    """Check the numeric flags, ``--device`` and ``--reference-box`` of parsed (or hand-built) arguments against
    their bounds, and store the numbers as their types (``--size 64`` arrives as ``64.0``).

    Raises:
        InputError: one line naming the flag and what it takes.
    """
    for name, setting in OPTIONS.items():
        value = getattr(args, name, setting.default)
        try:
            setattr(args, name, setting.check(value))
        except SettingError:
            shown = repr(value) if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else value
            raise InputError(f"--{name.replace('_', '-')} must be {setting.allowed()}, got {shown}") from None
    box = getattr(args, "reference_box", None)
    if box is not None and not _valid_box(box):
        shown = box if isinstance(box, str) else ",".join(f"{v:g}" for v in box)
        raise InputError(f"--reference-box must be X0,Y0,X1,Y1 with X1 > X0 and Y1 > Y0, got {shown!r}")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    """The extraction flags (also useful to ``animate --driving``)."""
    parser.add_argument(
        "--model",
        default=None,
        help="DensePose TorchScript file (densepose_r50_fpn_dl.torchscript; default: "
        "$MAGICANIMATE_DENSEPOSE_MODEL, else fetched from the hub when online), or detectron2 "
        "weights with --detectron2-config",
    )
    parser.add_argument("--size", type=_number, default=512, help="side of the square output (default: 512)")
    parser.add_argument(
        "--fps",
        type=_number,
        default=25.0,
        help="output frame rate; 0 keeps the source's (default: 25)",
    )
    parser.add_argument(
        "--person",
        choices=("largest", "score", "all"),
        default="largest",
        help="who drives the motion: the largest tracked person, the most confident one, or all",
    )
    parser.add_argument(
        "--smooth",
        type=_number,
        default=3,
        help="frames of the per-pixel temporal majority against flicker; 1 = off (default: 3)",
    )
    parser.add_argument(
        "--align-to-reference",
        metavar="REF",
        default=None,
        help="reference photo: scale and centre the motion onto the person in it",
    )
    parser.add_argument(
        "--reference-box",
        metavar="X0,Y0,X1,Y1",
        type=_box,
        default=None,
        help="that person's box in REF pixels (instead of detecting it)",
    )
    parser.add_argument(
        "--channel-order",
        choices=("BGR", "RGB"),
        default="BGR",
        help="channel order fed to the TorchScript model (default: BGR, as it was trained)",
    )
    parser.add_argument(
        "--detectron2-config",
        default=None,
        help="use detectron2 + DensePose (built from source) with this config and --model .pkl",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when available), cpu, cuda, cuda:1",
    )
    parser.add_argument("--max-frames", type=_number, default=None, help="stop after this many output frames")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``densepose`` on the ``magicanimate`` subcommands."""
    parser = subparsers.add_parser(
        "densepose",
        help="turn a raw video of a person into a DensePose driving video",
        description="Turn a raw video of a person into the DensePose driving video MagicAnimate expects (viridis "
        "part map, 512x512, 25 fps, H.264).",
    )
    parser.add_argument("input", help="video of a person (mp4, mov, webm, ...)")
    parser.add_argument("-o", "--output", required=True, help="DensePose video to write (.mp4)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    _add_arguments(parser)
    parser.add_argument("--crf", type=_number, default=18, help="H.264 quality, lower = better (default: 18)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.set_defaults(run=_run_and_report)
    return parser


def _run_and_report(args) -> int:
    print(f"wrote {run(args)}")
    return 0


def extraction_options(args) -> dict:
    """The keyword arguments of :func:`~magicanimate.densepose.extract_motion` from parsed flags."""
    return {
        "model": args.model,
        "size": args.size,
        "fps": args.fps or None,
        "person": args.person,
        "smooth": args.smooth,
        "align_to": args.align_to_reference,
        "reference_box": args.reference_box,
        "channel_order": args.channel_order,
        "device": args.device,
        "detectron2_config": args.detectron2_config,
        "max_frames": args.max_frames,
    }


def run(args) -> Path:
    """Run the ``densepose`` subcommand; returns the written video. Prints a flicker summary to stderr.

    Everything that can be wrong with the arguments fails here, before the model loads, in this order: the input
    video, the flags, the output (never one of the inputs, never a folder, not replaced without ``--overwrite``),
    then the model.
    """
    from ..io.files import check_readable
    from ..io.output import check_output
    from .motion import write_motion

    check_readable(args.input, "video file")
    check_options(args)
    inputs = [args.input, args.model, args.align_to_reference, args.detectron2_config]
    output = check_output(args.output, inputs=inputs, overwrite=getattr(args, "overwrite", False), suffixes=(".mp4",))
    from ..io import probe_fps
    from .extractor import resolve_model_path

    probe_fps(args.input)  # an input that is not a video, then a missing model, are the next things to fix
    if args.detectron2_config is None:
        resolve_model_path(args.model)
    path, plan = write_motion(args.input, output, crf=args.crf, progress=args.progress, **extraction_options(args))
    stats = plan.stats
    print(
        f"densepose: {plan.count} frames at {plan.fps:g} fps; person found in {stats['detected']:.0%} of "
        f"{stats['source_frames']} source frames; flicker {stats['flip_rate_raw']:.4f} -> {stats['flip_rate']:.4f} "
        "label flips per pixel per second",
        file=sys.stderr,
    )
    return path
