"""The one intermediate every backend produces and every later step consumes: a detected person."""

from dataclasses import dataclass

import numpy as np


@dataclass
class Person:
    """One detection: where it is, how sure the detector is, and its part labels.

    Attributes:
        box: ``(x0, y0, x1, y1)`` float32 in pixels of the frame it was found in.
        score: detection confidence; only compared between persons (higher wins overlaps and ``person="score"``).
        labels: uint8 part ids 0..24 (0 = not this person) covering exactly the box. Its resolution may be lower
            than the box's (backends cap it to save memory); it is placed with nearest-neighbour resampling.
    """

    box: np.ndarray
    score: float
    labels: np.ndarray

    def __post_init__(self):
        self.box = np.asarray(self.box, dtype=np.float32).reshape(4)
        self.labels = np.asarray(self.labels, dtype=np.uint8)

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)


def union_box(persons: list[Person]) -> np.ndarray | None:
    """The box around all `persons` (None for an empty list)."""
    if not persons:
        return None
    boxes = np.stack([p.box for p in persons])
    return np.concatenate([boxes[:, :2].min(0), boxes[:, 2:].max(0)])


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every xyxy box in `a` ``(n, 4)`` with every one in `b` ``(m, 4)``: ``(n, m)``."""
    a, b = np.asarray(a, np.float64).reshape(-1, 1, 4), np.asarray(b, np.float64).reshape(1, -1, 4)
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = w * h
    union = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return np.divide(inter, union - inter, out=np.zeros_like(inter), where=union - inter > 0)
