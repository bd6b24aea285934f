"""From part labels to the RGB frames MagicAnimate expects.

Everything stays in label space (uint8 part ids) until the very last step, :func:`labels_to_rgb`, so resizing
never mixes colours: a pixel is always exactly one palette entry (before video compression).
"""

import numpy as np

from .palette import LUT
from .person import Person


def labels_to_rgb(labels: np.ndarray) -> np.ndarray:
    """Part ids `(..., H, W)` -> RGB `(..., H, W, 3)` uint8 through the viridis palette, alpha 1 (no photo blend)."""
    return LUT[np.asarray(labels, dtype=np.uint8)]


def resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map: every output pixel copies one input pixel (labels stay pure).

    Sampling at pixel centres, as OpenCV's INTER_NEAREST_EXACT and PIL's NEAREST do; integer upscales repeat pixels.
    """
    rows, cols = _nearest(labels.shape[0], height), _nearest(labels.shape[1], width)
    return labels[rows[:, None], cols[None, :]]


def _nearest(size_in: int, size_out: int) -> np.ndarray:
    """Input index sampled by each of `size_out` output pixels (pixel-centre aligned)."""
    return np.minimum(((np.arange(size_out) + 0.5) * size_in / size_out).astype(np.int64), size_in - 1)


def paste_persons(
    canvas: np.ndarray, persons: list[Person], scale: float = 1.0, offset: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """Paint `persons` into the label `canvas` (in place), mapping frame pixels by ``p * scale + offset``.

    Only part pixels (label > 0) are painted, so a person's box never hides another person's parts. Persons are
    painted in increasing score, so where two overlap the higher-score one wins. With ``scale=1, offset=0`` and
    labels at box resolution this places labels exactly as detectron2's visualizer does (at ``int(x0), int(y0)``,
    size ``int(w) x int(h)``).
    """
    height, width = canvas.shape
    for person in sorted(persons, key=lambda p: p.score):
        x0, y0 = person.box[:2] * scale + np.asarray(offset)
        left, top = int(np.floor(x0)), int(np.floor(y0))
        w, h = max(int(person.width * scale), 1), max(int(person.height * scale), 1)
        # Visible part of the target rectangle, then only that part of the resized labels.
        cl, ct, cr, cb = max(left, 0), max(top, 0), min(left + w, width), min(top + h, height)
        if cl >= cr or ct >= cb:
            continue
        rows = _nearest(person.labels.shape[0], h)[ct - top : cb - top]
        cols = _nearest(person.labels.shape[1], w)[cl - left : cr - left]
        patch = person.labels[rows[:, None], cols[None, :]]
        region = canvas[ct:cb, cl:cr]
        np.copyto(region, patch, where=patch > 0)
    return canvas


def render_persons(persons: list[Person], height: int, width: int) -> np.ndarray:
    """RGB frame `(height, width, 3)` of `persons` in frame coordinates on the purple background."""
    return labels_to_rgb(paste_persons(np.zeros((height, width), np.uint8), persons))
