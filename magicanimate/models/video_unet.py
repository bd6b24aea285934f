"""The video UNet: SD 1.5's UNet with AnimateDiff-v1 motion modules, normalised the way MagicAnimate normalises.

This is diffusers' ``UNetMotionModel`` with its GroupNorms swapped (see :mod:`.group_norms`); nothing else differs,
so everything diffusers offers for it (attention processors, ``from_unet2d``, ``save_pretrained``) keeps working.
"""

import functools

import torch
from diffusers import ModelMixin, MotionAdapter, UNetMotionModel  # noqa: F401 - ModelMixin: see below
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

from .group_norms import CrossFrameGroupNorm, PerFrameGroupNorm, swap_group_norm

# DiffusionPipeline.from_pretrained finds a component's load method by looking up ``ModelMixin`` in the module named
# in model_index.json (this one), hence the import above: it lets saved pipelines load VideoUNet back.


class VideoUNet(UNetMotionModel):
    """``UNetMotionModel`` whose resnets and output norm see the whole window and whose motion modules see one frame.

    Input ``sample`` is ``(batch, channels, frames, height, width)``; ``encoder_hidden_states`` and ControlNet
    residuals are per frame, ``(batch * frames, ...)``, frame index fastest (as in ``UNetMotionModel``).
    """

    @functools.wraps(UNetMotionModel.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for module in self.modules():
            if isinstance(module, ResnetBlock2D):
                swap_group_norm(module, "norm1", CrossFrameGroupNorm)
                swap_group_norm(module, "norm2", CrossFrameGroupNorm)
            elif isinstance(module, AnimateDiffTransformer3D):
                swap_group_norm(module, "norm", PerFrameGroupNorm)
        if self.conv_norm_out is not None:
            swap_group_norm(self, "conv_norm_out", CrossFrameGroupNorm)
        self._cross_frame_norms = [m for m in self.modules() if isinstance(m, CrossFrameGroupNorm)]

    def forward(self, sample: torch.Tensor, *args, **kwargs):
        for norm in self._cross_frame_norms:
            norm.num_frames = sample.shape[2]
        return super().forward(sample, *args, **kwargs)


def magicanimate_motion_adapter(block_out_channels=(320, 640, 1280, 1280), **overrides) -> MotionAdapter:
    """The motion-module topology of MagicAnimate's ``inference.yaml`` (AnimateDiff v1: 8 heads, 2 per down level,
    sinusoidal positions up to 24 frames, no mid-block module)."""
    config = dict(
        block_out_channels=tuple(block_out_channels),
        motion_layers_per_block=2,
        motion_num_attention_heads=8,
        motion_norm_num_groups=32,
        motion_max_seq_length=24,
        use_motion_mid_block=False,
    )
    config.update(overrides)
    return MotionAdapter(**config)
