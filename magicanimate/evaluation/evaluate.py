"""``evaluate_videos(pred, gt)``: every metric over matched videos, in one streaming pass; ``compare_videos``:
several results against one reference.

Frames are read one at a time from both sides and aligned by index; a prediction of another size is resized to the
ground truth's. Counts, sizes and frame rates that differ are warned about and recorded in the report, which also
says how many frames (and clips) were compared. Networks are loaded before any video is read, so a missing weight
file fails at once. Frame metrics are averaged over all frames of all videos (as DisCo averages over its frame
files); FID, FID-VID and FVD compare the two sets of all frames or clips.
"""

import os
import warnings
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import CheckpointError, InputError
from .frechet import FrechetDistance
from .inputs import VideoSource, expected_frames, match_videos
from .perceptual import load_lpips, lpips
from .protocol import Protocol, clips_batch, get_protocol, inception_batch
from .report import FRAME_METRICS, METRICS, ComparisonReport, EvaluationReport, VideoResult

__all__ = ["compare_videos", "evaluate_videos", "load_networks"]

NETWORK_METRICS = ("lpips", "fid", "fid_vid", "fvd")


def parse_metrics(metrics) -> tuple[tuple[str, ...], bool]:
    """``(metrics, explicit)``: the metric names to compute (all when ``None``) and whether the caller chose them
    (then a missing weight file is an error; otherwise that metric is skipped with a warning)."""
    if metrics is None:
        return METRICS, False
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    metrics = tuple(m.replace("-", "_").lower() for m in metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise InputError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METRICS)}")
    return tuple(m for m in METRICS if m in metrics), True


@dataclass
class Networks:
    """The pretrained networks of one evaluation (``None``: that metric is not computed) and why any is missing."""

    lpips: torch.nn.Module | None = None
    inception: torch.nn.Module | None = None
    resnet3d: torch.nn.Module | None = None
    i3d: torch.nn.Module | None = None
    skipped: dict[str, str] = field(default_factory=dict)


def load_networks(
    metrics,
    protocol: Protocol,
    *,
    lpips=None,
    inception=None,
    resnet3d=None,
    i3d=None,
    weights_dir=None,
    device="cpu",
    explicit: bool = True,
) -> Networks:
    """The networks ``metrics`` need: each given as a module (used as it is), a file path, or ``None`` (found or
    fetched, see :func:`~magicanimate.evaluation.networks.resolve_weight`).

    Raises:
        CheckpointError: a weight file is missing or unusable and ``explicit`` (else the metric is skipped).
    """
    from . import networks as nets

    def loader(metric):
        if metric == "lpips":
            return lambda path, **kw: load_lpips(protocol.lpips_net, path, **kw)
        return {"fid": nets.load_inception, "fid_vid": nets.load_resnet3d, "fvd": nets.load_i3d}[metric]

    given = {"lpips": lpips, "fid": inception, "fid_vid": resnet3d, "fvd": i3d}
    loaded = Networks()
    for metric in NETWORK_METRICS:
        if metric not in metrics:
            continue
        value = given[metric]
        try:
            if not isinstance(value, torch.nn.Module):
                value = loader(metric)(value, weights_dir=weights_dir)
        except CheckpointError as err:
            if explicit:
                raise
            loaded.skipped[metric] = str(err)
            warnings.warn(f"{metric} skipped: {err}", stacklevel=2)
            continue
        setattr(
            loaded,
            {"lpips": "lpips", "fid": "inception", "fid_vid": "resnet3d", "fvd": "i3d"}[metric],
            value.to(device).eval(),
        )
    return loaded


class ClipBuffer:
    """The last frames of one video, prepared for one video network, cut into the protocol's clips."""

    def __init__(self, protocol: Protocol, spec):
        self.protocol, self.spec = protocol, spec
        # Under DisCo's rule a clip counts once a frame follows it, so one frame more is kept.
        self.frames: deque = deque(maxlen=protocol.clip_length + protocol.clip_needs_next_frame)
        self.index = -1

    def add(self, frame: np.ndarray) -> list[np.ndarray] | None:
        """Add the next frame (after the protocol's :meth:`~Protocol.clip_frame`); the clip this completes (its
        prepared frames), if any."""
        self.frames.append(self.spec.prepare(frame))
        self.index += 1
        if len(self.frames) < self.frames.maxlen:
            return None
        start = self.index - self.frames.maxlen + 1
        return None if start % self.protocol.clip_stride else list(self.frames)[: self.protocol.clip_length]


class Evaluation:
    """Running state over all video pairs: per-frame values and the Fréchet sets."""

    def __init__(self, protocol: Protocol, metrics, nets: Networks, device, batch_size: int):
        self.protocol, self.metrics, self.nets = protocol, metrics, nets
        self.device, self.batch_size = torch.device(device), batch_size
        self.values = {m: [] for m in FRAME_METRICS}
        self.fid = (
            FrechetDistance(nets.inception, lambda f: inception_batch(f, protocol.inception_size), device)
            if nets.inception is not None
            else None
        )
        self.clip_sets = {}
        for metric, network, spec in (("fid_vid", nets.resnet3d, protocol.resnet3d), ("fvd", nets.i3d, protocol.i3d)):
            if network is not None:
                self.clip_sets[metric] = (FrechetDistance(network, clips_batch, device), spec)

    def frame_batch(self, pred: list[np.ndarray], gt: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Frame metrics of one batch of aligned frames (and the Inception features)."""
        p, g = np.stack(pred), np.stack(gt)
        values = {}
        for metric in ("l1", "psnr", "ssim"):
            if metric in self.metrics:
                values[metric] = getattr(self.protocol, metric)(p, g, reduction="none")
        if self.nets.lpips is not None:
            values["lpips"] = lpips(
                p,
                g,
                self.nets.lpips,
                reduction="none",
                zero_one_inputs=self.protocol.lpips_zero_one_inputs,
                batch_size=self.batch_size,
            )
        if self.fid is not None:
            self.fid.update(pred, gt)
        for metric, array in values.items():
            self.values[metric].append(array)
        return values

    def video(self, name: str, pred: VideoSource, gt: VideoSource, max_frames: int | None, bar) -> VideoResult:
        protocol, warned = self.protocol, []
        per_frame = {m: [] for m in FRAME_METRICS}
        buffers = {
            m: (ClipBuffer(protocol, spec), ClipBuffer(protocol, spec)) for m, (_, spec) in self.clip_sets.items()
        }
        pending = {metric: ([], []) for metric in buffers}
        batch_pred, batch_gt = [], []
        pred_frames, gt_frames = pred.frames(max_frames), gt.frames(max_frames)
        count, pred_size, gt_size = 0, None, None

        def flush_frames():
            for metric, array in self.frame_batch(batch_pred, batch_gt).items():
                per_frame[metric].append(array)
            batch_pred.clear()
            batch_gt.clear()

        def flush_clips(metric):
            fd = self.clip_sets[metric][0]
            fd.update(*pending[metric])
            pending[metric][0].clear()
            pending[metric][1].clear()

        extra_pred = 0
        for p in pred_frames:
            g = next(gt_frames, None)
            if g is None:  # the prediction is longer: this frame is its first unmatched one
                extra_pred = 1
                break
            if count == 0:
                pred_size, gt_size = (p.shape[1], p.shape[0]), (g.shape[1], g.shape[0])
                if pred_size != gt_size:
                    warned.append(
                        f"{name}: the prediction is {pred_size[0]}x{pred_size[1]}, the ground truth "
                        f"{gt_size[0]}x{gt_size[1]}; the prediction is resized to the ground truth's size"
                    )
            if p.shape != g.shape:
                p = protocol.resize_to(p, g.shape[0], g.shape[1])
            batch_pred.append(p)
            batch_gt.append(g)
            count += 1
            bar.update(1)
            if len(batch_pred) == self.batch_size:
                flush_frames()
            if buffers:  # the GIF palette once per frame, for both networks
                clip_p, clip_g = protocol.clip_frame(p), protocol.clip_frame(g)
            for metric, (buffer_pred, buffer_gt) in buffers.items():
                clip_pred, clip_gt = buffer_pred.add(clip_p), buffer_gt.add(clip_g)
                if clip_pred is not None:
                    pending[metric][0].append(clip_pred)
                    pending[metric][1].append(clip_gt)
                    if len(pending[metric][0]) == max(1, self.batch_size // 4):
                        flush_clips(metric)
        if batch_pred:
            flush_frames()
        for metric in buffers:
            if pending[metric][0]:
                flush_clips(metric)
        clips = len(protocol.clip_starts(count)) if buffers else 0
        total_pred = count + extra_pred + sum(1 for _ in pred_frames)
        total_gt = count + sum(1 for _ in gt_frames)
        if total_pred != total_gt:
            warned.append(
                f"{name}: the prediction has {total_pred} frames, the ground truth {total_gt}; the first "
                f"{count} of each are compared"
            )
        if pred.fps and gt.fps and abs(pred.fps - gt.fps) > 1e-3:
            warned.append(
                f"{name}: the prediction runs at {pred.fps:g} fps, the ground truth at {gt.fps:g} fps; "
                "frames are matched by index"
            )
        if buffers and clips == 0:
            warned.append(
                f"{name}: too short for a {protocol.clip_length}-frame clip ({count} frames); it adds "
                "nothing to FID-VID and FVD"
            )
        for message in warned:
            warnings.warn(message, stacklevel=3)
        return VideoResult(
            name=name,
            pred=pred.label,
            gt=gt.label,
            frames_compared=count,
            pred_frames=total_pred,
            gt_frames=total_gt,
            pred_size=pred_size,
            gt_size=gt_size,
            pred_fps=pred.fps,
            gt_fps=gt.fps,
            clips=clips,
            metrics={m: protocol.average(m, np.concatenate(v)) if v else None for m, v in per_frame.items()},
            warnings=warned,
        )

    def summary(self, skipped: dict[str, str]) -> dict[str, float | None]:
        summary = {m: self.protocol.average(m, np.concatenate(v)) if v else None for m, v in self.values.items()}
        for metric, fd in [("fid", self.fid)] + [(m, s[0]) for m, s in self.clip_sets.items()]:
            if fd is None:
                continue
            what = "frames" if metric == "fid" else "clips"
            if fd.count < 2:
                skipped[metric] = f"needs at least 2 {what} per set, got {fd.count}"
                summary[metric] = None
            else:
                summary[metric] = fd.compute()
        for metric in METRICS:
            summary.setdefault(metric, None)
        return {m: summary[m] for m in METRICS}


@torch.no_grad()
def evaluate_videos(
    pred,
    gt,
    *,
    protocol: str | Protocol = "disco",
    metrics=None,
    lpips=None,
    inception=None,
    resnet3d=None,
    i3d=None,
    weights_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    max_frames: int | None = None,
    progress: bool = True,
) -> EvaluationReport:
    """Compare predictions with ground truth (see :mod:`.inputs` for what ``pred`` and ``gt`` may be).

    ``metrics``: names or a comma-separated string (default: all of ``l1, psnr, ssim, lpips, fid, fid_vid, fvd``;
    then a metric whose weights are missing is skipped with a warning, while a metric asked for by name makes that
    an error). ``lpips``, ``inception``, ``resnet3d``, ``i3d``: a module to use as it is, a weight file, or ``None``
    (found in ``weights_dir`` or fetched). ``max_frames``: compare only the first frames of each video.

    Raises:
        InputError: unreadable or mismatched inputs. CheckpointError: weights of a metric asked for by name.
    """
    protocol = get_protocol(protocol)
    metrics, explicit = parse_metrics(metrics)
    pairs = match_videos(pred, gt)
    nets = load_networks(
        metrics,
        protocol,
        lpips=lpips,
        inception=inception,
        resnet3d=resnet3d,
        i3d=i3d,
        weights_dir=weights_dir,
        device=device,
        explicit=explicit,
    )
    state = Evaluation(protocol, metrics, nets, device, batch_size)
    from tqdm.auto import tqdm

    results = []
    total = expected_frames(pairs, max_frames) if progress else None
    with tqdm(total=total, unit="frame", desc="evaluating", disable=not progress, leave=False) as bar:
        for name, p, g in pairs:
            bar.set_postfix_str(name)
            results.append(state.video(name, p, g, max_frames, bar))
    skipped = dict(nets.skipped)
    summary = state.summary(skipped)
    for metric in METRICS:
        if metric not in metrics:
            skipped.setdefault(metric, "not asked for")
    return EvaluationReport(
        protocol=protocol.name,
        summary=summary,
        videos=results,
        frames_compared=sum(r.frames_compared for r in results),
        clips=sum(r.clips for r in results),
        skipped={m: skipped[m] for m in METRICS if m in skipped},
        warnings=[w for r in results for w in r.warnings],
        notes=list(protocol.notes),
    )


def compare_videos(
    reference,
    candidates,
    *,
    protocol: str | Protocol = "standard",
    metrics=None,
    lpips=None,
    weights_dir=None,
    device="cpu",
    progress: bool = True,
    **options,
) -> ComparisonReport:
    """Each of ``candidates`` (a list of paths, or ``{name: path or frames}``) against ``reference`` (parity mode's
    result, usually), under the standard protocol. ``metrics`` default: L1, PSNR, SSIM, and LPIPS when its backbone
    is found (else skipped with a warning; named in ``metrics``, it must run). LPIPS is loaded once."""
    protocol = get_protocol(protocol)
    if metrics is None:
        chosen, explicit = FRAME_METRICS, False
    else:
        chosen, explicit = parse_metrics(metrics)
    if not isinstance(candidates, dict):
        candidates = {_candidate_name(c, i): c for i, c in enumerate(candidates)}
    nets = load_networks(
        tuple(m for m in chosen if m == "lpips"),
        protocol,
        lpips=lpips,
        weights_dir=weights_dir,
        device=device,
        explicit=explicit,
    )
    reports = {}
    for name, candidate in candidates.items():
        report = evaluate_videos(
            candidate,
            reference,
            protocol=protocol,
            metrics=[m for m in chosen if m != "lpips" or nets.lpips is not None],
            lpips=nets.lpips,
            weights_dir=weights_dir,
            device=device,
            progress=progress,
            **options,
        )
        report.skipped.update({m: r for m, r in nets.skipped.items()})
        reports[name] = report
    label = os.fspath(reference) if isinstance(reference, (str, os.PathLike)) else "the reference frames"
    return ComparisonReport(reference=label, protocol=protocol.name, candidates=reports)


def _candidate_name(candidate, index: int) -> str:
    if isinstance(candidate, (str, os.PathLike)):
        return os.fspath(candidate)
    return f"candidate {index + 1}"
