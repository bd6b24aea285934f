"""Frame-rate conversion of label sequences: pick frames, never blend them (a blend of labels is no label)."""

import numpy as np


def resample_indices(count: int, fps_in: float, fps_out: float | None) -> np.ndarray:
    """Source frame shown at each output frame: nearest in time, keeping the clip's duration.

    ``count / fps_in`` seconds give ``round(count * fps_out / fps_in)`` frames (30 fps x 60 -> 50 at 25 fps);
    slower sources repeat frames, faster ones skip some. ``fps_out`` None keeps the source's frames.
    """
    if not fps_out or abs(fps_out - fps_in) < 1e-6:
        return np.arange(count)
    out = max(round(count * fps_out / fps_in), 1)
    return np.minimum(np.floor(np.arange(out) * fps_in / fps_out + 0.5).astype(np.int64), count - 1)
