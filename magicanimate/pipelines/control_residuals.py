"""The DensePose ControlNet's residuals of one denoising step, computed when first needed and freed after use."""

from collections import Counter
from collections.abc import Callable

import torch

Windows = list[list[int]]


class ControlResiduals:
    """Per-frame ControlNet residuals (12 down + 1 mid) of a clip at one timestep.

    ``encode(frames)`` runs the ControlNet on a ``slice`` of frames. It is called in fixed chunks of ``chunk_size``
    frames (the original's 16-frame chunks), so every frame's residuals are the same floats however the windows are
    batched or split across ranks, and no frame is encoded twice. A chunk is computed for the first window that needs
    it and dropped after the last of ``windows`` (the windows this process will :meth:`take`) that uses it, so memory
    does not grow with the clip length.
    """

    def __init__(self, encode: Callable[[slice], list[torch.Tensor]], chunk_size: int, windows: Windows):
        self.encode = encode
        self.chunk_size = chunk_size
        self.uses_left = Counter(frame // chunk_size for window in windows for frame in window)
        self.chunks: dict[int, list[torch.Tensor]] = {}  # chunk index -> residuals of its frames

    def take(self, windows: Windows) -> list[torch.Tensor]:
        """The residuals of every frame of ``windows`` in order (``(frames, ...)`` each, the frames of all windows);
        the guidance branches share them (the UNet call repeats them where it needs one copy per branch)."""
        frames = [frame for window in windows for frame in window]
        size = self.chunk_size
        for chunk in sorted({frame // size for frame in frames} - self.chunks.keys()):
            self.chunks[chunk] = self.encode(slice(chunk * size, (chunk + 1) * size))
        residuals = [
            torch.stack([self.chunks[frame // size][i][frame % size] for frame in frames])
            for i in range(len(self.chunks[frames[0] // size]))
        ]
        for frame in frames:
            self.uses_left[frame // size] -= 1
            if self.uses_left[frame // size] == 0:
                del self.chunks[frame // size]
        return residuals
