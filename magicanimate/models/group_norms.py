"""The two GroupNorm variants that make diffusers' ``UNetMotionModel`` compute what MagicAnimate computes.

MagicAnimate's UNet is AnimateDiff-v1 code: its resnets apply ``nn.GroupNorm`` to the 5-D tensor
``(batch, channels, frames, h, w)``, so their statistics span every frame of the current window, while its motion
modules normalise each frame on its own. diffusers does the opposite (resnets per frame, motion modules over the
frames). Swapping these two subclasses in keeps every parameter name, so checkpoints load unchanged.
"""

import torch
from torch import nn


class CrossFrameGroupNorm(nn.GroupNorm):
    """GroupNorm over channel-group x frames x H x W of each clip, for inputs laid out as ``(batch * frames, C, H, W)``.

    The caller sets :attr:`num_frames` before each forward (``VideoUNet.forward`` does), since the resnets that own
    these norms never see the frame count.

    Computed on a ``(clips, frames, groups, channels_per_group, H, W)`` view of the input, so no transposed copy is
    made and contiguous and channels-last inputs keep their layout. A textbook two-pass variance: the group means (a
    sum over H x W, then over each group's frames and channels), then the centred input, whose sums of squares give
    the variance without the cancellation of ``E[x**2] - E[x]**2`` (which loses digits wherever a group's mean is far
    above its spread; PyTorch's channels-last CPU kernel has that problem). The centred tensor is then scaled and
    shifted in place (outside autograd), so the norm allocates one tensor of the input's size. Statistics and
    normalise are float32 for lower-precision inputs, as ``F.group_norm`` computes them; the output has the input's
    dtype.
    """

    num_frames: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_frames == 1:
            return super().forward(x)
        batch_frames, channels, *spatial = x.shape
        groups = self.num_groups
        view = (batch_frames // self.num_frames, self.num_frames, groups, channels // groups, *spatial)
        per_group = (view[0], 1, groups, 1, *[1] * len(spatial))
        per_channel = (groups, view[3], *[1] * len(spatial))
        count = x[0].numel() * self.num_frames // groups
        spatial_dims = tuple(range(4, 4 + len(spatial)))

        accumulate = torch.promote_types(x.dtype, torch.float32)

        # H x W first, then the small (clips, frames, groups, channels) rest: on CPUs much faster than one reduction
        # over the strided 6-D view.
        mean = x.view(view).sum(dim=spatial_dims, dtype=accumulate).sum(dim=(1, 3)) / count  # (clips, groups)
        centred = x.view(view) - mean.view(per_group)  # float32 or wider (type promotion), in the layout of x
        if centred.stride(-1) == 1:  # W contiguous: vector_norm reads once, without a temporary
            squares = torch.linalg.vector_norm(centred, dim=spatial_dims).square()
        else:  # channels last: CPU reductions over the outer H, W dims vectorise for sum but not for vector_norm
            squares = centred.square().sum(dim=spatial_dims)
        variance = squares.sum(dim=(1, 3)) / count

        scale = torch.rsqrt(variance + self.eps).view(per_group)
        if self.weight is not None:
            scale = scale * self.weight.to(accumulate).view(per_channel)
        shift = self.bias.to(accumulate).view(per_channel) if self.bias is not None else 0.0
        if torch.is_grad_enabled():  # autograd keeps ``centred`` for vector_norm's backward: no in-place update
            out = centred * scale + shift
        else:  # two in-place passes: on CPUs faster than one broadcasting addcmul
            out = centred.mul_(scale).add_(shift)
        return out.to(x.dtype).view(x.shape)


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
