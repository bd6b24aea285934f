"""Results of an evaluation: per-video rows, the summary, a terminal table and the JSON report.

The JSON report has a top-level ``summary`` that maps each metric's short name (``l1``, ``psnr``, ``ssim``,
``lpips``, ``fid``, ``fid_vid``, ``fvd``) to its value, ``null`` where it was not computed (``skipped`` says why),
and ``"inf"`` for the PSNR of identical frames under the standard protocol (JSON has no infinity). ``videos`` holds
one row per video pair with the frames compared and any mismatch found.
"""

import json
import math
import os
from dataclasses import asdict, dataclass, field

__all__ = ["ComparisonReport", "EvaluationReport", "METRICS", "VideoResult", "format_table", "jsonable", "write_json"]

METRICS = ("l1", "psnr", "ssim", "lpips", "fid", "fid_vid", "fvd")
FRAME_METRICS = ("l1", "psnr", "ssim", "lpips")
TITLES = {
    "l1": "L1",
    "psnr": "PSNR",
    "ssim": "SSIM",
    "lpips": "LPIPS",
    "fid": "FID",
    "fid_vid": "FID-VID",
    "fvd": "FVD",
}
LOWER_IS_BETTER = {"l1", "lpips", "fid", "fid_vid", "fvd"}


@dataclass
class VideoResult:
    """One prediction / ground-truth pair: what was compared, and the frame metrics averaged over its frames."""

    name: str
    pred: str
    gt: str
    frames_compared: int
    pred_frames: int
    gt_frames: int
    pred_size: tuple[int, int]  # (width, height)
    gt_size: tuple[int, int]
    pred_fps: float | None
    gt_fps: float | None
    clips: int
    metrics: dict[str, float | None]
    warnings: list[str] = field(default_factory=list)


@dataclass
class EvaluationReport:
    """The whole evaluation; ``summary[metric]`` is ``None`` for a metric that was not computed."""

    protocol: str
    summary: dict[str, float | None]
    videos: list[VideoResult]
    frames_compared: int
    clips: int
    skipped: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return jsonable(
            {
                "summary": self.summary,
                "protocol": self.protocol,
                "frames_compared": self.frames_compared,
                "clips": self.clips,
                "skipped": self.skipped,
                "warnings": self.warnings,
                "notes": self.notes,
                "videos": [asdict(video) for video in self.videos],
            }
        )

    def table(self) -> str:
        """Per-video frame metrics, then the summary line with every metric."""
        shown = [m for m in FRAME_METRICS if self.summary.get(m) is not None]
        rows = [
            [v.name, str(v.frames_compared)] + [format_value(m, v.metrics.get(m)) for m in shown] for v in self.videos
        ]
        lines = [format_table(["video", "frames"] + [TITLES[m] for m in shown], rows)] if len(self.videos) > 1 else []
        summary = [
            [
                TITLES[m] + (" (lower is better)" if m in LOWER_IS_BETTER else ""),
                format_value(m, self.summary.get(m))
                if self.summary.get(m) is not None
                else f"- ({_short_reason(self.skipped.get(m, 'not computed'))})",
            ]
            for m in METRICS
        ]
        lines.append(
            format_table(
                [
                    f"metric ({self.protocol} protocol)",
                    f"{len(self.videos)} video(s), {self.frames_compared} frames, {self.clips} clips",
                ],
                summary,
            )
        )
        return "\n\n".join(lines)


@dataclass
class ComparisonReport:
    """``--compare``: each candidate against one reference (parity mode's result, usually)."""

    reference: str
    protocol: str
    candidates: dict[str, EvaluationReport]

    def to_dict(self) -> dict:
        return jsonable(
            {
                "reference": self.reference,
                "protocol": self.protocol,
                "summary": {name: report.summary for name, report in self.candidates.items()},
                "candidates": {name: report.to_dict() for name, report in self.candidates.items()},
            }
        )

    def table(self) -> str:
        shown = [m for m in FRAME_METRICS if any(r.summary.get(m) is not None for r in self.candidates.values())]
        rows = [
            [name, str(report.frames_compared)] + [format_value(m, report.summary.get(m)) for m in shown]
            for name, report in self.candidates.items()
        ]
        return f"against {self.reference} ({self.protocol} protocol)\n" + format_table(
            ["candidate", "frames"] + [TITLES[m] for m in shown], rows
        )


def _short_reason(reason: str) -> str:
    """A skipped metric's reason for the table (the full line is a warning and in the JSON report)."""
    return reason if len(reason) <= 50 else "skipped: " + reason.split(";")[0].split(" (")[0][:60]


def format_value(metric: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if metric == "l1" and abs(value) < 1e-2:
        return f"{value:.3e}"
    return f"{value:.2f}" if metric in ("psnr", "fid", "fid_vid", "fvd") else f"{value:.4f}"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain left-aligned text table."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(row) for row in rows])


def jsonable(value):
    """Floats JSON can hold: infinities as the strings ``"inf"`` / ``"-inf"``, NaN as ``null``; tuples as lists."""
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    return value


def write_json(path: str | os.PathLike, data: dict) -> None:
    """``data`` as indented JSON at ``path``, written whole or not at all."""
    from ..io.output import atomic_output

    with atomic_output(path) as temp:
        temp.write_text(json.dumps(data, indent=2) + "\n")
