"""Frame interpolation: animate every k-th motion frame (``frame_stride``), fill the frames between.

:func:`stride_indices` picks the animated frames, :func:`fill_frames` fills the rest with an interpolator:
the built-in :class:`FlowInterpolator` (OpenCV optical flow, guided by the DensePose) or a plug-in following the
protocol of :mod:`magicanimate.interpolation.protocol`, found by :func:`load_interpolator`.
"""

from .flow import FlowInterpolator
from .protocol import ENTRY_POINT_GROUP, BatchInterpolator, Interpolator, find_interpolator, load_interpolator
from .stride import fill_frames, stride_indices

__all__ = [
    "ENTRY_POINT_GROUP",
    "BatchInterpolator",
    "FlowInterpolator",
    "Interpolator",
    "fill_frames",
    "find_interpolator",
    "load_interpolator",
    "stride_indices",
]
