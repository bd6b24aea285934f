"""Which frames each UNet call sees when a clip is longer than the motion modules' window.

The motion modules and the cross-frame GroupNorms were trained on 16-frame clips, so a long clip is denoised as
overlapping windows whose predictions are averaged per frame.
"""

from dataclasses import dataclass

from ..distributed import rank_and_world, share
from ..errors import InputError


def context_windows(
    num_frames: int, context_frames: int = 16, context_overlap: int = 4, schedule: str = "uniform"
) -> list[list[int]]:
    """Frame indices of every window, in order.

    * ``"uniform"``: MagicAnimate's schedule (``uniform`` with ``closed_loop``, step 0, stride 1): windows start
      every ``context_frames - context_overlap`` frames while the start is inside the clip, and the last one wraps
      around to the first frames. For 32 frames: ``0..15``, ``12..27``, ``24..31 + 0..7``.
    * ``"sliding"``: the same stride without wrap-around; the last window is the clip's last ``context_frames``
      frames, so a non-looping motion never attends to its own beginning.
    """
    if context_overlap >= context_frames:
        raise InputError(f"context_overlap ({context_overlap}) must be smaller than context_frames ({context_frames})")
    if num_frames <= context_frames:
        return [list(range(num_frames))]
    stride = context_frames - context_overlap
    if schedule == "uniform":
        return [[(start + k) % num_frames for k in range(context_frames)] for start in range(0, num_frames, stride)]
    if schedule == "sliding":
        starts = list(range(0, num_frames - context_frames, stride)) + [num_frames - context_frames]
        return [list(range(start, start + context_frames)) for start in starts]
    raise InputError(f"context_schedule must be 'uniform' or 'sliding', got {schedule!r}")


def fusion_weights(context_frames: int, schedule: str = "uniform") -> list[float]:
    """Weight of each window position when overlapping predictions are averaged.

    ``"uniform"`` keeps the original's plain mean (all ones). ``"sliding"`` ramps the weights down towards the window
    edges (``min(k + 1, context_frames - k)``), so a frame's prediction comes mostly from the window that sees it in
    the middle and window seams do not show.
    """
    if schedule == "uniform":
        return [1.0] * context_frames
    return [float(min(k + 1, context_frames - k)) for k in range(context_frames)]


@dataclass
class WindowWork:
    """The windows of a clip and the part of them this process computes every step."""

    windows: list[list[int]]  # every window of the clip, in schedule order
    weights: list[float]  # fusion weight of each window position
    mine: list[list[int]]  # the windows this process runs
    branches: list[bool]  # guidance branches of the clip: [unconditional, conditional] or [conditional]
    my_branches: list[bool]  # the branches this process runs
    batch_size: int  # windows per UNet call
    control_chunk: int  # frames per ControlNet call
    distributed: bool

    @classmethod
    def plan(cls, windows, weights, guidance_scale, batch_size, distributed=False, cfg_parallel=False):
        branches = [False, True] if guidance_scale > 1 else [True]
        rank, world = rank_and_world() if distributed else (0, 1)
        my_branches, groups, group = branches, world, rank
        if cfg_parallel and world > 1 and len(branches) == 2:
            if world % 2:
                raise InputError(f"cfg_parallel needs an even number of processes, got {world}")
            my_branches, groups, group = [branches[rank % 2]], world // 2, rank // 2
        mine = share(windows, groups, group)
        return cls(windows, weights, mine, branches, my_branches, batch_size, len(weights), world > 1)
