"""Quality against speed, with your weights: each preset and each quality-trading lever against parity mode.

    python benchmarks/quality_vs_speed.py --pretrained pretrained --reference photo.png --motion densepose.mp4 \\
        --max-frames 32 --json quality.json
    python benchmarks/quality_vs_speed.py ... --only fast guidance_end cache2   # a few variants
    python benchmarks/quality_vs_speed.py ... --lpips-backbone alexnet-owt-7be5be79.pth   # adds LPIPS

The pipeline loads once. Parity mode (the defaults: the original's algorithm, at ``--steps``, ``--size``) runs
first; then every variant runs on the same clip, photo and seed, and its frames are compared with parity mode's:
PSNR and SSIM (textbook definitions on RGB in [0, 1], :mod:`magicanimate.evaluation`), LPIPS-AlexNet when its
backbone is given (``--lpips-backbone`` or ``--weights-dir``), and the wall time of the call with its speed-up.
Higher PSNR/SSIM and lower LPIPS mean closer to parity mode, not better: parity mode is the reference, not ground
truth. A variant whose setting is not available in this version (it raises) is reported as unavailable; one whose
frames equal parity mode's exactly is flagged, since a lever that changes nothing is likely not wired.

Variants (``--only`` takes their keys): ``fast`` and ``preview`` (the presets; preview renders at its own 256 px
and is upscaled to parity mode's size for the comparison), ``dpmpp_2m``, ``unipc``, ``euler`` (that solver in
``--few-steps`` steps), ``guidance_end`` (guidance on the first 40% of the steps), ``sliding`` (windows that do not
wrap around), ``cache2``, ``cache3`` (feature reuse every 2 / 3 steps), ``stride2`` (every other frame animated, the
rest interpolated).

Random-weight models cannot judge quality; run this with the real checkpoints on a clip of your own.
"""

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a clone without installing
    sys.path.insert(0, str(REPO))

from magicanimate.errors import InputError, MagicAnimateError, as_user_error  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """One row: ``settings`` are API keywords over the run's base settings (a preset's own keys win over the
    base, as ``--preset`` would)."""

    key: str
    label: str
    settings: dict = field(default_factory=dict)


def variants(few_steps: int = 10) -> list[Variant]:
    return [
        Variant("parity", "parity mode (defaults)"),
        Variant("fast", "preset fast", {"preset": "fast"}),
        Variant("preview", "preset preview (resized)", {"preset": "preview"}),
        Variant("dpmpp_2m", f"dpmpp_2m, {few_steps} steps", {"scheduler": "dpmpp_2m", "steps": few_steps}),
        Variant("unipc", f"unipc, {few_steps} steps", {"scheduler": "unipc", "steps": few_steps}),
        Variant("euler", f"euler, {few_steps} steps", {"scheduler": "euler", "steps": few_steps}),
        Variant("guidance_end", "guidance_end 0.4", {"guidance_end": 0.4}),
        Variant("sliding", "context_schedule sliding", {"context_schedule": "sliding"}),
        Variant("cache2", "cache_interval 2", {"cache_interval": 2}),
        Variant("cache3", "cache_interval 3", {"cache_interval": 3}),
        Variant("stride2", "frame_stride 2", {"frame_stride": 2}),
    ]


def variant_settings(base: dict, variant: Variant) -> dict:
    """The API keywords of a variant: the base, minus what its preset sets, plus its own."""
    from magicanimate.settings import PRESETS

    preset = PRESETS.get(variant.settings.get("preset"), {})
    return {k: v for k, v in base.items() if k not in preset} | variant.settings


def _synchronize(pipe) -> None:
    import torch

    device = pipe._execution_device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(pipe, reference, motion, settings: dict) -> tuple[np.ndarray, float]:
    """``(frames, seconds)`` of one ``animate`` call on the loaded pipeline."""
    from magicanimate.api import animate

    _synchronize(pipe)
    start = time.perf_counter()
    video = animate(reference, motion, pipeline=pipe, **settings)
    _synchronize(pipe)
    return video.frames, time.perf_counter() - start


def compare(frames: np.ndarray, parity: np.ndarray, lpips_model=None) -> dict:
    """PSNR, SSIM (and LPIPS) of ``frames`` against parity mode's, after resizing them to its size if needed."""
    import cv2

    from magicanimate.evaluation import lpips, psnr, ssim

    notes = []
    if frames.shape[1:3] != parity.shape[1:3]:
        height, width = parity.shape[1:3]
        frames = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_LINEAR) for f in frames])
        notes.append(f"resized to {width}x{height}")
    count = min(len(frames), len(parity))
    if len(frames) != len(parity):
        notes.append(f"{len(frames)} frames against {len(parity)}; the first {count} compared")
    frames, parity = frames[:count], parity[:count]
    result = {"psnr": psnr(frames, parity), "ssim": ssim(frames, parity), "frames_compared": count}
    if lpips_model is not None:
        result["lpips"] = lpips(frames, parity, lpips_model)
    if count and np.array_equal(frames, parity):
        notes.append("identical to parity mode: is this setting wired yet?")
    return result | {"notes": notes}


def run_variants(pipe, reference, motion, base: dict, chosen: list[Variant], lpips_model=None, progress=print):
    """Parity mode first, then each of ``chosen``: one row per variant (see the module docstring)."""
    rows = []
    parity_variant = next((v for v in chosen if v.key == "parity"), variants()[0])
    parity, parity_seconds = run_variant(pipe, reference, motion, variant_settings(base, parity_variant))
    rows.append(
        {
            "variant": "parity",
            "label": parity_variant.label,
            "settings": {},
            "seconds": parity_seconds,
            "speedup": 1.0,
            "psnr": None,
            "ssim": None,
            "lpips": None,
            "status": "reference",
            "notes": [],
        }
    )
    progress(f"parity mode: {parity_seconds:.1f} s")
    for variant in chosen:
        if variant.key == "parity":
            continue
        row = {
            "variant": variant.key,
            "label": variant.label,
            "settings": variant.settings,
            "seconds": None,
            "speedup": None,
            "psnr": None,
            "ssim": None,
            "lpips": None,
            "status": "ok",
            "notes": [],
        }
        try:
            frames, seconds = run_variant(pipe, reference, motion, variant_settings(base, variant))
        except Exception as err:  # noqa: BLE001 - a lever not in this version (or refusing this clip): report it
            if as_user_error(err) is not None and not isinstance(err, MagicAnimateError):
                raise  # out of memory: a real answer about the machine, not about the lever
            row["status"] = "unavailable"
            row["notes"] = [f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"]
            progress(f"{variant.label}: unavailable ({row['notes'][0]})")
            rows.append(row)
            continue
        row.update(seconds=seconds, speedup=parity_seconds / seconds)
        comparison = compare(frames, parity, lpips_model)
        row["notes"] = comparison.pop("notes")
        row.update({k: v for k, v in comparison.items() if k in ("psnr", "ssim", "lpips")})
        row["frames_compared"] = comparison["frames_compared"]
        progress(f"{variant.label}: {seconds:.1f} s, PSNR {row['psnr']:.2f}")
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    from magicanimate.evaluation.report import format_table

    def number(value, digits):
        if value is None:
            return "-"
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"

    lines = []
    for row in rows:
        settings = ", ".join(f"{k}={v}" for k, v in row["settings"].items()) or "defaults"
        lines.append(
            [
                row["variant"],
                settings,
                number(row["seconds"], 2),
                f"{row['speedup']:.2f}x" if row["speedup"] else "-",
                number(row["psnr"], 2),
                number(row["ssim"], 4),
                number(row["lpips"], 4),
                "; ".join([row["status"]] * (row["status"] != "ok") + row["notes"]),
            ]
        )
    return format_table(["variant", "settings", "seconds", "speed-up", "PSNR", "SSIM", "LPIPS", "notes"], lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="See the module docstring.")
    parser.add_argument("--pretrained", default=None, help="weights tree (default: the download cache)")
    parser.add_argument("--reference", required=True, help="reference photo")
    parser.add_argument("--motion", required=True, help="DensePose video")
    parser.add_argument("--max-frames", type=int, default=32, help="frames of the clip (32)")
    parser.add_argument("--size", type=int, default=512, help="output size of parity mode and the levers (512)")
    parser.add_argument("--steps", type=int, default=25, help="parity mode's DDIM steps (25, the original's)")
    parser.add_argument("--few-steps", type=int, default=10, help="steps of the dpmpp_2m/unipc/euler rows (10)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", nargs="+", default=None, metavar="KEY", help="run only these variants")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--lpips-backbone", default=None, help="torchvision AlexNet file: adds LPIPS")
    parser.add_argument("--weights-dir", default=None, help="folder holding alexnet-owt-7be5be79.pth: adds LPIPS")
    parser.add_argument("--no-check-motion", action="store_true", help="do not check that --motion is DensePose")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed one-step warm-up call")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except MagicAnimateError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


def _main(args) -> int:
    from magicanimate.loading import load_pipeline
    from magicanimate.settings import load_config

    known = {v.key: v for v in variants(args.few_steps)}
    unknown = sorted(set(args.only or []) - set(known))
    if unknown:
        raise InputError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    chosen = [known["parity"]] + [v for k, v in known.items() if k != "parity" and (not args.only or k in args.only)]
    base = {"size": args.size, "steps": args.steps, "seed": args.seed, "max_frames": args.max_frames}
    if args.no_check_motion:
        base["check_motion"] = False
    load_config(**base)  # a bad value fails before the models load
    if args.json:
        from magicanimate.io.output import check_output

        check_output(args.json, inputs=[args.reference, args.motion], overwrite=True, suffixes=(".json",))
    lpips_model = None
    if args.lpips_backbone or args.weights_dir:
        from magicanimate.evaluation import load_lpips

        lpips_model = load_lpips("alex", args.lpips_backbone, weights_dir=args.weights_dir, download=False)
    pipe = load_pipeline(pretrained=args.pretrained, device=args.device, dtype=args.dtype)
    pipe.set_progress_bar_config(disable=True)
    if lpips_model is not None:
        lpips_model.to(pipe._execution_device)
    if not args.no_warmup:  # kernels, allocator and caches warm before anything is timed
        run_variant(pipe, args.reference, args.motion, base | {"steps": 1, "max_frames": min(args.max_frames, 16)})
    rows = run_variants(
        pipe, args.reference, args.motion, base, chosen, lpips_model, progress=lambda line: print(line, file=sys.stderr)
    )
    print(table(rows))
    if args.json:
        from magicanimate.evaluation.report import jsonable, write_json

        write_json(
            args.json,
            jsonable(
                {
                    "clip": {"reference": args.reference, "motion": args.motion} | base,
                    "device": str(pipe._execution_device),
                    "rows": rows,
                }
            ),
        )
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
