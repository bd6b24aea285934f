"""The two GroupNorm variants that make diffusers' ``UNetMotionModel`` compute what MagicAnimate computes.

MagicAnimate's UNet is AnimateDiff-v1 code: its resnets apply ``nn.GroupNorm`` to the 5-D tensor
``(batch, channels, frames, h, w)``, so their statistics span every frame of the current window, while its motion
modules normalise each frame on its own. diffusers does the opposite (resnets per frame, motion modules over the
frames). Swapping these two subclasses in keeps every parameter name, so checkpoints load unchanged.
"""

import torch
import torch.nn.functional as F
from torch import nn


class CrossFrameGroupNorm(nn.GroupNorm):
    """GroupNorm over channel-group x frames x H x W of each clip, for inputs laid out as ``(batch * frames, C, H, W)``.

    The caller sets :attr:`num_frames` before each forward (``VideoUNet.forward`` does), since the resnets that own
    these norms never see the frame count.
    """

    num_frames: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_frames == 1:
            return super().forward(x)
        batch_frames, channels, *spatial = x.shape
        clips = x.view(batch_frames // self.num_frames, self.num_frames, channels, *spatial).transpose(1, 2)
        out = F.group_norm(clips, self.num_groups, self.weight, self.bias, self.eps)
        return out.transpose(1, 2).reshape(x.shape)


class PerFrameGroupNorm(nn.GroupNorm):
    """GroupNorm of each frame on its own, for inputs laid out as ``(batch, C, frames, H, W)`` (motion modules)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            return super().forward(x)
        batch, channels, frames, *spatial = x.shape
        frames_first = x.transpose(1, 2).reshape(batch * frames, channels, *spatial)
        out = super().forward(frames_first)
        return out.view(batch, frames, channels, *spatial).transpose(1, 2)


def swap_group_norm(parent: nn.Module, name: str, cls: type[nn.GroupNorm]) -> None:
    """Replace ``parent.<name>`` (an ``nn.GroupNorm``) by an instance of ``cls`` that shares its parameters."""
    old = getattr(parent, name)
    new = cls(old.num_groups, old.num_channels, eps=old.eps, affine=old.affine, device="meta")
    new.weight, new.bias = old.weight, old.bias
    setattr(parent, name, new)
