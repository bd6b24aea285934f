"""Frame interpolation on the DensePose sample videos: drop every second frame, interpolate it back, compare.

For each video of ``--samples`` (default: ``../shared/samples/densepose``, the original repository's four DensePose
clips, 512x512), every odd frame between two even ones is made from its two neighbours and compared with the true
frame (PSNR over the frame, averaged over the frames of the video):

* ``repeat``: the previous frame (what a video at half the frame rate shows);
* ``blend``: the mean of the two neighbours;
* ``dis``: plain DIS optical flow (OpenCV, medium preset), each neighbour warped half-way along the flow from the
  other and the two averaged (no occlusion handling, no guide);
* ``flow``: the built-in :class:`~magicanimate.interpolation.FlowInterpolator` from the two neighbours alone (what a
  plug-in sees);
* ``flow+pose``: the built-in as ``frame_stride`` runs it, with the DensePose of every frame as the guide. Caveat:
  here the frames being interpolated *are* the DensePose, so the guide shows every edge of them exactly; animated
  frames (pictures of a person) have detail the DensePose does not show (texture inside a body part, clothes);
* ``flow+silhouette``: the same with a guide that knows less than the frames show: only the person's silhouette
  (DensePose part > 0, one colour), so every border between parts inside it must be moved by a flow measured on
  the silhouette alone. The fairer stand-in for animated frames, whose detail the DensePose lacks.

Time is per interpolated frame, at the videos' 512x512, on this machine's CPU with OpenCV's default threads
(``--threads`` sets them).

    python benchmarks/bench_interpolation.py [--samples DIR] [--step N] [--threads N] [--markdown]
"""

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from magicanimate.densepose.palette import LUT, nearest_labels  # noqa: E402
from magicanimate.interpolation import FlowInterpolator  # noqa: E402
from magicanimate.io import read_video  # noqa: E402

DEFAULT_SAMPLES = ROOT.parent / "shared" / "samples" / "densepose"
METHODS = ("repeat", "blend", "dis", "flow", "flow+silhouette", "flow+pose")
GUIDED = ("flow+silhouette", "flow+pose")


def psnr(estimate: np.ndarray, truth: np.ndarray) -> float:
    error = np.mean((estimate.astype(np.float64) - truth.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(error, 1e-10)))


def plain_dis(frame0: np.ndarray, frame1: np.ndarray) -> np.ndarray:
    """The baseline of issue 11: DIS flow both ways, each frame warped half-way, averaged."""
    import cv2

    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    gray0, gray1 = cv2.cvtColor(frame0, cv2.COLOR_RGB2GRAY), cv2.cvtColor(frame1, cv2.COLOR_RGB2GRAY)
    f01, f10 = dis.calc(gray0, gray1, None), dis.calc(gray1, gray0, None)
    height, width = frame0.shape[:2]
    grid = np.stack(np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)), -1)
    warped0 = cv2.remap(frame0, grid + 0.5 * f10, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    warped1 = cv2.remap(frame1, grid + 0.5 * f01, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return ((warped0.astype(np.float32) + warped1) / 2 + 0.5).astype(np.uint8)


def silhouettes(frames: np.ndarray) -> np.ndarray:
    """The DensePose reduced to where the person is: part > 0 in one palette colour, background elsewhere."""
    return np.stack([np.where((nearest_labels(f)[0] > 0)[..., None], LUT[12], LUT[0]) for f in frames]).astype(np.uint8)


def run(samples: Path, step: int) -> tuple[dict, dict]:
    """``(psnr[video][method], seconds per frame[method])``: the median time of one interpolated frame (a median,
    so that a busy machine's spikes do not count)."""
    interpolator = FlowInterpolator()
    methods = {
        "repeat": lambda f0, f1, pose, outline: f0,
        "blend": lambda f0, f1, pose, outline: ((f0.astype(np.float32) + f1) / 2 + 0.5).astype(np.uint8),
        "dis": lambda f0, f1, pose, outline: plain_dis(f0, f1),
        "flow": lambda f0, f1, pose, outline: interpolator.interpolate(f0, f1, [0.5])[0],
        "flow+silhouette": lambda f0, f1, pose, outline: interpolator.interpolate(f0, f1, [0.5], motion=outline)[0],
        "flow+pose": lambda f0, f1, pose, outline: interpolator.interpolate(f0, f1, [0.5], motion=pose)[0],
    }
    videos = sorted(samples.glob("*.mp4"))
    if not videos:
        raise SystemExit(f"no .mp4 in {samples}: pass --samples DIR (the DensePose sample videos)")
    scores, seconds = {}, {method: [] for method in METHODS}
    for video in videos:
        frames, _ = read_video(video)
        outlines = silhouettes(frames)
        middles = list(range(1, len(frames) - 1, 2))[::step]
        scores[video.name] = {}
        for method, make in methods.items():
            values = []
            for i in middles:
                start = time.perf_counter()
                estimate = make(frames[i - 1], frames[i + 1], frames[i - 1 : i + 2], outlines[i - 1 : i + 2])
                seconds[method].append(time.perf_counter() - start)
                values.append(psnr(estimate, frames[i]))
            scores[video.name][method] = float(np.mean(values))
        print(f"{video.name}: {len(middles)} frames, " + ", ".join(
            f"{m} {scores[video.name][m]:.2f}" for m in METHODS), file=sys.stderr, flush=True)  # fmt: skip
    return scores, {method: float(np.median(seconds[method])) for method in METHODS}


def table(scores: dict, per_frame: dict) -> str:
    lines = ["| video | " + " | ".join(METHODS) + " |", "|" + "---|" * (len(METHODS) + 1)]
    for name, row in scores.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[m]:.2f}" for m in METHODS) + " |")
    mean = {m: np.mean([row[m] for row in scores.values()]) for m in METHODS}
    lines.append("| **mean (dB)** | " + " | ".join(f"**{mean[m]:.2f}**" for m in METHODS) + " |")
    lines.append("| mean - blend | " + " | ".join(f"{mean[m] - mean['blend']:+.2f}" for m in METHODS) + " |")
    worst = {m: min(row[m] - row["blend"] for row in scores.values()) for m in METHODS}
    lines.append("| worst video - blend | " + " | ".join(f"{worst[m]:+.2f}" for m in METHODS) + " |")
    timing = " | ".join(f"{1000 * per_frame[m]:.1f}" for m in METHODS)
    lines.append(f"| ms per frame, 512x512 (median) | {timing} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=Path, default=DEFAULT_SAMPLES, help="folder of DensePose .mp4 videos")
    parser.add_argument("--step", type=int, default=1, help="use every N-th dropped frame (quicker, less exact)")
    parser.add_argument("--threads", type=int, default=None, help="OpenCV threads (default: OpenCV's own)")
    args = parser.parse_args(argv)
    import cv2

    if args.threads is not None:
        cv2.setNumThreads(args.threads)
    scores, per_frame = run(args.samples, args.step)
    print(f"{time.strftime('%Y-%m-%d')}, {_cpu()}, OpenCV {cv2.__version__} with {cv2.getNumThreads()} thread(s)")
    print(table(scores, per_frame))
    for method in GUIDED:
        gain = np.mean([row[method] - row["blend"] for row in scores.values()])
        worst = min(row[method] - row["blend"] for row in scores.values())
        verdict = "met" if gain >= 3.0 and worst > 0 else "NOT met"
        print(f"target ({method} at least blend + 3.0 dB on average, above blend on every video): {verdict} "
              f"(mean {gain:+.2f} dB, worst video {worst:+.2f} dB)")  # fmt: skip
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
