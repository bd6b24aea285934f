"""The video UNet: SD 1.5's UNet with AnimateDiff-v1 motion modules, normalised the way MagicAnimate normalises.

This is diffusers' ``UNetMotionModel`` with its GroupNorms swapped (see :mod:`.group_norms`), so everything diffusers
offers for it (attention processors, ``from_unet2d``, ``save_pretrained``) keeps working. The one addition: its
forward split in two (:meth:`VideoUNet.forward_down`, :meth:`VideoUNet.forward_mid_up`), so that one down path can
serve several copies of the mid and up blocks (``forward(..., mid_up_repeats=n)``), and so that a step can reuse the
deep features of an earlier one and run only the outer blocks (``forward(..., cache_depth=d, deep_features=...)``,
DeepCache).
"""

import functools
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ModelMixin, MotionAdapter, UNetMotionModel  # noqa: F401 - ModelMixin: see below
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D, UNetMotionOutput
from diffusers.utils import apply_lora_scale
from diffusers.utils.torch_utils import maybe_adjust_dtype_for_device

from .group_norms import CrossFrameGroupNorm, PerFrameGroupNorm, swap_group_norm

# DiffusionPipeline.from_pretrained finds a component's load method by looking up ``ModelMixin`` in the module named
# in model_index.json (this one), hence the import above: it lets saved pipelines load VideoUNet back.


@dataclass
class DownPath:
    """What the mid and up blocks of a :class:`VideoUNet` call need from its down path (see
    :meth:`VideoUNet.forward_down`)."""

    sample: torch.Tensor  # (batch * frames, C, h, w): the last down block's output
    skips: tuple[torch.Tensor, ...]  # the skip connections, ControlNet residuals already added
    emb: torch.Tensor  # (batch * frames, time_embed_dim): the timestep embedding of every frame
    num_frames: int
    forward_upsample_size: bool  # the latent size is not a multiple of the up-sampling factor

    def repeat(self, copies: int) -> "DownPath":
        """``copies`` copies of every batch row, grouped by copy (``Tensor.repeat`` along the batch)."""

        def rows(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.repeat(copies, *[1] * (tensor.ndim - 1))

        skips = tuple(rows(skip) for skip in self.skips)
        return DownPath(rows(self.sample), skips, rows(self.emb), self.num_frames, self.forward_upsample_size)


class VideoUNet(UNetMotionModel):
    """``UNetMotionModel`` whose resnets and output norm see the whole window and whose motion modules see one frame.

    Input ``sample`` is ``(batch, channels, frames, height, width)``; ``encoder_hidden_states`` and ControlNet
    residuals are per frame, ``(batch * frames, ...)``, frame index fastest (as in ``UNetMotionModel``).

    ``forward(..., mid_up_repeats=n)`` runs the down path once and the mid and up blocks on ``n`` copies of its
    result: MagicAnimate's two guidance branches differ only from the mid block on (with "midup" reference
    attention), so their down path is one computation. diffusers' forward is one piece; :meth:`forward_down` and
    :meth:`forward_mid_up` are its two halves, the same code on the same diffusers blocks.
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

    def set_num_frames(self, num_frames: int) -> None:
        """Tell the cross-frame norms how many frames a clip has (their inputs are ``(batch * frames, ...)``)."""
        for norm in self._cross_frame_norms:
            norm.num_frames = num_frames

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        return_dict: bool = True,
        mid_up_repeats: int = 1,
        cache_depth: int = 0,
        deep_features: torch.Tensor | None = None,
    ) -> UNetMotionOutput | tuple[torch.Tensor, ...]:
        """``UNetMotionModel.forward``. With ``mid_up_repeats=n > 1`` the output is what the plain forward gives for
        ``sample``, ``encoder_hidden_states`` and the residuals repeated ``n`` times along the batch (rows grouped
        by copy), when the copies see the same down blocks: the down path runs once, at the batch of ``sample``,
        and only the mid and up blocks run on the ``n`` copies (whatever tells the copies apart, e.g. reference
        attention on some rows, must act there). Only the arguments MagicAnimate uses are supported then.

        Feature reuse across steps (DeepCache): with ``cache_depth=d > 0`` and no ``deep_features`` the call also
        returns the input of the outermost ``d`` up blocks, ``(out, deep)`` (``return_dict=False`` only); given those
        ``deep_features`` of an earlier step, it runs only ``conv_in``, the first ``d`` down blocks (whose skip
        connections, plus the ControlNet residuals of those blocks only, feed the outer up blocks), the last ``d`` up
        blocks and the output layers, on the cached features in place of everything deeper."""
        if cache_depth and return_dict:
            raise ValueError("cache_depth > 0 returns the deep features too: call with return_dict=False")
        if mid_up_repeats == 1 and not cache_depth:
            self.set_num_frames(sample.shape[2])
            return super().forward(
                sample,
                timestep,
                encoder_hidden_states,
                timestep_cond=timestep_cond,
                attention_mask=attention_mask,
                cross_attention_kwargs=cross_attention_kwargs,
                added_cond_kwargs=added_cond_kwargs,
                down_block_additional_residuals=down_block_additional_residuals,
                mid_block_additional_residual=mid_block_additional_residual,
                return_dict=return_dict,
            )
        if timestep_cond is not None or attention_mask is not None or added_cond_kwargs is not None:
            raise ValueError(
                "mid_up_repeats > 1 and cache_depth support neither timestep_cond, attention_mask nor added_cond_kwargs"
            )
        down = self.forward_down(
            sample,
            timestep,
            encoder_hidden_states,
            down_block_additional_residuals=down_block_additional_residuals,
            cross_attention_kwargs=cross_attention_kwargs,
            depth=cache_depth if deep_features is not None else None,
        ).repeat(mid_up_repeats)  # the result of one copy is freed at once
        if deep_features is not None:
            out, _ = self.forward_up(
                deep_features,
                down,
                encoder_hidden_states.repeat(mid_up_repeats, 1, 1),
                cross_attention_kwargs=cross_attention_kwargs,
                first=len(self.up_blocks) - cache_depth,
            )
            return (out,)
        if mid_block_additional_residual is not None:
            mid_block_additional_residual = mid_block_additional_residual.repeat(mid_up_repeats, 1, 1, 1)
        out = self.forward_mid_up(
            down,
            encoder_hidden_states.repeat(mid_up_repeats, 1, 1),
            mid_block_additional_residual=mid_block_additional_residual,
            cross_attention_kwargs=cross_attention_kwargs,
            cache_depth=cache_depth,
        )
        if cache_depth:
            return out  # (out, deep)
        return UNetMotionOutput(sample=out) if return_dict else (out,)

    @apply_lora_scale("cross_attention_kwargs")
    def forward_down(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        depth: int | None = None,
    ) -> DownPath:
        """The first half of ``UNetMotionModel.forward``: timestep embedding, ``conv_in``, the down blocks (with their
        motion modules) and the ControlNet's down residuals, for UNets without added conditioning (SD 1.5's).
        ``depth``: only the first ``depth`` down blocks (and as many residuals as their skips), for
        :meth:`forward_up` from a deeper cached feature; ``sample`` is then that block's output."""
        if self.config.addition_embed_type is not None or self.encoder_hid_proj is not None:
            raise ValueError("forward_down supports UNets without added embeddings or image projections")
        num_frames = sample.shape[2]
        self.set_num_frames(num_frames)
        forward_upsample_size = any(side % 2**self.num_upsamplers != 0 for side in sample.shape[-2:])

        # 1. time (as UNetMotionModel.forward)
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            dtype = torch.float64 if isinstance(timestep, float) else torch.int64
            timesteps = torch.tensor([timesteps], dtype=maybe_adjust_dtype_for_device(dtype, sample.device))
            timesteps = timesteps.to(sample.device)
        elif len(timesteps.shape) == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps.expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=self.dtype))
        emb = emb.repeat_interleave(num_frames, dim=0, output_size=emb.shape[0] * num_frames)

        # 2. pre-process
        sample = sample.permute(0, 2, 1, 3, 4).reshape((sample.shape[0] * num_frames, -1) + sample.shape[3:])
        sample = self.conv_in(sample)

        # 3. down
        skips = (sample,)
        for block in self.down_blocks[:depth]:
            if getattr(block, "has_cross_attention", False):
                sample, res_samples = block(
                    hidden_states=sample,
                    temb=emb,
                    encoder_hidden_states=encoder_hidden_states,
                    num_frames=num_frames,
                    cross_attention_kwargs=cross_attention_kwargs,
                )
            else:
                sample, res_samples = block(hidden_states=sample, temb=emb, num_frames=num_frames)
            skips += res_samples
        if down_block_additional_residuals is not None:
            residuals = down_block_additional_residuals
            skips = tuple(skip + residual for skip, residual in zip(skips, residuals, strict=True))
        return DownPath(sample, skips, emb, num_frames, forward_upsample_size)

    @apply_lora_scale("cross_attention_kwargs")
    def forward_mid_up(
        self,
        down: DownPath,
        encoder_hidden_states: torch.Tensor,
        mid_block_additional_residual: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        cache_depth: int = 0,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The second half of ``UNetMotionModel.forward``: the mid block, the ControlNet's mid residual, the up blocks
        and the output layers. Returns ``(batch, C, frames, h, w)``; ``down`` is not modified. With ``cache_depth=d``
        also the input of the last ``d`` up blocks (the deep features :meth:`forward_up` reuses): ``(out, deep)``."""
        num_frames, emb = down.num_frames, down.emb
        self.set_num_frames(num_frames)
        sample = down.sample

        # 4. mid
        if self.mid_block is not None:
            frames = {"num_frames": num_frames} if hasattr(self.mid_block, "motion_modules") else {}
            sample = self.mid_block(
                sample,
                emb,
                encoder_hidden_states=encoder_hidden_states,
                cross_attention_kwargs=cross_attention_kwargs,
                **frames,
            )
        if mid_block_additional_residual is not None:
            sample = sample + mid_block_additional_residual
        out, deep = self.forward_up(
            sample,
            down,
            encoder_hidden_states,
            cross_attention_kwargs=cross_attention_kwargs,
            keep_input_of=len(self.up_blocks) - cache_depth if cache_depth else None,
        )
        return (out, deep) if cache_depth else out

    def forward_up(
        self,
        sample: torch.Tensor,
        down: DownPath,
        encoder_hidden_states: torch.Tensor,
        cross_attention_kwargs: dict[str, Any] | None = None,
        first: int = 0,
        keep_input_of: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The up blocks from ``up_blocks[first]`` on (``sample``: its input) and the output layers, with the skip
        connections of ``down`` that those blocks take (the first ones: a shallow ``down`` path has just these).
        Returns ``(out, the input of up_blocks[keep_input_of])`` (``None`` when not asked for)."""
        num_frames, emb = down.num_frames, down.emb
        self.set_num_frames(num_frames)
        blocks = self.up_blocks[first:]
        skips, upsample_size, kept = down.skips[: sum(len(block.resnets) for block in blocks)], None, None
        for i, block in enumerate(self.up_blocks):
            if i < first:
                continue
            if i == keep_input_of:
                kept = sample
            res_samples, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
            if i < len(self.up_blocks) - 1 and down.forward_upsample_size:
                upsample_size = skips[-1].shape[2:]
            if getattr(block, "has_cross_attention", False):
                sample = block(
                    hidden_states=sample,
                    temb=emb,
                    res_hidden_states_tuple=res_samples,
                    encoder_hidden_states=encoder_hidden_states,
                    upsample_size=upsample_size,
                    num_frames=num_frames,
                    cross_attention_kwargs=cross_attention_kwargs,
                )
            else:
                sample = block(
                    hidden_states=sample,
                    temb=emb,
                    res_hidden_states_tuple=res_samples,
                    upsample_size=upsample_size,
                    num_frames=num_frames,
                )

        # 6. post-process
        if self.conv_norm_out:
            sample = self.conv_act(self.conv_norm_out(sample))
        sample = self.conv_out(sample)
        return sample[None, :].reshape((-1, num_frames) + sample.shape[1:]).permute(0, 2, 1, 3, 4), kept


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
