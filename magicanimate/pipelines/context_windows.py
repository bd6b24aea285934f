"""Which frames each UNet call sees when a clip is longer than the motion modules' window, and how the overlapping
predictions are fused.

The motion modules and the cross-frame GroupNorms were trained on 16-frame clips, so a long clip is denoised as
overlapping windows whose predictions are averaged per frame. A schedule has two parts, each in its registry under
the schedule's name: :data:`CONTEXT_SCHEDULES` (the windows) and :data:`FUSION_WEIGHTS` (the weight of each window
position in the average). Add one with :func:`register_context_schedule`.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..distributed import WorkShare, share_work
from ..errors import InputError

Windows = list[list[int]]
ScheduleFn = Callable[[int, int, int], Windows]  # (num_frames, context_frames, context_overlap) -> windows
WeightsFn = Callable[[int], list[float]]  # context_frames -> weight of each window position


def uniform_windows(num_frames: int, context_frames: int, context_overlap: int) -> Windows:
    """MagicAnimate's schedule (``uniform`` with ``closed_loop``, step 0, stride 1): windows start every
    ``context_frames - context_overlap`` frames while the start is inside the clip, and the last one wraps around to
    the first frames. For 32 frames: ``0..15``, ``12..27``, ``24..31 + 0..7``."""
    stride = context_frames - context_overlap
    return [[(start + k) % num_frames for k in range(context_frames)] for start in range(0, num_frames, stride)]


def sliding_windows(num_frames: int, context_frames: int, context_overlap: int) -> Windows:
    """The same stride without wrap-around; the last window is the clip's last ``context_frames`` frames, so a
    non-looping motion never attends to its own beginning."""
    stride = context_frames - context_overlap
    starts = list(range(0, num_frames - context_frames, stride)) + [num_frames - context_frames]
    return [list(range(start, start + context_frames)) for start in starts]


def equal_weights(context_frames: int) -> list[float]:
    """Every position counts once: the original's plain mean."""
    return [1.0] * context_frames


def ramp_weights(context_frames: int) -> list[float]:
    """``min(k + 1, context_frames - k)``: a frame's prediction comes mostly from the window that sees it in the
    middle, so window seams do not show."""
    return [float(min(k + 1, context_frames - k)) for k in range(context_frames)]


CONTEXT_SCHEDULES: dict[str, ScheduleFn] = {"uniform": uniform_windows, "sliding": sliding_windows}
FUSION_WEIGHTS: dict[str, WeightsFn] = {"uniform": equal_weights, "sliding": ramp_weights}


def register_context_schedule(name: str, windows: ScheduleFn, weights: WeightsFn = equal_weights) -> None:
    """Make ``context_schedule=name`` available. ``windows(num_frames, context_frames, context_overlap)`` is only
    called for clips longer than one window and must cover every frame; ``weights(context_frames)`` gives the
    fusion weight of each window position (all positive)."""
    CONTEXT_SCHEDULES[name] = windows
    FUSION_WEIGHTS[name] = weights


def check_schedule(schedule: str) -> None:
    if schedule not in CONTEXT_SCHEDULES:
        raise InputError(f"context_schedule must be one of {', '.join(sorted(CONTEXT_SCHEDULES))}, got {schedule!r}")


def context_windows(
    num_frames: int, context_frames: int = 16, context_overlap: int = 4, schedule: str = "uniform"
) -> Windows:
    """Frame indices of every window, in order (see :data:`CONTEXT_SCHEDULES`). A clip that fits in one window is
    that one window, whatever the schedule."""
    check_schedule(schedule)
    if context_overlap >= context_frames:
        raise InputError(f"context_overlap ({context_overlap}) must be smaller than context_frames ({context_frames})")
    if num_frames <= context_frames:
        return [list(range(num_frames))]
    return CONTEXT_SCHEDULES[schedule](num_frames, context_frames, context_overlap)


def fusion_weights(context_frames: int, schedule: str = "uniform") -> list[float]:
    """Weight of each window position when overlapping predictions are averaged (see :data:`FUSION_WEIGHTS`)."""
    check_schedule(schedule)
    return FUSION_WEIGHTS[schedule](context_frames)


@dataclass
class WindowWork:
    """The windows of a clip, their fusion weights, and the part of every step this process computes."""

    windows: Windows  # every window of the clip, in schedule order
    weights: list[float]  # fusion weight of each window position
    branches: list[bool]  # guidance branches of the clip: [unconditional, conditional] or [conditional]
    batch_size: int  # windows per UNet call
    share: WorkShare  # the windows and branches this process runs

    @classmethod
    def plan(cls, windows, weights, guidance_scale, batch_size, distributed=False, cfg_parallel=False):
        branches = [False, True] if guidance_scale > 1 else [True]
        return cls(windows, weights, branches, batch_size, share_work(windows, branches, distributed, cfg_parallel))

    @property
    def window_frames(self) -> int:
        """Frames per window (``context_frames``, or the clip's length when shorter)."""
        return len(self.weights)

    def batches(self) -> list[Windows]:
        """This process's windows, ``batch_size`` per UNet call."""
        mine = self.share.windows
        return [mine[first : first + self.batch_size] for first in range(0, len(mine), self.batch_size)]


class WindowAccumulator:
    """The weighted per-frame mean of overlapping window predictions, then classifier-free guidance.

    Sums are float32 even when the models run in float16 (the original sums in float16). Every prediction is
    multiplied by the weight of its window position; each frame is divided by the summed weights of all windows of
    the clip that contain it (the original's plain mean when all weights are 1). Predictions added elsewhere (other
    ranks) can be summed into :attr:`sums` before :meth:`guided_noise`.
    """

    def __init__(self, windows: Windows, weights: list[float], branches: list[bool], like: torch.Tensor):
        self.branches = branches
        self.sums = torch.zeros((len(branches), *like.shape[1:]), dtype=torch.float32, device=like.device)
        self.weights = torch.tensor(weights, dtype=torch.float32, device=like.device)[:, None, None]
        self.total_weight = torch.zeros((1, 1, like.shape[2], 1, 1), dtype=torch.float32, device=like.device)
        for window in windows:
            self.total_weight[:, :, window] += self.weights

    def add(self, prediction: torch.Tensor, windows: Windows, branches: list[bool]) -> None:
        """``prediction``: ``(len(branches) * len(windows), C, F, h, w)``, rows grouped by branch."""
        for row, branch in enumerate(branches):
            for w, window in enumerate(windows):
                self.sums[self.branches.index(branch), :, window] += prediction[row * len(windows) + w] * self.weights

    def guided_noise(self, guidance_scale: float) -> torch.Tensor:
        """``(1, C, F, h, w)``: the fused prediction, guided when there are two branches."""
        noise = self.sums / self.total_weight
        if len(self.branches) == 2:
            uncond, cond = noise.chunk(2)
            return uncond + guidance_scale * (cond - uncond)
        return noise
