"""Periodic validation: animate a held-out clip with the weights as they are and compare with its real frames.

The clip's first frame is the reference photo and its DensePose the motion, so the animation should reproduce the
clip: PSNR and SSIM against the ground truth (:mod:`magicanimate.evaluation`) say how close it gets, and an mp4
with the ground truth beside the animation shows it. Metrics go to ``RUN/validation.jsonl`` (and the accelerate
trackers).
"""

import json
from pathlib import Path

import numpy as np
import torch

from .manifest import ManifestEntry

GUIDANCE_SCALE = 7.5  # the original's


def frame_metrics(frames: np.ndarray, truth: np.ndarray) -> dict:
    """PSNR (dB, of the clip's mean squared error) and SSIM of frames ``(F, H, W, 3)`` against the ground truth,
    by :mod:`magicanimate.evaluation`'s textbook definitions."""
    from ..evaluation.metrics import psnr, ssim

    return {"psnr": psnr(frames, truth), "ssim": ssim(frames, truth)}


def validate(pipe, root: Path, entry: ManifestEntry, config, step: int, run: Path, autocast) -> dict:
    """Animate ``entry`` at the training resolution and write ``RUN/validation/step-STEP.mp4`` (ground truth left,
    animation right); returns the metrics."""
    from ..io import read_video, write_video

    images, densepose = entry.files(root)
    truth, fps = read_video(images, max_frames=config.validation_frames)
    motion, _ = read_video(densepose, max_frames=len(truth))
    size = config.resolution
    truth = pipe.resize_frames(truth, size, size)
    with torch.no_grad(), autocast():
        frames = pipe(
            truth[0],
            motion,
            num_inference_steps=config.validation_steps,
            guidance_scale=GUIDANCE_SCALE,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(config.seed),
            output_type="np",
        ).frames
    metrics = {"step": step, "clip": entry.name, **frame_metrics(frames, truth)}
    folder = Path(run) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    side_by_side = np.concatenate([truth, np.round(frames * 255).astype(np.uint8)], axis=2)
    write_video(folder / f"step-{step:06d}.mp4", side_by_side, fps=fps)
    with open(Path(run) / "validation.jsonl", "a", encoding="utf-8") as log:
        log.write(json.dumps(metrics) + "\n")
    return metrics
