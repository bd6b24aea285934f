"""Model-level behaviour: the two GroupNorm variants, the video UNet's key set, reference attention (by hand and
against the original's recorded UNet call / appearance-encoder banks), and the context-window schedules."""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import parity_dir
from tiny_models import TINY_CHANNELS, UNET_CONFIG, randomize_
from torch import nn

from magicanimate.models.group_norms import CrossFrameGroupNorm, PerFrameGroupNorm
from magicanimate.models.original_checkpoints import load_appearance_encoder, load_video_unet
from magicanimate.models.reference_attention import ReferenceAttentionControl, reference_layer_names
from magicanimate.pipelines.context_windows import (
    CONTEXT_SCHEDULES,
    FUSION_WEIGHTS,
    context_windows,
    fusion_weights,
    register_context_schedule,
)

MIDUP_BLOCKS = ["mid_block.attentions.0"] + [f"up_blocks.{i}.attentions.{j}" for i in (1, 2, 3) for j in (0, 1, 2)]
DOWN_BLOCKS = [f"down_blocks.{i}.attentions.{j}" for i in (0, 1, 2) for j in (0, 1)]
MIDUP_LAYERS = [f"{b}.transformer_blocks.0.attn1" for b in MIDUP_BLOCKS]
FULL_LAYERS = [f"{b}.transformer_blocks.0.attn1" for b in DOWN_BLOCKS] + MIDUP_LAYERS


# ------------------------------------------------------------------------------------------------ group norms


def _frames_with_different_statistics(b, c, f, h, w, seed=0):
    """(b, c, f, h, w) with a different mean/scale per frame, so per-frame and cross-frame statistics differ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, f, h, w, generator=g)
    return x * torch.linspace(0.5, 3.0, f).view(1, 1, f, 1, 1) + torch.linspace(-2, 2, f).view(1, 1, f, 1, 1)


def _affine_like(norm: nn.GroupNorm, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(norm.num_channels, generator=g))
        norm.bias.copy_(0.2 * torch.randn(norm.num_channels, generator=g))
    return norm


def test_cross_frame_group_norm_equals_group_norm_over_the_5d_clip():
    b, c, f, h, w = 2, 8, 5, 3, 4
    x5 = _frames_with_different_statistics(b, c, f, h, w)
    reference = _affine_like(nn.GroupNorm(4, c, eps=1e-5))
    expected = reference(x5)  # torch GroupNorm on (b, c, f, h, w): statistics over group x frames x H x W

    norm = CrossFrameGroupNorm(4, c, eps=1e-5)
    norm.load_state_dict(reference.state_dict())
    norm.num_frames = f
    x_flat = x5.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # (b f) c h w, frame index fastest
    out = norm(x_flat).view(b, f, c, h, w).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    per_frame = reference(x_flat).view(b, f, c, h, w).permute(0, 2, 1, 3, 4)
    assert (per_frame - expected).abs().max() > 0.1, "test input does not separate per-frame from cross-frame"


def test_cross_frame_group_norm_keeps_clips_of_a_batch_apart():
    """The CFG halves are separate GroupNorm samples: changing clip 0 must not change clip 1's output."""
    b, c, f, h, w = 2, 8, 4, 2, 2
    x5 = _frames_with_different_statistics(b, c, f, h, w)
    norm = _affine_like(CrossFrameGroupNorm(2, c))
    norm.num_frames = f
    flat = x5.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    changed = flat.clone()
    changed[:f] = changed[:f] * 5 + 3
    torch.testing.assert_close(norm(flat)[f:], norm(changed)[f:])


def _clip_norm_case(offset: bool, seed: int = 0):
    """A (b, c, f, h, w) clip, the torch GroupNorm of it in float64 (the reference) and our norm with its weights.
    ``offset``: the first group's channels sit at ~20 with a spread of ~0.1 (mean / std ~ 160), where a variance
    taken as E[x^2] - E[x]^2 in float32 loses ~3 digits (5e-3 off, measured)."""
    b, c, f, h, w, groups = 2, 16, 5, 6, 4, 4
    x5 = _frames_with_different_statistics(b, c, f, h, w, seed)
    if offset:
        x5[:, : c // groups] = x5[:, : c // groups] * 0.05 + 20
    reference = _affine_like(nn.GroupNorm(groups, c, eps=1e-5)).double()
    norm = CrossFrameGroupNorm(groups, c, eps=1e-5)
    norm.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})
    norm.num_frames = f
    flat = x5.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # (b f) c h w, frame index fastest
    return flat, reference(x5.double()).permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w), norm


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("offset", [False, True], ids=["centred", "offset"])
@torch.no_grad()
def test_cross_frame_group_norm_matches_float64_in_either_layout(channels_last, offset):
    """Float32 rounding only, for both memory layouts, also for a group whose mean is far above its spread.
    Measured (3 seeds): 6.4e-7 centred; up to 2.0e-5 offset (torch's own float32 GroupNorm of the 5-D clip: 1.5e-5),
    where the E[x^2] - E[x]^2 shortcut is 4e-3 to 7e-3 off. The output keeps the input's layout."""
    for seed in range(3):
        flat, expected, norm = _clip_norm_case(offset, seed)
        x = flat.to(memory_format=torch.channels_last) if channels_last else flat
        out = norm(x)
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-4 if offset else 1e-5)


@torch.no_grad()
def test_cross_frame_group_norm_keeps_float32_statistics_for_float16_inputs():
    """A float16 input gives the float32 result of the same values, rounded once to float16. Statistics rounded to
    float16 would put the offset group off by ~|mean| / std * 2^-11 ~ 0.1."""
    flat, _, norm = _clip_norm_case(offset=True)
    half = flat.half()
    out, out32 = norm(half), norm(half.float())
    assert out.dtype == torch.float16
    one_ulp = 2.0**-10 * out32.abs().max().item()  # float16 spacing at the output's largest magnitude
    torch.testing.assert_close(out.float(), out32, rtol=0, atol=one_ulp)


def test_cross_frame_group_norm_in_place_path_equals_the_autograd_path():
    """Without autograd the norm scales and shifts its centred tensor in place; with it, out of place. Same ops,
    same bits; the autograd path backpropagates."""
    flat, _, norm = _clip_norm_case(offset=False)
    with torch.no_grad():
        in_place = norm(flat)
    out = norm(flat.requires_grad_())
    torch.testing.assert_close(out, in_place, rtol=0, atol=0)
    out.square().sum().backward()
    assert flat.grad is not None and norm.weight.grad is not None and flat.grad.abs().max() > 0


def test_per_frame_group_norm_on_5d_equals_group_norm_of_each_frame():
    b, c, f, h, w = 2, 8, 5, 3, 4
    x5 = _frames_with_different_statistics(b, c, f, h, w)
    reference = _affine_like(nn.GroupNorm(4, c, eps=1e-6))
    expected = torch.stack([reference(x5[:, :, i]) for i in range(f)], dim=2)

    norm = PerFrameGroupNorm(4, c, eps=1e-6)
    norm.load_state_dict(reference.state_dict())
    torch.testing.assert_close(norm(x5), expected, atol=1e-5, rtol=1e-5)
    assert (reference(x5) - expected).abs().max() > 0.1, "test input does not separate per-frame from cross-frame"


@pytest.fixture(scope="module")
def unet2d_and_adapter():
    from diffusers import UNet2DConditionModel

    from magicanimate.models.video_unet import magicanimate_motion_adapter

    g = torch.Generator().manual_seed(3)
    return (
        randomize_(UNet2DConditionModel(**UNET_CONFIG), g),
        randomize_(magicanimate_motion_adapter(TINY_CHANNELS), g),
    )


def test_video_unet_state_dict_matches_unet_motion_model(unet2d_and_adapter):
    from diffusers import UNetMotionModel

    from magicanimate.models.video_unet import VideoUNet

    unet2d, adapter = unet2d_and_adapter
    ours = VideoUNet.from_unet2d(unet2d, adapter).state_dict()
    stock = UNetMotionModel.from_unet2d(unet2d, adapter).state_dict()
    assert sorted(ours) == sorted(stock)
    for key, value in stock.items():
        assert ours[key].shape == value.shape, key
        # the GroupNorm swap must keep the loaded weights, not fresh ones
        torch.testing.assert_close(ours[key], value, msg=key)
    assert "down_blocks.0.resnets.0.norm1.weight" in ours and "conv_norm_out.weight" in ours
    assert "down_blocks.0.motion_modules.0.norm.weight" in ours


def _unet_call_inputs(video, windows=2, frames=16, seed=5):
    """Latents, per-frame text and ControlNet-shaped residuals (random) for a tiny VideoUNet call."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(windows, 4, frames, 8, 8, generator=g)
    text = torch.randn(1, 77, 32, generator=g).expand(windows * frames, -1, -1)
    skips = video.forward_down(sample, 500, text).skips  # shapes of the 12 skip connections
    down = [0.3 * torch.randn(skip.shape, generator=g) for skip in skips]
    mid = 0.3 * torch.randn((windows * frames, TINY_CHANNELS[-1], 1, 1), generator=g)
    return sample, text, down, mid


@torch.no_grad()
def test_forward_down_then_mid_up_is_diffusers_forward(unet2d_and_adapter):
    """The two halves, run one after the other, are UNetMotionModel.forward: the same blocks in the same order on
    the same shapes (measured: bit-identical). The mid/up half leaves its input untouched, so it can run twice."""
    from magicanimate.models.video_unet import VideoUNet

    video = VideoUNet.from_unet2d(*unet2d_and_adapter)
    sample, text, down, mid = _unet_call_inputs(video)
    for timestep in (500, torch.tensor(500), torch.tensor([500])):
        residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        expected = video(sample, timestep, text, **residuals)
        halves = video.forward_down(sample, timestep, text, down_block_additional_residuals=down)
        first = video.forward_mid_up(halves, text, mid_block_additional_residual=mid)
        second = video.forward_mid_up(halves, text, mid_block_additional_residual=mid)
        torch.testing.assert_close(first, expected.sample, rtol=0, atol=1e-6)
        torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert expected.sample.abs().max() > 0.1  # not a degenerate output


def _guided_unet_call(unet, appearance, shared: bool, dtype=torch.float32):
    """One UNet call for an unconditional and a conditional copy of one window (the second attends to the
    reference), either on two plain copies or with ``mid_up_repeats=2`` on one."""
    control = ReferenceAttentionControl(appearance, unet, "midup")
    reference, sample, text = (t.to(dtype) for t in _tiny_inputs(seed=2))
    one, text_one = sample[:1], text.expand(16, -1, -1)
    g = torch.Generator().manual_seed(4)
    down = [0.3 * torch.randn(s.shape, generator=g).to(dtype) for s in unet.forward_down(one, 500, text_one).skips]
    mid = 0.3 * torch.randn((16, TINY_CHANNELS[-1], 1, 1), generator=g).to(dtype)
    control.clear()
    appearance(reference.repeat(2, 1, 1, 1), 500, encoder_hidden_states=text.expand(2, -1, -1))  # 1x1: two rows
    control.load_reference()
    control.set_conditional(torch.tensor([False, True]))
    try:
        if shared:
            return unet(one, 500, text_one, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                        mid_up_repeats=2).sample  # fmt: skip
        return unet(
            one.repeat(2, 1, 1, 1, 1),
            500,
            text_one.repeat(2, 1, 1),
            down_block_additional_residuals=[r.repeat(2, 1, 1, 1) for r in down],
            mid_block_additional_residual=mid.repeat(2, 1, 1, 1),
        ).sample
    finally:
        control.clear()


@torch.no_grad()
def test_mid_up_repeats_equals_forward_on_repeated_rows(fresh_models):
    """``mid_up_repeats=2`` on one copy of the inputs = the plain forward on two copies, here with the second copy
    attending to a reference in the mid/up blocks (MagicAnimate's guidance branches). The down path then runs at
    half the batch, so only rounding differs. Measured: 4.4e-6, while the same plain call in float32 is 5.4e-6 from
    float64 (printed)."""
    unet, appearance = fresh_models
    plain = _guided_unet_call(unet, appearance, shared=False)
    shared = _guided_unet_call(unet, appearance, shared=True)
    plain64 = _guided_unet_call(copy.deepcopy(unet).double(), copy.deepcopy(appearance).double(), False, torch.float64)
    deviation = (shared - plain).abs().max().item()
    rounding = (plain.double() - plain64).abs().max().item()
    print(f"mid_up_repeats=2 vs two plain copies: {deviation:.2e} (plain float32 vs float64: {rounding:.2e})")
    assert shared.shape == plain.shape == (2, 4, 16, 8, 8)
    assert deviation <= 2e-5
    assert (plain[1] - plain[0]).abs().max() > 1e-3, "the copies do not differ: the test would not see a mix-up"


# ------------------------------------------------------------------------------------------------ reference layers


def test_reference_layer_names_sd15_topology(unet2d_and_adapter):
    from magicanimate.models.video_unet import VideoUNet

    unet2d, adapter = unet2d_and_adapter
    video = VideoUNet.from_unet2d(unet2d, adapter, load_weights=False)
    for model in (unet2d, video):
        midup = reference_layer_names(model, "midup")
        full = reference_layer_names(model, "full")
        assert sorted(midup) == sorted(MIDUP_LAYERS) and len(midup) == 10
        assert sorted(full) == sorted(FULL_LAYERS) and len(full) == 16
        assert not any("motion_modules" in name for name in full)
    with pytest.raises(ValueError):
        reference_layer_names(video, "down")


def _attention_by_hand(attn, queries, keys_values):
    """softmax(q k^T / sqrt(d)) v per head, then to_out, written out with plain torch ops."""
    q, k, v = attn.to_q(queries), attn.to_k(keys_values), attn.to_v(keys_values)
    batch, lq, dim = q.shape
    heads = attn.heads
    d = dim // heads

    def split(t):
        return t.view(batch, t.shape[1], heads, d).transpose(1, 2)

    weights = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(d)).softmax(dim=-1)
    out = (weights @ split(v)).transpose(1, 2).reshape(batch, lq, dim)
    return attn.to_out[1](attn.to_out[0](out))


class _Capture:
    """Forward hook keeping a module's first positional input and its output."""

    def __init__(self, module):
        self.inputs = self.output = None
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.inputs, self.output = args[0].detach().clone(), output.detach().clone()


@pytest.fixture(scope="module")
def tiny_video_models(tiny_tree):
    sd = tiny_tree / "stable-diffusion-v1-5"
    unet = load_video_unet(sd / "unet", tiny_tree / "MagicAnimate/temporal_attention/temporal_attention.ckpt")
    appearance = load_appearance_encoder(tiny_tree / "MagicAnimate/appearance_encoder")
    return unet, appearance


@pytest.fixture()
def fresh_models(tiny_video_models):
    """The tiny video UNet and appearance encoder with every attention processor reset to plain attention."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet, appearance = tiny_video_models
    unet.set_attn_processor(AttnProcessor2_0())
    appearance.set_attn_processor(AttnProcessor2_0())
    return unet, appearance


def _tiny_inputs(seed=0, frames=16):
    g = torch.Generator().manual_seed(seed)
    reference = torch.randn(1, 4, 8, 8, generator=g)
    sample = torch.randn(1, 4, frames, 8, 8, generator=g).repeat(2, 1, 1, 1, 1)  # identical CFG halves
    text = torch.randn(1, 77, 32, generator=g)
    return reference, sample, text


@torch.no_grad()
def _run(unet, appearance, control, t=500, seed=0):
    reference, sample, text = _tiny_inputs(seed)
    frames = sample.shape[2]
    if control is not None:
        control.clear()
        appearance(reference.repeat(2, 1, 1, 1), t, encoder_hidden_states=text.expand(2, -1, -1))
        control.load_reference()
        control.set_conditional(torch.tensor([False, True]))
    out = unet(sample, t, encoder_hidden_states=text.expand(2 * frames, -1, -1)).sample
    if control is not None:
        control.clear()
    return out


@pytest.mark.parametrize(
    "fusion, layer, fused",
    [
        ("midup", "up_blocks.3.attentions.0.transformer_blocks.0.attn1", True),
        ("midup", "down_blocks.0.attentions.0.transformer_blocks.0.attn1", False),
        ("full", "down_blocks.0.attentions.0.transformer_blocks.0.attn1", True),
    ],
)
@torch.no_grad()
def test_reference_attention_rows_match_hand_computation(fresh_models, fusion, layer, fused):
    unet, appearance = fresh_models
    control = ReferenceAttentionControl(appearance, unet, fusion)
    reader, writer = _Capture(unet.get_submodule(layer)), _Capture(appearance.get_submodule(layer))
    try:
        _run(unet, appearance, control)
    finally:
        reader.handle.remove()
        writer.handle.remove()
    attn = unet.get_submodule(layer)
    assert attn.heads == 8  # SD 1.5's attention_head_dim 8 means 8 heads
    hidden = reader.inputs  # the block's norm1 output, (2 * 16 frames, tokens, C), uncond half first
    reference = writer.inputs[1:2]  # the appearance encoder's norm1 output of the same-named layer (cond copy)
    assert hidden.shape[0] == 32 and reference.shape[1:] == hidden.shape[1:]

    plain = _attention_by_hand(attn, hidden, hidden)
    joint = torch.cat([hidden[16:], reference.expand(16, -1, -1)], dim=1)
    with_reference = _attention_by_hand(attn, hidden[16:], joint)
    # unconditional rows: plain self-attention, no reference
    torch.testing.assert_close(reader.output[:16], plain[:16], atol=1e-5, rtol=1e-4)
    if fused:
        torch.testing.assert_close(reader.output[16:], with_reference, atol=1e-5, rtol=1e-4)
        assert (with_reference - plain[16:]).abs().max() > 1e-3, "reference has no visible effect in this layer"
    else:
        torch.testing.assert_close(reader.output[16:], plain[16:], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_unconditional_half_ignores_reference_and_full_fusion_changes_conditional_half(fresh_models):
    unet, appearance = fresh_models
    no_reference = _run(unet, appearance, None)
    midup = _run(unet, appearance, ReferenceAttentionControl(appearance, unet, "midup"))
    full = _run(unet, appearance, ReferenceAttentionControl(appearance, unet, "full"))
    # uncond half (batch row 0) never sees the reference, whatever the fusion
    torch.testing.assert_close(midup[0], no_reference[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full[0], no_reference[0], atol=1e-5, rtol=1e-5)
    # cond half does, and "full" adds the down-block layers
    assert (midup[1] - no_reference[1]).abs().max() > 1e-3
    assert (full[1] - midup[1]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ parity (shared)


@pytest.fixture(scope="module")
def parity_models():
    fixture = parity_dir()
    pretrained = fixture / "pretrained"
    unet = load_video_unet(
        pretrained / "stable-diffusion-v1-5" / "unet",
        pretrained / "MagicAnimate" / "temporal_attention" / "temporal_attention.ckpt",
    )
    appearance = load_appearance_encoder(pretrained / "MagicAnimate" / "appearance_encoder")
    control = ReferenceAttentionControl(appearance, unet, "midup")
    return fixture, unet, appearance, control


@torch.no_grad()
def test_single_unet_call_matches_original(parity_models):
    fixture, unet, _, control = parity_models
    call = np.load(fixture / "expected" / "unet_call.npz")
    names = [f"{name}.attn1" for name in call["bank_layer_names"]]
    assert sorted(names) == sorted(control.readers), "fused layers differ from the original's"

    control.clear()
    for i, name in enumerate(names):
        control.readers[name].set_reference(torch.from_numpy(call[f"bank_{i:02d}"][1:2]))  # row 1 = conditional
    control.set_conditional(torch.tensor([False, True]))

    def per_frame(array):  # (2, C, 16, h, w) -> (2 * 16, C, h, w), frame index fastest
        tensor = torch.from_numpy(array)
        return tensor.permute(0, 2, 1, 3, 4).reshape(-1, *tensor.shape[1:2], *tensor.shape[3:])

    sample = torch.from_numpy(call["sample"])
    frames = sample.shape[2]
    try:
        out = unet(
            sample,
            torch.from_numpy(call["timestep"]),
            encoder_hidden_states=torch.from_numpy(call["encoder_hidden_states"]).repeat_interleave(frames, dim=0),
            down_block_additional_residuals=[
                per_frame(call[f"down_block_additional_residual_{i:02d}"]) for i in range(12)
            ],
            mid_block_additional_residual=per_frame(call["mid_block_additional_residual"]),
        ).sample
    finally:
        control.clear()
    diff = (out - torch.from_numpy(call["output"])).abs().max().item()
    assert diff <= 3e-5, f"UNet output differs from the original's by {diff:.3g}"


@torch.no_grad()
def test_appearance_encoder_bank_step0_matches_original(parity_models):
    """Our writer banks = the original's step-0 banks, given the recorded text embedding (cond row)."""
    fixture, _, appearance, control = parity_models
    banks = np.load(fixture / "expected" / "reference_bank.npz")
    call = np.load(fixture / "expected" / "unet_call.npz")
    names = [f"{name}.attn1" for name in banks["layer_names"]]
    assert sorted(names) == sorted(control.writers)

    latents = torch.from_numpy(banks["ref_latents"]).repeat(2, 1, 1, 1)  # the original's 2 identical copies
    text = torch.from_numpy(call["encoder_hidden_states"][1:2]).expand(2, -1, -1)
    control.clear()
    try:
        appearance(latents, torch.tensor(int(banks["timesteps"][0])), encoder_hidden_states=text)
        for i, name in enumerate(names):
            bank = control.writers[name].bank
            expected = torch.from_numpy(banks[f"step0_layer{i:02d}"])
            assert bank.shape == expected.shape, name
            diff = (bank - expected).abs()
            # Exact (0.0) with the recording's 2 CPU threads. The mid-block layer sits at 1x1, where every GroupNorm
            # group holds one value: (x - mean) / sqrt(var + 1e-5) amplifies summation-order rounding ~300x, so
            # another thread count gives up to ~3e-4 there (and ~3e-5 downstream). Real mistakes (wrong timestep,
            # text, latent sample vs mean) move the banks by >1e-2.
            assert diff.max().item() <= 5e-4, f"{name}: bank differs from the original's by {diff.max().item():.3g}"
    finally:
        control.clear()


# ------------------------------------------------------------------------------------------------ context windows


def test_uniform_windows_32_frames_wrap_around():
    assert context_windows(32) == [
        list(range(0, 16)),
        list(range(12, 28)),
        list(range(24, 32)) + list(range(0, 8)),
    ]


def test_uniform_windows_48_frames():
    windows = context_windows(48, 16, 4, "uniform")
    assert windows == [
        list(range(0, 16)),
        list(range(12, 28)),
        list(range(24, 40)),
        list(range(36, 48)) + list(range(0, 4)),
    ]


def test_uniform_matches_the_original_schedule_formula():
    """The original's uniform(step=0, stride=1, closed_loop=True): starts 0, s, 2s, ... < N, window (j + k) mod N."""
    for frames in (16, 32, 48, 64, 80, 128):
        stride = 16 - 4
        expected = (
            [[(j + k) % frames for k in range(16)] for j in range(0, frames, stride)]
            if frames > 16
            else [list(range(frames))]
        )
        assert context_windows(frames, 16, 4, "uniform") == expected, frames


@pytest.mark.parametrize("frames", [16, 20, 32, 40, 48, 64, 100])
@pytest.mark.parametrize("overlap", [0, 4, 8])
def test_sliding_windows_never_wrap_and_cover_every_frame(frames, overlap):
    windows = context_windows(frames, 16, overlap, "sliding")
    covered = set()
    for window in windows:
        assert len(window) == min(16, frames)
        assert window == list(range(window[0], window[0] + len(window))), "sliding window wraps or skips"
        assert 0 <= window[0] and window[-1] < frames
        covered.update(window)
    assert covered == set(range(frames))
    if frames > 16:
        assert windows[-1][-1] == frames - 1


@pytest.mark.parametrize("schedule", ["uniform", "sliding"])
def test_overlap_not_smaller_than_window_raises(schedule):
    with pytest.raises(ValueError):
        context_windows(32, 16, 16, schedule)
    with pytest.raises(ValueError):
        context_windows(32, 16, 20, schedule)


def test_unknown_schedule_raises_listing_the_registered_ones():
    from magicanimate.errors import InputError

    for lookup in (lambda: context_windows(32, 16, 4, "random"), lambda: fusion_weights(16, "random")):
        with pytest.raises(InputError, match="one of sliding, uniform, got 'random'"):
            lookup()


def test_a_registered_schedule_is_used_with_its_weights():
    """A schedule added with register_context_schedule is what context_windows / fusion_weights return."""

    def halves(num_frames, context_frames, context_overlap):
        return [list(range(0, context_frames)), list(range(num_frames - context_frames, num_frames))]

    register_context_schedule("test-halves", halves, lambda frames: [2.0] * frames)
    try:
        assert context_windows(40, 16, 4, "test-halves") == [list(range(16)), list(range(24, 40))]
        assert context_windows(16, 16, 4, "test-halves") == [list(range(16))]  # one window covers the clip
        assert fusion_weights(16, "test-halves") == [2.0] * 16
    finally:
        CONTEXT_SCHEDULES.pop("test-halves")
        FUSION_WEIGHTS.pop("test-halves")
    assert sorted(CONTEXT_SCHEDULES) == sorted(FUSION_WEIGHTS) == ["sliding", "uniform"]
