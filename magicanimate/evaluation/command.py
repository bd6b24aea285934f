"""``magicanimate evaluate``: metrics of predicted videos against ground truth, or of results against a reference.

    magicanimate evaluate --pred PRED --gt GT [--protocol disco] [--report report.json]
    magicanimate evaluate --compare PARITY.mp4 FAST.mp4 CACHE2.mp4 [--report compare.json]

Only argparse is imported here, so registering the subcommand costs nothing; the work is imported by :func:`run`.
"""

import argparse
import os
import sys

from ..errors import InputError

PROTOCOL_HELP = (
    "disco: DisCo's TikTok evaluation code, as the published tables (default with --gt); standard: textbook "
    "metrics on RGB in [0, 1] (default with --compare). See docs/evaluation.md"
)


def add_parser(commands) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the ``magicanimate`` subcommands."""
    parser = commands.add_parser(
        "evaluate",
        help="L1, PSNR, SSIM, LPIPS, FID, FID-VID and FVD of results against ground truth (or a reference)",
        description="Compare predicted videos with ground truth: each of --pred and --gt is a video, a folder of "
        "frames, or a folder of videos / frame folders matched by name; frames are aligned by index. Or, with "
        "--compare, compare several results with a reference result (PSNR/SSIM/LPIPS against parity mode). "
        "LPIPS, FID, FID-VID and FVD need pretrained weight files (--weights-dir; see docs/evaluation.md).",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--pred", help="predicted video, frame folder, or folder of them")
    mode.add_argument(
        "--compare",
        nargs="+",
        metavar=("REFERENCE", "CANDIDATE"),
        help="REFERENCE CANDIDATE [CANDIDATE ...]: each candidate against the reference",
    )
    parser.add_argument("--gt", help="ground-truth video, frame folder, or folder of them (with --pred)")
    parser.add_argument("--protocol", choices=("disco", "standard"), default=None, help=PROTOCOL_HELP)
    parser.add_argument(
        "--metrics",
        default=None,
        help="comma-separated subset of l1,psnr,ssim,lpips,fid,fid_vid,fvd (default: all with --gt, skipping those "
        "whose weights are missing; l1,psnr,ssim,lpips with --compare); a metric named here must run",
    )
    parser.add_argument("--report", default=None, help="write the JSON report here")
    parser.add_argument("--overwrite", action="store_true", help="replace the report if it exists")
    parser.add_argument(
        "--weights-dir",
        default=None,
        help="folder of the metric weight files (default: $MAGICANIMATE_EVAL_WEIGHTS, else "
        "~/.cache/magicanimate/eval); missing files are fetched there when online",
    )
    parser.add_argument("--lpips-backbone", default=None, help="torchvision AlexNet/VGG-16 file for LPIPS")
    parser.add_argument("--inception", default=None, help="inception-2015-12-05.pt (TorchScript) for FID")
    parser.add_argument("--resnet3d", default=None, help="resnet-50-kinetics.pth for FID-VID")
    parser.add_argument("--i3d", default=None, help="i3d_pretrained_400.pt for FVD")
    parser.add_argument("--max-frames", type=_positive_int, default=None, help="compare only the first N frames")
    parser.add_argument("--batch-size", type=_positive_int, default=16, help="frames per network call (16)")
    parser.add_argument("--device", default="cpu", help="torch device for the networks (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.set_defaults(run=run)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def check_args(args) -> None:
    """Refuse inconsistent options, and a report location that cannot be written, before any work."""
    if args.pred is not None and args.gt is None:
        raise InputError("--pred needs --gt (the ground truth to compare with); or use --compare REFERENCE CANDIDATE")
    if args.compare is not None:
        if args.gt is not None:
            raise InputError("--gt goes with --pred; --compare takes the reference as its first path")
        if len(args.compare) < 2:
            raise InputError("--compare needs a reference and at least one candidate: --compare REFERENCE CANDIDATE")
    if args.report is not None:
        from ..io.output import check_output

        inputs = [args.pred, args.gt, *(args.compare or [])]
        check_output(args.report, inputs=inputs, overwrite=args.overwrite, suffixes=(".json",))
    if args.device != "cpu":
        from ..devices import resolve_device

        args.device = str(resolve_device(args.device, "float32")[0])


def run(args) -> int:
    check_args(args)
    from .evaluate import compare_videos, evaluate_videos
    from .report import write_json

    networks = {
        "lpips": args.lpips_backbone,
        "weights_dir": args.weights_dir,
        "device": args.device,
        "batch_size": args.batch_size,
        "max_frames": args.max_frames,
    }
    if args.compare is not None:
        reference, *candidates = args.compare
        names = [os.path.basename(os.path.normpath(c)) for c in candidates]
        if len(set(names)) < len(names):  # same file names in different folders: keep the paths
            names = list(candidates)
        report = compare_videos(
            reference,
            dict(zip(names, candidates, strict=True)),
            protocol=args.protocol or "standard",
            metrics=args.metrics,
            **networks,
        )
    else:
        report = evaluate_videos(
            args.pred,
            args.gt,
            protocol=args.protocol or "disco",
            metrics=args.metrics,
            inception=args.inception,
            resnet3d=args.resnet3d,
            i3d=args.i3d,
            **networks,
        )
    print(report.table())
    if args.report is not None:
        write_json(args.report, report.to_dict())
        print(f"wrote {args.report}", file=sys.stderr)
    return 0
