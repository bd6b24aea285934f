"""Feature reuse across denoising steps (DeepCache, Ma et al. 2024) for a clip denoised in windows.

Adjacent steps' deep UNet features change little, so every ``interval`` steps the whole video UNet runs and the
input of its outermost up block(s) is kept; the steps between run only the outer blocks on the kept features. The
kept features depend on the window (the motion modules see its frames) and the guidance branch (the reference only
enters the conditional rows), so the cache holds one entry per (window, branch); diffusers' generic cache hooks keep
one state per module, which would mix the windows of a step.
"""

import torch

Windows = list[list[int]]


class FeatureCache:
    """The deep features of the last full step, per window and guidance branch.

    ``interval``: a full step every ``interval`` steps (step 0 always); ``depth``: how many outer blocks (down and
    up) the other steps run; ``device``: where the features wait between steps (default: where they were made; the
    CPU saves accelerator memory, one copy per step). A step reuses the cache only when the last full step ran every
    branch it needs (:meth:`covers`), decided from the step's branches alone, so every process of a group decides
    the same.
    """

    def __init__(self, interval: int, depth: int = 1, device: torch.device | str | None = None):
        self.interval = interval
        self.depth = depth
        self.device = device
        self.features: dict[tuple[tuple[int, ...], bool], torch.Tensor] = {}
        self.branches: set[bool] = set()  # the branches of the last full step

    def reuses(self, step: int, branches: list[bool]) -> bool:
        """Whether step ``step`` (0-based) of the run reuses the cached features."""
        return step % self.interval != 0 and self.covers(branches)

    def covers(self, branches: list[bool]) -> bool:
        return bool(self.branches) and set(branches) <= self.branches

    def start_full_step(self, branches: list[bool]) -> None:
        """A full step begins: what it stores replaces everything kept."""
        self.features.clear()
        self.branches = set(branches)

    def store(self, windows: Windows, branches: list[bool], deep: torch.Tensor) -> None:
        """``deep``: ``(len(branches) * len(windows) * frames, C, h, w)``, rows grouped by branch, then window."""
        rows = deep.shape[0] // (len(branches) * len(windows))
        deep = deep if self.device is None else deep.to(self.device, non_blocking=True)
        for b, branch in enumerate(branches):
            for w, window in enumerate(windows):
                first = (b * len(windows) + w) * rows
                self.features[(tuple(window), branch)] = deep[first : first + rows]

    def take(self, windows: Windows, branches: list[bool], device: torch.device) -> torch.Tensor:
        """The stored features of ``windows`` for ``branches``, in the row order of :meth:`store`."""
        parts = [self.features[(tuple(window), branch)] for branch in branches for window in windows]
        return torch.cat(parts).to(device, non_blocking=True)

    def clear(self) -> None:
        self.features.clear()
        self.branches = set()
