"""The residuals of a ControlNet's first down blocks only, for steps that reuse the video UNet's deep features.

On a DeepCache step (``cache_interval``) the video UNet runs only its outermost blocks, whose skip connections take
the ControlNet residuals of the ControlNet's outermost blocks; everything deeper would be computed and thrown away.
diffusers' ``ControlNetModel.forward`` always runs the whole network, so this is its first part, the same blocks in
the same order: timestep embedding, ``conv_in`` plus the conditioning embedding, ``down_blocks[:depth]``, their zero
convolutions and the conditioning scale.
"""

import torch
from diffusers import ControlNetModel


def shallow_controlnet_residuals(
    controlnet: ControlNetModel,
    sample: torch.Tensor,
    timestep,
    encoder_hidden_states: torch.Tensor,
    controlnet_cond: torch.Tensor,
    conditioning_scale: float,
    depth: int,
) -> list[torch.Tensor]:
    """The first ``1 + sum(skips of down_blocks[:depth])`` down residuals of ``controlnet(...)`` (no mid residual),
    equal to those of the full forward up to float rounding. Supports what MagicAnimate's DensePose ControlNet uses:
    no class or added embeddings, no guess mode, no pooled conditions."""
    config = controlnet.config
    if (
        controlnet.class_embedding is not None
        or config.addition_embed_type is not None
        or config.global_pool_conditions
    ):
        raise ValueError("shallow ControlNet residuals support ControlNets without class or added embeddings")
    if config.controlnet_conditioning_channel_order == "bgr":
        controlnet_cond = torch.flip(controlnet_cond, dims=[1])
    timesteps = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=sample.device)
    timesteps = timesteps.reshape(-1).to(sample.device).expand(sample.shape[0])
    emb = controlnet.time_embedding(controlnet.time_proj(timesteps).to(dtype=sample.dtype))

    hidden = controlnet.conv_in(sample) + controlnet.controlnet_cond_embedding(controlnet_cond)
    residuals = [hidden]
    for block in controlnet.down_blocks[:depth]:
        if getattr(block, "has_cross_attention", False):
            hidden, res_samples = block(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            hidden, res_samples = block(hidden_states=hidden, temb=emb)
        residuals.extend(res_samples)
    zero_convs = controlnet.controlnet_down_blocks[: len(residuals)]
    return [zero_conv(r) * conditioning_scale for r, zero_conv in zip(residuals, zero_convs, strict=True)]
