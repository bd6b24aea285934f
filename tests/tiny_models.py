"""A tiny random-weight MagicAnimate checkpoint tree in the ORIGINAL release layout, built in code.

Layout (as the release, see docs/magicanimate-anatomy.md section 2):

    stable-diffusion-v1-5/unet/{config.json, diffusion_pytorch_model.bin}      torch.save of a state dict
    stable-diffusion-v1-5/text_encoder/                                        CLIPTextModel.save_pretrained
    stable-diffusion-v1-5/tokenizer/                                           tiny byte-level CLIP BPE
    sd-vae-ft-mse/                                                             AutoencoderKL, 8x downsampling
    MagicAnimate/appearance_encoder/                                           UNet2D minus the 24 dead-tail keys
    MagicAnimate/densepose_controlnet/                                         ControlNetModel
    MagicAnimate/temporal_attention/temporal_attention.ckpt                    full UNet3D state dict, AnimateDiff names

Every parameter is re-drawn from a seeded generator, including the ones diffusers zero-initialises (motion-module
``proj_out``, ControlNet zero convs), so no component is a no-op. The UNet3D spatial weights stored in the
temporal checkpoint are drawn independently of SD 1.5's, so a loader that takes the wrong ones is caught.

Also: :func:`make_motion` (a DensePose-like clip) and :func:`make_reference` (a reference photo), both in code.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch

TINY_CHANNELS = (32, 32, 32, 32)
TEXT_DIM = 32

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=TINY_CHANNELS,
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=TEXT_DIM,
    attention_head_dim=8,
    use_linear_projection=False,
)

CONTROLNET_CONFIG = dict(
    in_channels=4,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=UNET_CONFIG["down_block_types"],
    block_out_channels=TINY_CHANNELS,
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=TEXT_DIM,
    attention_head_dim=8,
    use_linear_projection=False,
    conditioning_embedding_out_channels=(16, 16, 32, 32),
    controlnet_conditioning_channel_order="rgb",
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 32, 32),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
)

# The Original AnimateDiff motion-module names, from diffusers' names (inverse of
# diffusers.loaders.single_file_utils.convert_animatediff_checkpoint_to_diffusers).
_TO_ANIMATEDIFF = [
    (".norm1.", ".norms.0."),
    (".norm2.", ".norms.1."),
    (".norm3.", ".ff_norm."),
    (".attn1.", ".attention_blocks.0."),
    (".attn2.", ".attention_blocks.1."),
]
_MOTION_MODULE = re.compile(r"^((?:down|up)_blocks\.\d+\.motion_modules\.\d+)\.(.*)$")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (transformers 5 no longer exports it)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def tiny_clip_vocab() -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    vocab = {}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
    for symbol in symbols:
        vocab[symbol + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def randomize_(module: torch.nn.Module, generator: torch.Generator, big: tuple[str, ...] = ()) -> torch.nn.Module:
    """Overwrite every parameter: norm weights 1 + N(0, .15), 1-D biases N(0, .1), matrices/convs
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (times 3 for parameters whose name starts with one of ``big``)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim == 1:
                noise = torch.randn(param.shape, generator=generator)
                if name.endswith("weight"):
                    param.copy_(1 + 0.15 * noise)
                else:
                    param.copy_(0.1 * noise)
            else:
                bound = 1 / math.sqrt(param[0].numel())
                if name.startswith(big):
                    bound *= 3
                param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * bound)
    return module


def sinusoid_pe(length: int, channels: int) -> torch.Tensor:
    position = torch.arange(length).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, channels, 2) * (-math.log(10000.0) / channels))
    pe = torch.zeros(1, length, channels)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe


def diffusers_motion_to_animatediff(state: dict[str, torch.Tensor], max_len: int = 24) -> dict[str, torch.Tensor]:
    """Motion-adapter (diffusers) keys -> the original AnimateDiff-v1 keys, plus both ``pos_encoder.pe`` buffers."""
    out = {}
    channels = {}
    for key, value in state.items():
        if "pos_embed" in key:
            continue
        match = _MOTION_MODULE.match(key)
        assert match, key
        prefix, rest = match.groups()
        rest = "." + rest
        for new, old in _TO_ANIMATEDIFF:
            rest = rest.replace(new, old)
        out[f"{prefix}.temporal_transformer{rest}"] = value
        if rest == ".proj_in.weight":
            channels[prefix] = value.shape[0]
    for prefix, c in channels.items():
        for block in (0, 1):
            key = f"{prefix}.temporal_transformer.transformer_blocks.0.attention_blocks.{block}.pos_encoder.pe"
            out[key] = sinusoid_pe(max_len, c)
    return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))


def build_tiny_original_tree(root: Path, seed: int = 0) -> Path:
    """Write the tiny tree under ``root`` (created if needed) and return ``root``."""
    import safetensors.torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from magicanimate.models.original_checkpoints import APPEARANCE_ENCODER_DEAD_TAIL
    from magicanimate.models.video_unet import magicanimate_motion_adapter

    root = Path(root)
    gen = torch.Generator().manual_seed(seed)
    sd = root / "stable-diffusion-v1-5"
    ma = root / "MagicAnimate"

    # SD 1.5 UNet: .bin (torch.save of the state dict) + config.json, as the release.
    unet = randomize_(UNet2DConditionModel(**UNET_CONFIG), gen)
    (sd / "unet").mkdir(parents=True, exist_ok=True)
    unet.save_config(sd / "unet")
    torch.save(unet.state_dict(), sd / "unet" / "diffusion_pytorch_model.bin")

    # temporal_attention.ckpt: the full UNet3D state dict, spatial weights DIFFERENT from SD 1.5's.
    spatial = {k: v.clone() for k, v in randomize_(unet, gen).state_dict().items()}
    adapter = randomize_(magicanimate_motion_adapter(TINY_CHANNELS), gen)
    motion = diffusers_motion_to_animatediff(adapter.state_dict())
    (ma / "temporal_attention").mkdir(parents=True, exist_ok=True)
    torch.save({**spatial, **motion}, ma / "temporal_attention" / "temporal_attention.ckpt")

    # Appearance encoder: another UNet2D, minus the dead tail, config class "AppearanceEncoderModel".
    appearance = randomize_(unet, gen).state_dict()
    appearance = {k: v.clone().contiguous() for k, v in appearance.items() if k not in APPEARANCE_ENCODER_DEAD_TAIL}
    (ma / "appearance_encoder").mkdir(parents=True, exist_ok=True)
    unet.save_config(ma / "appearance_encoder")
    config_path = ma / "appearance_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["_class_name"] = "AppearanceEncoderModel"
    _write_json(config_path, config)
    safetensors.torch.save_file(appearance, ma / "appearance_encoder" / "diffusion_pytorch_model.safetensors")

    # DensePose ControlNet (conditioning-embedding convs scaled up so the motion frames matter).
    controlnet = randomize_(ControlNetModel(**CONTROLNET_CONFIG), gen, big=("controlnet_cond_embedding.",))
    controlnet.save_pretrained(ma / "densepose_controlnet")

    # VAE.
    randomize_(AutoencoderKL(**VAE_CONFIG), gen).save_pretrained(root / "sd-vae-ft-mse")

    # Tokenizer + text encoder.
    vocab = tiny_clip_vocab()
    (sd / "tokenizer").mkdir(parents=True, exist_ok=True)
    _write_json(sd / "tokenizer" / "vocab.json", vocab)
    (sd / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    tokenizer.save_pretrained(sd / "tokenizer")
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=TEXT_DIM,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    randomize_(CLIPTextModel(text_config), gen).save_pretrained(sd / "text_encoder")
    return root


# ------------------------------------------------------------------------------------------------ inputs

VIRIDIS_BACKGROUND = (68, 1, 84)  # DensePose semantic-map background (viridis(0))
_PART_COLOURS = [(59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37), (190, 220, 50)]


def make_motion(num_frames: int = 16, size: int = 64, seed: int = 0) -> np.ndarray:
    """A DensePose-like clip: purple background, a few coloured body-part boxes that move and change per frame.
    ``(num_frames, size, size, 3)`` uint8 RGB."""
    rng = np.random.default_rng(seed)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    frames[:] = VIRIDIS_BACKGROUND
    phases = rng.uniform(0, 2 * np.pi, len(_PART_COLOURS))
    for f in range(num_frames):
        for p, colour in enumerate(_PART_COLOURS):
            cx = size / 2 + size / 4 * math.sin(2 * math.pi * f / 12 + phases[p])
            cy = size * (p + 1) / (len(_PART_COLOURS) + 1) + 2 * math.cos(f + phases[p])
            half_w, half_h = size // 10 + p % 2, size // 14
            x0, x1 = int(max(cx - half_w, 0)), int(min(cx + half_w, size))
            y0, y1 = int(max(cy - half_h, 0)), int(min(cy + half_h, size))
            frames[f, y0:y1, x0:x1] = colour
    return frames


def make_reference(size: int = 64, seed: int = 0) -> np.ndarray:
    """A reference 'photo': smooth colour gradients, a disc and a little noise. ``(size, size, 3)`` uint8 RGB."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.stack([0.2 + 0.6 * x, 0.3 + 0.5 * y, 0.8 - 0.5 * x * y], axis=-1)
    disc = (x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.06
    image[disc] = [0.9, 0.75, 0.6]
    image += rng.normal(0, 0.03, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
