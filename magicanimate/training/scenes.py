"""Scene cuts: where a video jumps to another shot, by how much the colour histogram changes between frames.

A cut changes most of the picture at once, so the colour distribution of consecutive frames differs much more than
within a shot, where a person moving changes a small part of it. Each frame's hue-saturation histogram (OpenCV,
on a small copy) is compared with the previous frame's by the Bhattacharyya distance (0: same distribution, 1: no
overlap); a distance above ``threshold`` starts a new scene. Simple on purpose: training clips only need to not
straddle a cut, and a missed soft transition (a slow fade) costs one blurry clip, not a wrong model.
"""

from collections.abc import Iterable

import numpy as np

DEFAULT_THRESHOLD = 0.5
_BINS = (30, 32)  # hue, saturation
_SMALL = 128  # the longer side of the copy the histogram is taken on


def colour_histogram(frame: np.ndarray) -> np.ndarray:
    """Normalised hue-saturation histogram of an RGB frame (float32, sums to 1)."""
    import cv2

    height, width = frame.shape[:2]
    scale = _SMALL / max(height, width)
    if scale < 1:
        frame = cv2.resize(
            frame, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA
        )
    hsv = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1], None, list(_BINS), [0, 180, 0, 256])
    return (hist / max(float(hist.sum()), 1.0)).astype(np.float32)


def scene_ranges(frames: Iterable[np.ndarray], threshold: float = DEFAULT_THRESHOLD) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` frame ranges (end exclusive) of the scenes of a clip, in order, covering it."""
    import cv2

    starts, previous, count = [0], None, 0
    for index, frame in enumerate(frames):
        hist = colour_histogram(frame)
        if previous is not None and cv2.compareHist(previous, hist, cv2.HISTCMP_BHATTACHARYYA) > threshold:
            starts.append(index)
        previous, count = hist, index + 1
    if count == 0:
        return []
    return list(zip(starts, [*starts[1:], count], strict=True))
