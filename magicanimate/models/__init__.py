"""Networks: the video UNet, its GroupNorm variants, reference attention, and the original checkpoint formats."""

from .group_norms import CrossFrameGroupNorm, PerFrameGroupNorm
from .reference_attention import ReferenceAttentionControl, reference_layer_names
from .video_unet import VideoUNet, magicanimate_motion_adapter

__all__ = [
    "CrossFrameGroupNorm",
    "PerFrameGroupNorm",
    "ReferenceAttentionControl",
    "VideoUNet",
    "magicanimate_motion_adapter",
    "reference_layer_names",
]
