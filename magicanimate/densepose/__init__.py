"""DensePose extraction: from a raw video of a person to the driving video MagicAnimate expects.

``extract_motion("dance.mp4", model="densepose_r50_fpn_dl.torchscript")`` returns ``(frames, fps)``: 512x512
viridis part maps at 25 fps, one tracked person, smoothly framed and de-flickered. The pieces: backends yield
:class:`Person` detections (:mod:`.extractor`), :mod:`.framing` picks the person and the window,
:mod:`.smoothing` and :mod:`.resample` handle time, :mod:`.align` fits the motion to a reference body, and
:mod:`.render` / :mod:`.palette` hold the exact colours and the one check of whether a clip is DensePose
(:func:`check_motion`, :func:`looks_like_densepose`). Nothing here imports torch until a model is loaded.
"""

from .align import box_alignment
from .extractor import Detectron2Extractor, TorchScriptExtractor, load_extractor, resolve_model_path
from .framing import crop_windows, frame_labels, select_persons
from .motion import MotionLabels, extract_motion, iter_frames, plan_motion, write_motion
from .palette import (
    LUT,
    MOTION_PALETTE_SHARE,
    NUM_LABELS,
    check_motion,
    densepose_share,
    looks_like_densepose,
    nearest_labels,
    palette_share,
    sample_video,
)
from .person import Person
from .render import labels_to_rgb, paste_persons, render_persons, resize_labels
from .resample import resample_indices
from .smoothing import flip_rate, hold_last, majority_filter

__all__ = [
    "LUT",
    "MOTION_PALETTE_SHARE",
    "NUM_LABELS",
    "Detectron2Extractor",
    "MotionLabels",
    "Person",
    "TorchScriptExtractor",
    "box_alignment",
    "check_motion",
    "crop_windows",
    "densepose_share",
    "extract_motion",
    "flip_rate",
    "frame_labels",
    "hold_last",
    "iter_frames",
    "labels_to_rgb",
    "load_extractor",
    "looks_like_densepose",
    "majority_filter",
    "nearest_labels",
    "palette_share",
    "paste_persons",
    "plan_motion",
    "render_persons",
    "resample_indices",
    "resize_labels",
    "resolve_model_path",
    "sample_video",
    "select_persons",
    "write_motion",
]
