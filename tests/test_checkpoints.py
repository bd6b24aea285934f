"""Reading the original release's checkpoint layout (built in code by tiny_models.py; nothing from ../shared needed
except the one layout cross-check at the end)."""

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import PARITY, TINY_FRAMES, TINY_STEPS, tiny_latents

from magicanimate.errors import CheckpointError
from magicanimate.models.original_checkpoints import (
    APPEARANCE_ENCODER_DEAD_TAIL,
    load_appearance_encoder,
    load_video_unet,
    read_state_dict,
)

CKPT = Path("MagicAnimate/temporal_attention/temporal_attention.ckpt")
SD_UNET = Path("stable-diffusion-v1-5/unet")
PIECES = [
    "stable-diffusion-v1-5/unet",
    "stable-diffusion-v1-5/text_encoder",
    "stable-diffusion-v1-5/tokenizer",
    "sd-vae-ft-mse",
    "MagicAnimate/appearance_encoder",
    "MagicAnimate/densepose_controlnet",
    "MagicAnimate/temporal_attention",
]

# AnimateDiff (original) name -> diffusers name, written out by hand for one motion module.
_AD = "down_blocks.1.motion_modules.1.temporal_transformer."
_DF = "down_blocks.1.motion_modules.1."
MOTION_KEY_PAIRS = [
    (_AD + "norm.weight", _DF + "norm.weight"),
    (_AD + "proj_in.weight", _DF + "proj_in.weight"),
    (_AD + "proj_out.bias", _DF + "proj_out.bias"),
    (_AD + "transformer_blocks.0.attention_blocks.0.to_q.weight", _DF + "transformer_blocks.0.attn1.to_q.weight"),
    (_AD + "transformer_blocks.0.attention_blocks.1.to_v.weight", _DF + "transformer_blocks.0.attn2.to_v.weight"),
    (_AD + "transformer_blocks.0.attention_blocks.1.to_out.0.bias", _DF + "transformer_blocks.0.attn2.to_out.0.bias"),
    (_AD + "transformer_blocks.0.norms.0.weight", _DF + "transformer_blocks.0.norm1.weight"),
    (_AD + "transformer_blocks.0.norms.1.bias", _DF + "transformer_blocks.0.norm2.bias"),
    (_AD + "transformer_blocks.0.ff_norm.weight", _DF + "transformer_blocks.0.norm3.weight"),
    (_AD + "transformer_blocks.0.ff.net.0.proj.weight", _DF + "transformer_blocks.0.ff.net.0.proj.weight"),
    (
        _AD.replace("down_blocks.1", "up_blocks.3").replace("modules.1", "modules.2") + "proj_out.weight",
        "up_blocks.3.motion_modules.2.proj_out.weight",
    ),
]


@pytest.fixture(scope="module")
def checkpoint(tiny_tree):
    return torch.load(tiny_tree / CKPT, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def sd_weights(tiny_tree):
    return torch.load(tiny_tree / SD_UNET / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=True)


def _spatial(state):
    return {k: v for k, v in state.items() if "motion_modules" not in k}


def _motion(state):
    return {k: v for k, v in state.items() if "motion_modules" in k}


def _assert_spatial_from(unet_state, source, label):
    assert set(_spatial(unet_state)) == set(source), f"spatial key set differs from {label}"
    for key, value in source.items():
        assert torch.equal(unet_state[key], value), f"{key} is not {label}'s"


def _assert_motion_from_checkpoint(unet_state, checkpoint):
    for original, diffusers_name in MOTION_KEY_PAIRS:
        assert torch.equal(unet_state[diffusers_name], checkpoint[original]), diffusers_name
    non_pe = [k for k in _motion(checkpoint) if "pos_encoder" not in k]
    assert len(_motion(unet_state)) - sum("pos_embed" in k for k in unet_state) == len(non_pe)


def _save(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def _load(tiny_tree, ckpt, **kwargs):
    return {k: v.clone() for k, v in load_video_unet(tiny_tree / SD_UNET, ckpt, **kwargs).state_dict().items()}


# ------------------------------------------------------------------------------------------------ temporal checkpoint


@pytest.fixture(scope="module")
def full_load(tiny_tree):
    return _load(tiny_tree, tiny_tree / CKPT)


def test_full_checkpoint_spatial_weights_replace_sd15(full_load, checkpoint, sd_weights):
    assert not torch.equal(checkpoint["conv_in.weight"], sd_weights["conv_in.weight"])  # the tree makes them differ
    _assert_spatial_from(full_load, _spatial(checkpoint), "the checkpoint")
    _assert_motion_from_checkpoint(full_load, checkpoint)
    assert not any(v.is_meta for v in full_load.values())


def _wrapped_variants(checkpoint):
    return {
        "lightning.ckpt": {"state_dict": checkpoint, "global_step": 1},
        "ddp.ckpt": {f"module.{k}": v for k, v in checkpoint.items()},
        "ddp_lightning.ckpt": {"state_dict": {f"module.{k}": v for k, v in checkpoint.items()}, "global_step": 7},
    }


def test_temporal_checkpoint_wrappers_read_the_same_tensors(checkpoint, tmp_path):
    for name, obj in _wrapped_variants(checkpoint).items():
        state = read_state_dict(_save(tmp_path, name, obj))
        assert set(state) == set(checkpoint), name
        for key, value in checkpoint.items():
            assert torch.equal(state[key], value), f"{name}: {key}"


def test_wrapped_temporal_checkpoint_loads_the_same_weights(tiny_tree, checkpoint, full_load, tmp_path):
    path = _save(tmp_path, "ddp_lightning.ckpt", _wrapped_variants(checkpoint)["ddp_lightning.ckpt"])
    state = _load(tiny_tree, path)
    assert set(state) == set(full_load)
    for key, value in full_load.items():
        assert torch.equal(state[key], value), key


def test_motion_only_checkpoint_keeps_sd15_spatial_weights(tiny_tree, checkpoint, sd_weights, tmp_path):
    path = _save(tmp_path, "motion_only.ckpt", _motion(checkpoint))
    state = _load(tiny_tree, path)
    _assert_spatial_from(state, sd_weights, "SD 1.5")
    _assert_motion_from_checkpoint(state, checkpoint)


def test_motion_only_flag_keeps_sd15_spatial_weights_with_full_checkpoint(tiny_tree, checkpoint, sd_weights):
    state = _load(tiny_tree, tiny_tree / CKPT, motion_only=True)
    _assert_spatial_from(state, sd_weights, "SD 1.5")
    _assert_motion_from_checkpoint(state, checkpoint)


def test_unet_prefixed_checkpoint_uses_motion_keys_only(tiny_tree, checkpoint, sd_weights, tmp_path):
    """Keys prefixed "unet." (a training checkpoint of a whole pipeline) do not fit the UNet: as in the original's
    fallback branch, only the motion modules are taken (prefix stripped); spatial weights stay SD 1.5's."""
    prefixed = {f"unet.{k}": v for k, v in checkpoint.items()}
    state = _load(tiny_tree, _save(tmp_path, "unet_prefixed.ckpt", prefixed))
    _assert_spatial_from(state, sd_weights, "SD 1.5")
    _assert_motion_from_checkpoint(state, checkpoint)

    motion_only = {f"unet.{k}": v for k, v in _motion(checkpoint).items()}
    state = _load(tiny_tree, _save(tmp_path, "unet_prefixed_motion.ckpt", motion_only))
    _assert_spatial_from(state, sd_weights, "SD 1.5")
    _assert_motion_from_checkpoint(state, checkpoint)


def test_checkpoint_without_motion_modules_is_refused(tiny_tree, checkpoint, tmp_path):
    path = _save(tmp_path, "spatial_only.ckpt", _spatial(checkpoint))
    with pytest.raises(CheckpointError, match="motion"):
        load_video_unet(tiny_tree / SD_UNET, path)


def test_legacy_non_zip_torch_pickle_loads(tiny_tree, checkpoint, tmp_path):
    """torch.save(..., _use_new_zipfile_serialization=False) files (torch < 1.6 format) are still plain tensor
    pickles the original's torch.load reads; they must load (weights_only) too."""
    path = tmp_path / "legacy.ckpt"
    torch.save(_motion(checkpoint), path, _use_new_zipfile_serialization=False)
    state = read_state_dict(path)
    assert set(state) == set(_motion(checkpoint))
    key = MOTION_KEY_PAIRS[0][0]
    assert torch.equal(state[key], checkpoint[key])


def test_sd_unet_safetensors_preferred_over_bin(tiny_tree, sd_weights, tmp_path):
    unet_dir = tmp_path / "unet"
    shutil.copytree(tiny_tree / SD_UNET, unet_dir)
    other = {k: (v + 1.0).contiguous() for k, v in sd_weights.items()}  # differs from the .bin everywhere
    safetensors.torch.save_file(other, unet_dir / "diffusion_pytorch_model.safetensors")
    state = {
        k: v.clone() for k, v in load_video_unet(unet_dir, tiny_tree / CKPT, motion_only=True).state_dict().items()
    }
    _assert_spatial_from(state, other, "the safetensors file")


# ------------------------------------------------------------------------------------------------ appearance encoder


def test_appearance_encoder_loads_without_dead_tail(tiny_tree):
    folder = tiny_tree / "MagicAnimate/appearance_encoder"
    stored = safetensors.torch.load_file(folder / "diffusion_pytorch_model.safetensors")
    assert len(APPEARANCE_ENCODER_DEAD_TAIL) == 24 and not (set(stored) & APPEARANCE_ENCODER_DEAD_TAIL)
    model = load_appearance_encoder(folder)
    state = model.state_dict()
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert set(state) == set(stored) | APPEARANCE_ENCODER_DEAD_TAIL
    for key, value in stored.items():
        assert torch.equal(state[key], value), key
    with torch.no_grad():
        out = model(torch.randn(2, 4, 8, 8), 500, encoder_hidden_states=torch.randn(2, 77, 32)).sample
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_appearance_encoder_missing_other_key_names_key_and_file(tiny_tree, tmp_path):
    folder = tmp_path / "appearance_encoder"
    shutil.copytree(tiny_tree / "MagicAnimate/appearance_encoder", folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    stored = safetensors.torch.load_file(weights)
    dropped = "up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_k.weight"
    del stored[dropped]
    safetensors.torch.save_file(stored, weights)
    with pytest.raises(CheckpointError) as info:
        load_appearance_encoder(folder)
    assert dropped in str(info.value)
    assert str(weights) in str(info.value) or weights.name in str(info.value)


# ------------------------------------------------------------------------------------------------ unsafe pickles


class _WritesMarker:
    """Unpickling this calls open(marker, "w"): code execution at load time."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_code_executing_pickle_is_refused(tiny_tree, checkpoint, tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = {**_motion(checkpoint), "evil": _WritesMarker(marker)}
    path = tmp_path / "temporal_attention.ckpt"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError):
        read_state_dict(path)
    with pytest.raises(CheckpointError):
        load_video_unet(tiny_tree / SD_UNET, path)
    assert not marker.exists(), "the checkpoint ran code"


def test_code_executing_sd_unet_bin_is_refused_by_the_pipeline(tiny_tree, tmp_path):
    from magicanimate import MagicAnimatePipeline

    root = _linked_tree(tmp_path / "tree", tiny_tree, omit="stable-diffusion-v1-5/unet")
    unet_dir = root / SD_UNET
    unet_dir.mkdir()
    shutil.copy(tiny_tree / SD_UNET / "config.json", unet_dir / "config.json")
    marker = tmp_path / "pwned"
    torch.save({"conv_in.weight": _WritesMarker(marker)}, unet_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError):
        MagicAnimatePipeline.from_pretrained(root, motion_only=True)
    assert not marker.exists(), "the checkpoint ran code"


# ------------------------------------------------------------------------------------------------ tree layout


def _linked_tree(root: Path, source: Path, omit: str | None = None) -> Path:
    """A copy of ``source``'s tree made of symlinks to its pieces, without ``omit``."""
    for piece in PIECES:
        if piece == omit:
            continue
        (root / piece).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source / piece, root / piece, target_is_directory=True)
    (root / "stable-diffusion-v1-5").mkdir(parents=True, exist_ok=True)
    (root / "MagicAnimate").mkdir(parents=True, exist_ok=True)
    return root


@pytest.mark.parametrize("omit", PIECES)
def test_missing_piece_raises_checkpoint_error_mentioning_download(tiny_tree, tmp_path, omit):
    from magicanimate import MagicAnimatePipeline

    root = _linked_tree(tmp_path / "tree", tiny_tree, omit)
    with pytest.raises(CheckpointError) as info:
        MagicAnimatePipeline.from_pretrained(root)
    message = str(info.value)
    assert "download" in message, message
    assert Path(omit).name in message, message


def test_missing_root_raises_checkpoint_error_mentioning_download(tmp_path):
    from magicanimate import MagicAnimatePipeline

    with pytest.raises(CheckpointError, match="download"):
        MagicAnimatePipeline.from_pretrained(tmp_path / "nothing-here")


def test_tiny_tree_has_the_release_layout(tiny_tree):
    """The test tree itself: formats and key sets of the original release (what the loaders are tested against)."""
    assert (tiny_tree / SD_UNET / "diffusion_pytorch_model.bin").is_file()
    assert json.loads((tiny_tree / "MagicAnimate/appearance_encoder/config.json").read_text())["_class_name"] == (
        "AppearanceEncoderModel"
    )
    checkpoint = torch.load(tiny_tree / CKPT, weights_only=True)
    assert len(_motion(checkpoint)) == 560 and sum("pos_encoder.pe" in k for k in checkpoint) == 40
    if PARITY.is_dir():  # cross-check with the fixture recorded from the original code
        ours = {k: tuple(v.shape) for k, v in checkpoint.items()}
        theirs = {k: tuple(v.shape) for k, v in torch.load(PARITY / "pretrained" / CKPT, weights_only=True).items()}
        assert ours == theirs
        ae = safetensors.torch.load_file(
            tiny_tree / "MagicAnimate/appearance_encoder/diffusion_pytorch_model.safetensors"
        )
        ae_fixture = safetensors.torch.load_file(
            PARITY / "pretrained/MagicAnimate/appearance_encoder/diffusion_pytorch_model.safetensors"
        )
        assert {k: v.shape for k, v in ae.items()} == {k: v.shape for k, v in ae_fixture.items()}


# ------------------------------------------------------------------------------------------------ save / load


def test_save_pretrained_round_trip_gives_identical_frames(
    tiny_pipe, tiny_baseline, reference_image, motion16, tmp_path
):
    from magicanimate import MagicAnimatePipeline

    tiny_pipe.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model_index.json").is_file()
    loaded = MagicAnimatePipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    frames = loaded(
        reference_image,
        motion16,
        num_inference_steps=TINY_STEPS,
        guidance_scale=7.5,
        latents=tiny_latents(TINY_FRAMES),
        output_type="np",
    ).frames
    np.testing.assert_allclose(frames, tiny_baseline, rtol=0, atol=1e-6)
