"""Seconds per step and peak memory of `magicanimate train` (stages 1, 2 and lora) at real model sizes.

The models are the real SD 1.5 / MagicAnimate topologies with random weights (``bench_pipeline.build_pipeline``),
saved once as a pipeline folder (``save_pretrained``, which ``train --pretrained`` loads like the release tree); the
data are synthetic clips in the layout ``prepare-data`` writes (a moving pattern and its DensePose rendering). Each
stage then runs the real :class:`magicanimate.training.trainer.Trainer` with the 24 GB defaults of
``configs/train.yaml`` for a few steps; the table shows the median seconds of the steps after the first and the peak
memory (CUDA: allocated and reserved; CPU: the process's peak RSS).

    python benchmarks/bench_training.py --device cuda                 # the issue-13 table (one GPU, ~10 min)
    python benchmarks/bench_training.py --device cpu --reduced --steps 2 --frames 2   # a CPU smoke run
"""

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import build_pipeline, sizes  # noqa: E402

from magicanimate.densepose.render import labels_to_rgb  # noqa: E402
from magicanimate.io import write_video  # noqa: E402
from magicanimate.training.config import load_train_config  # noqa: E402
from magicanimate.training.manifest import ManifestEntry, write_manifest  # noqa: E402


def synthetic_clip(frames: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(RGB frames, DensePose frames)``: a few part-labelled discs moving over a textured background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    background = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    centres, parts = rng.uniform(0.2, 0.8, (6, 2)) * size, rng.integers(1, 25, 6)
    rgb, pose = [], []
    for t in range(frames):
        labels = np.zeros((size, size), np.uint8)
        for (cy, cx), part in zip(centres + t * size / 100, parts, strict=True):
            labels[(yy - cy % size) ** 2 + (xx - cx % size) ** 2 < (size / 10) ** 2] = part
        pose.append(labels_to_rgb(labels))
        rgb.append(np.where(labels[..., None] > 0, pose[-1] // 2 + 60, background))
    return np.stack(rgb), np.stack(pose)


def make_data(root: Path, frames: int, size: int) -> Path:
    entries = []
    for index, split in enumerate(("train", "val")):
        rgb, pose = synthetic_clip(frames, size, index)
        folder = root / "clips" / f"clip{index}"
        folder.mkdir(parents=True, exist_ok=True)
        write_video(folder / "frames.mp4", rgb, fps=25)
        write_video(folder / "densepose.mp4", pose, fps=25)
        entries.append(ManifestEntry(f"clip{index}", f"clips/clip{index}", "video", frames, 25.0, size, split))
    write_manifest(root, entries)
    return root


def peak_memory(device: str) -> dict:
    if device.startswith("cuda"):
        return {
            "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        }
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run_stage(stage: str, tree: Path, data: Path, work: Path, args) -> dict:
    from magicanimate.training.trainer import Trainer

    settings = dict(
        stage=stage, data=str(data), pretrained=str(tree), output=str(work / f"run-{stage}"), device=args.device,
        max_steps=args.steps, validate_every=0, checkpoint_every=10**6, dataloader_workers=0,
        resolution=args.resolution, clip_frames=args.frames,
    )  # fmt: skip
    if args.optimizer:
        settings["optimizer"] = args.optimizer
    config = load_train_config(None, **settings)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(config)
    samples = iter(trainer.loader())
    seconds = []
    for _ in range(args.steps):
        batch = [next(samples) for _ in range(trainer.per_step)]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train_step(batch)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    row = {
        "stage": stage,
        "resolution": args.resolution,
        "clip_frames": config.clip_frames if stage != "1" else 1,
        "mixed_precision": config.mixed_precision,
        "optimizer": config.optimizer,
        "gradient_checkpointing": config.gradient_checkpointing,
        "s_per_step": statistics.median(seconds[1:] or seconds),
        "first_step_s": seconds[0],
        **peak_memory(args.device),
    }
    del trainer
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stages", nargs="+", default=["1", "2", "lora"], choices=("1", "2", "lora"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=None, help="default: 512 (128 with --reduced)")
    parser.add_argument("--frames", type=int, default=16, help="clip_frames of stage 2 and lora")
    parser.add_argument("--optimizer", choices=("adamw", "adamw_8bit"), default=None, help="default: train.yaml's")
    parser.add_argument("--reduced", action="store_true", help="narrow widths (a CPU smoke run)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args()
    args.resolution = args.resolution or sizes(args.reduced)["px"]
    with tempfile.TemporaryDirectory(prefix="bench-training-") as scratch:
        work = Path(scratch)
        pipe = build_pipeline(args.reduced, "cpu", torch.float16 if args.device.startswith("cuda") else torch.float32)
        pipe.save_pretrained(work / "tree")
        del pipe
        data = make_data(work / "data", max(args.frames, 4) + 30, args.resolution)
        rows = [run_stage(stage, work / "tree", data, work, args) for stage in args.stages]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
