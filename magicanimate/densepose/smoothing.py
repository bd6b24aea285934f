"""Temporal clean-up of label sequences, and a number for flicker.

Raw DensePose flickers: part borders and whole parts switch labels from one frame to the next, and detections
drop out for single frames. A per-pixel majority over a few frames removes one-frame flips without moving the
parts (it never invents a label that is not in the window), and holding the last detection keeps the motion
continuous where the detector missed the person. :class:`FlipCounter` measures the result.
"""

from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

from ..errors import InputError
from .person import Person


def hold_last(frames: list[list[Person]]) -> list[list[Person]]:
    """Frames without a person repeat the last frame that had one (frames before the first detection repeat it).

    Raises:
        InputError: no frame has a person.
    """
    first = next((persons for persons in frames if persons), None)
    if first is None:
        raise InputError("no person detected in any frame; use a video where one person is clearly visible")
    held, last = [], first
    for persons in frames:
        last = persons or last
        held.append(last)
    return held


def majority_filter(labels: Iterable[np.ndarray], window: int = 3) -> Iterator[np.ndarray]:
    """Per-pixel most frequent label over `window` frames centred on each frame, streamed (holds `window` frames).

    Ties keep the centre frame's label; near the ends the window shrinks. `window` <= 1 passes frames through;
    an even `window` is widened by one to stay centred.
    """
    radius = max(int(window), 1) // 2
    if radius == 0:
        yield from labels
        return
    buffer: deque[np.ndarray] = deque()  # frames i - radius .. i + radius of the current output frame i
    centre = 0  # index in buffer of the next frame to output
    for frame in labels:
        buffer.append(frame)
        if len(buffer) > 2 * radius + 1:
            buffer.popleft()
            centre -= 1
        if len(buffer) - 1 - centre == radius:  # the centre frame has its full look-ahead
            yield _mode(buffer, centre)
            centre += 1
    while centre < len(buffer):  # the last frames, with a shrinking look-ahead
        yield _mode(buffer, centre)
        centre += 1


def _mode(frames, centre: int) -> np.ndarray:
    best = frames[centre].copy()
    best_count = sum(f == best for f in frames)
    for j, candidate in enumerate(frames):
        if j == centre:
            continue
        count = sum(f == candidate for f in frames)
        better = count > best_count
        best[better], best_count[better] = candidate[better], count[better]
    return best


class FlipCounter:
    """Counts label changes between consecutive frames: :meth:`rate` is flips per pixel per second."""

    def __init__(self):
        self.flips, self.pixels, self.transitions, self._last = 0, 0, 0, None

    def update(self, labels: np.ndarray) -> np.ndarray:
        if self._last is not None:
            self.flips += int(np.count_nonzero(labels != self._last))
            self.transitions += 1
        self._last, self.pixels = labels, labels.size
        return labels

    def rate(self, fps: float) -> float:
        return self.flips / self.pixels / (self.transitions / fps) if self.transitions else 0.0


def flip_rate(labels: Iterable[np.ndarray], fps: float) -> float:
    """Label flips per pixel per second of a label sequence (0 for a still one)."""
    counter = FlipCounter()
    for frame in labels:
        counter.update(frame)
    return counter.rate(fps)
