"""``magicanimate densepose INPUT.mp4 -o MOTION.mp4``: a raw video of a person -> the driving video.

Only argparse is imported here, so registering the subcommand costs nothing; the work is imported by :func:`run`.
"""

import argparse
import sys
from pathlib import Path

from ..errors import InputError


def _box(text: str) -> tuple[float, float, float, float]:
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
        raise argparse.ArgumentTypeError(f"expected X0,Y0,X1,Y1 with X1>X0 and Y1>Y0, got {text!r}")
    return box


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    """The extraction flags (also useful to ``animate --driving``)."""
    parser.add_argument(
        "--model",
        default=None,
        help="DensePose TorchScript file (densepose_r50_fpn_dl.torchscript; default: "
        "$MAGICANIMATE_DENSEPOSE_MODEL, else fetched from the hub when online), or detectron2 "
        "weights with --detectron2-config",
    )
    parser.add_argument("--size", type=int, default=512, help="side of the square output (default: 512)")
    parser.add_argument("--fps", type=float, default=25.0, help="output frame rate; 0 keeps the source's (default: 25)")
    parser.add_argument(
        "--person",
        choices=("largest", "score", "all"),
        default="largest",
        help="who drives the motion: the largest tracked person, the most confident one, or all",
    )
    parser.add_argument(
        "--smooth",
        type=int,
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
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--max-frames", type=int, default=None, help="stop after this many output frames")


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
    parser.add_argument("--crf", type=int, default=18, help="H.264 quality, lower = better (default: 18)")
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
    """Run the ``densepose`` subcommand; returns the written video. Prints a flicker summary to stderr."""
    from .motion import write_motion

    output = Path(args.output)
    if output.suffix.lower() != ".mp4":
        raise InputError(f"the DensePose video must be written as .mp4 (H.264), got {output.name}")
    if output.resolve() == Path(args.input).resolve():
        raise InputError("the output would overwrite the input video; choose another -o path")
    from ..io import probe_fps
    from .extractor import resolve_model_path

    probe_fps(args.input)  # a missing or unreadable input, then a missing model, are the first things to fix
    if args.detectron2_config is None:
        resolve_model_path(args.model)
    if output.exists() and not getattr(args, "overwrite", False):
        raise InputError(f"{output} already exists; pass --overwrite to replace it, or choose another output")
    path, plan = write_motion(args.input, output, crf=args.crf, progress=args.progress, **extraction_options(args))
    stats = plan.stats
    print(
        f"densepose: {plan.count} frames at {plan.fps:g} fps; person found in {stats['detected']:.0%} of "
        f"{stats['source_frames']} source frames; flicker {stats['flip_rate_raw']:.4f} -> {stats['flip_rate']:.4f} "
        "label flips per pixel per second",
        file=sys.stderr,
    )
    return path
