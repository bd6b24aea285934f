"""Which person, and where the square output window sits in every frame.

MagicAnimate was trained on square 512x512 clips centred on one person ("center crop it and then resize to
512x512", the authors' advice). Framing is decided over the whole clip, not frame by frame, so the window moves
like a steady camera: one window size for the whole clip (a changing zoom would read as the body growing or
shrinking), a centre that stays put when the person's whole path fits in it and otherwise follows the track
through a Gaussian filter (no per-frame jitter), nudged only as far as needed to keep the person inside.
The window may leave the video frame: everything there is background (label 0), so the aspect ratio is kept by
padding, never by squashing.
"""

import numpy as np

from ..errors import InputError
from .person import Person, iou_matrix
from .render import paste_persons

PERSON_MODES = ("largest", "score", "all")


def select_persons(frames: list[list[Person]], mode: str = "largest", max_gap: int = 25) -> list[list[Person]]:
    """Keep, per frame, the persons that drive the motion.

    ``all`` keeps everyone. ``largest`` and ``score`` link detections into tracks (box overlap between
    consecutive frames, across gaps of up to `max_gap` frames) and keep the one track with the largest total area
    or total score over the clip: the person who is there and big (or confidently detected) for most of the clip,
    not whoever is biggest in one frame. Frames where that person is missing get an empty list.
    """
    if mode not in PERSON_MODES:
        raise InputError(f"person must be one of {', '.join(PERSON_MODES)}, got {mode!r}")
    if mode == "all":
        return [list(persons) for persons in frames]
    tracks: list[dict[int, Person]] = []  # frame index -> detection
    active: list[tuple[int, dict[int, Person]]] = []  # (last frame seen, track) of tracks that may continue
    for t, persons in enumerate(frames):
        active = [(last, track) for last, track in active if t - last <= max_gap]
        overlaps = np.zeros((len(active), len(persons)))
        if active and persons:
            overlaps = iou_matrix([track[last].box for last, track in active], [p.box for p in persons])
        taken_tracks, taken_persons = set(), set()
        for flat in np.argsort(-overlaps, axis=None, kind="stable"):
            i, j = divmod(int(flat), len(persons))
            if overlaps[i, j] < 0.2:
                break
            if i not in taken_tracks and j not in taken_persons:
                track = active[i][1]
                track[t], active[i] = persons[j], (t, track)
                taken_tracks.add(i)
                taken_persons.add(j)
        for j, person in enumerate(persons):
            if j not in taken_persons:
                tracks.append({t: person})
                active.append((t, tracks[-1]))
    if not tracks:
        return [[] for _ in frames]
    weight = (lambda p: p.area) if mode == "largest" else (lambda p: p.score)
    best = max(tracks, key=lambda track: sum(weight(p) for p in track.values()))
    return [[best[t]] if t in best else [] for t in range(len(frames))]


def crop_windows(boxes: np.ndarray, fps: float = 25.0, margin: float = 0.05, follow: float = 0.5) -> np.ndarray:
    """Square windows ``(F, 3)`` = ``(centre x, centre y, side)`` in frame pixels for per-frame boxes ``(F, 4)``.

    The side is the largest box extent over the clip (after a 5-frame median, so a one-frame false detection
    does not zoom out the whole clip) plus `margin` on each side (the original sample videos are cropped tight:
    the person spans 75-100% of the height). `follow` is the Gaussian sigma, in seconds, of
    the centre's smoothing when the window must move.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    extent = _median_filter(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]), 5)
    side = max(extent.max() * (1 + 2 * margin), 1.0)
    lo, hi = boxes[:, :2], boxes[:, 2:]
    span_lo, span_hi = lo.min(0), hi.max(0)
    if np.all(span_hi - span_lo <= side):  # the whole path fits: a fixed camera
        centre = np.broadcast_to((span_lo + span_hi) / 2, lo.shape).copy()
    else:
        centre = _median_filter((lo + hi) / 2, 5)
        sigma = max(follow * fps, 1e-6)
        for _ in range(3):  # smooth, then keep the box inside; repeat so the corrections are smoothed too
            centre = _gaussian_filter(centre, sigma)
            centre = np.clip(centre, np.minimum(hi - side / 2, lo + side / 2), np.maximum(hi - side / 2, lo + side / 2))
    return np.concatenate([centre, np.full((len(boxes), 1), side)], axis=1)


def frame_labels(
    persons: list[Person], window, size: int, transform: tuple[float, float, float] = (1.0, 0.0, 0.0)
) -> np.ndarray:
    """The ``size x size`` label map of `persons` seen through `window` ``(cx, cy, side)``.

    `transform` ``(s, tx, ty)`` then scales and shifts in output pixels (the reference alignment). Labels are
    resized nearest-neighbour, once, straight from the backend's resolution.
    """
    cx, cy, side = window
    s, tx, ty = transform
    scale = size / side * s
    offset = (tx - (cx - side / 2) * scale, ty - (cy - side / 2) * scale)
    return paste_persons(np.zeros((size, size), np.uint8), persons, scale, offset)


def window_boxes(boxes: np.ndarray, windows: np.ndarray, size: int) -> np.ndarray:
    """Boxes ``(F, 4)`` in frame pixels -> output pixels of their windows."""
    origin = windows[:, :2] - windows[:, 2:] / 2
    scale = size / windows[:, 2:]
    return (boxes - np.tile(origin, 2)) * scale


def _median_filter(values: np.ndarray, width: int) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 3:
        return values.copy()
    radius = min(width // 2, (len(values) - 1) // 2)
    padded = np.pad(values, [(radius, radius)] + [(0, 0)] * (values.ndim - 1), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * radius + 1, axis=0)
    return np.median(windows, axis=-1)


def _gaussian_filter(values: np.ndarray, sigma: float) -> np.ndarray:
    radius = int(3 * sigma + 0.5)
    if radius == 0:
        return values.copy()
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    # Point reflection at the ends continues a steady walk instead of freezing it, so the window does not lag.
    reach = min(radius, len(values) - 1)
    padded = np.pad(values, [(reach, reach)] + [(0, 0)] * (values.ndim - 1), mode="reflect", reflect_type="odd")
    padded = np.pad(padded, [(radius - reach, radius - reach)] + [(0, 0)] * (values.ndim - 1), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * radius + 1, axis=0)
    return windows @ kernel
