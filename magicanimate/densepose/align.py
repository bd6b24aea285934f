"""Fit the motion to the reference body (``--align-to-reference``).

MagicAnimate paints the reference person where the DensePose person is: when the dancer in the driving video is
smaller, larger or off-centre compared with the person in the photo, the result stretches or shifts the body. One
scale and one shift for the whole clip, applied to the label maps, put the driving person (its median box over
the clip) onto the reference person's box: size and position change, the motion itself does not.
"""

import numpy as np

from ..errors import InputError
from ..io import load_image


def box_alignment(driving_box, reference_box) -> tuple[float, float, float]:
    """``(s, tx, ty)`` with ``p -> s * p + t`` mapping `driving_box` onto `reference_box` (xyxy).

    The scale matches the heights (widths follow the pose: arms out, side view), the shift the centres.
    """
    d, r = np.asarray(driving_box, np.float64), np.asarray(reference_box, np.float64)
    if d[3] - d[1] <= 0 or r[3] - r[1] <= 0:
        raise InputError("cannot align to an empty box")
    s = (r[3] - r[1]) / (d[3] - d[1])
    t = (r[:2] + r[2:]) / 2 - s * (d[:2] + d[2:]) / 2
    return float(s), float(t[0]), float(t[1])


def transform_box(box, transform: tuple[float, float, float]) -> np.ndarray:
    s, tx, ty = transform
    return np.asarray(box, np.float64) * s + np.array([tx, ty, tx, ty])


def reference_box(reference, extractor, size: int, box=None) -> np.ndarray:
    """The reference person's box in the ``size x size`` output frame.

    The pipeline resizes the reference photo to the motion's frame (no crop), so photo pixels map by
    ``size / width`` and ``size / height``. `box` (xyxy in photo pixels) is used when given; otherwise the
    largest person `extractor` finds in the photo.

    Raises:
        InputError: no person is found in the photo (pass a box instead).
    """
    image = np.asarray(load_image(reference))
    height, width = image.shape[:2]
    if box is None:
        persons = next(iter(extractor.extract([image])))
        if not persons:
            raise InputError("no person found in the reference image; pass its box (--reference-box X0,Y0,X1,Y1)")
        box = max(persons, key=lambda p: p.area).box
    box = np.asarray(box, np.float64).reshape(4)
    return box * np.array([size / width, size / height, size / width, size / height])
