"""Reading the original release's checkpoint layout (built in code by tiny_models.py; nothing from ../shared needed
except the one layout cross-check at the end)."""

import json
import os
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import PARITY, TINY_FRAMES, TINY_STEPS, assert_frames_close, tiny_latents
from safetensors.torch import load_file

from magicanimate.errors import CheckpointError, InputError
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


@pytest.mark.parametrize(
    "setting", ["pretrained_model_path", "pretrained_vae_path", "pretrained_controlnet_path", "motion_module"]
)
def test_missing_piece_given_on_its_own_is_named_by_its_path(tiny_tree, tmp_path, setting):
    from magicanimate import MagicAnimatePipeline

    absent = tmp_path / "not-there"
    with pytest.raises(CheckpointError) as info:
        MagicAnimatePipeline.from_pretrained(tiny_tree, **{setting: absent})
    message = str(info.value)
    assert str(absent) in message and "\n" not in message, message


def test_release_tree_takes_another_sd15_folder(tiny_tree, sd_weights, tmp_path):
    """``pretrained_model_path`` replaces unet/, text_encoder/ and tokenizer/; with ``motion_only`` its UNet's
    spatial weights are the ones used."""
    from magicanimate import MagicAnimatePipeline

    sd = tmp_path / "sd15-finetune"
    shutil.copytree(tiny_tree / "stable-diffusion-v1-5", sd)
    tuned = {k: v + 0.5 for k, v in sd_weights.items()}
    torch.save(tuned, sd / "unet" / "diffusion_pytorch_model.bin")
    pipe = MagicAnimatePipeline.from_pretrained(tiny_tree, pretrained_model_path=sd, motion_only=True)
    _assert_spatial_from(pipe.unet.state_dict(), tuned, "the fine-tune")


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


def _run(pipe, reference_image, motion16):
    return pipe(
        reference_image,
        motion16,
        num_inference_steps=TINY_STEPS,
        guidance_scale=7.5,
        latents=tiny_latents(TINY_FRAMES),
        output_type="np",
    ).frames


def _file_mappings() -> list[tuple[int, int, str]]:
    """``(start, end, path)`` of this process's memory mappings of files (Linux)."""
    mappings = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            mappings.append((start, end, fields[5]))
    return mappings


def _tensors(model):
    return [*model.named_parameters(), *model.named_buffers()]


def _build(pipe) -> dict:
    """What a loading path decides besides the weights' values, per component: module classes, attention
    processors, transformers' attention implementation, and every tensor's dtype, shape, strides, requires_grad."""
    built = {}
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            built[name] = type(component).__name__
            continue
        built[name] = {
            "training": component.training,
            "modules": {k: type(m).__name__ for k, m in component.named_modules()},
            "processors": {k: type(p).__name__ for k, p in getattr(component, "attn_processors", {}).items()},
            "attn_implementation": getattr(getattr(component, "config", None), "_attn_implementation", None),
            "tensors": {
                k: (t.dtype, tuple(t.shape), t.stride(), t.is_contiguous(), t.requires_grad)
                for k, t in _tensors(component)
            },
        }
    return built


def _assert_same_weights(loaded, original):
    for name, component in original.components.items():
        if isinstance(component, torch.nn.Module):
            ours, theirs = component.state_dict(), loaded.components[name].state_dict()
            assert set(ours) == set(theirs), name
            for key, value in ours.items():
                assert theirs[key].dtype == value.dtype and torch.equal(theirs[key], value), f"{name}: {key}"


def _assert_owned_aligned_memory(pipe, files_under: Path):
    """Every tensor in memory of its own: 64-byte aligned (torch's allocator), not a view of a checkpoint file."""
    mapped = [(start, end, path) for start, end, path in _file_mappings() if path.startswith(str(files_under))]
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            for key, tensor in _tensors(component):
                assert tensor.data_ptr() % 64 == 0, f"{name}.{key} is not 64-byte aligned"
                hits = [path for start, end, path in mapped if start <= tensor.data_ptr() < end]
                assert not hits, f"{name}.{key} still lives in the memory-mapped file {hits[0]}"


@pytest.fixture(scope="module")
def saved_tree(tiny_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "saved"
    tiny_pipe.save_pretrained(folder)
    return folder


def test_save_pretrained_round_trip_keeps_weights_and_frames(
    tiny_pipe, tiny_baseline, saved_tree, reference_image, motion16
):
    """Weights come back exactly; frames agree up to float32 rounding (FRAME_ATOL, measured: see conftest)."""
    from magicanimate import MagicAnimatePipeline

    assert (saved_tree / "model_index.json").is_file()
    loaded = MagicAnimatePipeline.from_pretrained(saved_tree)
    loaded.set_progress_bar_config(disable=True)
    _assert_same_weights(loaded, tiny_pipe)
    assert_frames_close(_run(loaded, reference_image, motion16), tiny_baseline)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc/self/maps to see file mappings")
def test_release_tree_and_saved_folder_build_the_same_models(tiny_tree, saved_tree):
    """The two loading paths (our release-tree loader, diffusers' for a saved folder) build the same classes,
    processors and tensor layouts, and leave no tensor in a memory-mapped checkpoint file, whose byte offsets
    (hence alignment) differ between the two kinds of folder (BLAS kernels may round by alignment)."""
    from magicanimate import MagicAnimatePipeline

    from_tree = MagicAnimatePipeline.from_pretrained(tiny_tree)
    from_saved = MagicAnimatePipeline.from_pretrained(saved_tree)
    _assert_same_weights(from_saved, from_tree)
    assert _build(from_saved) == _build(from_tree)
    _assert_owned_aligned_memory(from_tree, tiny_tree)
    _assert_owned_aligned_memory(from_saved, saved_tree)


@pytest.mark.parametrize("alias", ["dtype", "torch_dtype"])
def test_dtype_casts_both_kinds_of_folder_without_warnings(tiny_tree, saved_tree, alias, recwarn, capfd):
    from magicanimate import MagicAnimatePipeline

    warnings.simplefilter("always")
    capfd.readouterr()
    for folder in (tiny_tree, saved_tree):
        pipe = MagicAnimatePipeline.from_pretrained(folder, **{alias: torch.float16})
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module):
                dtypes = {t.dtype for _, t in _tensors(component) if t.is_floating_point()}
                assert dtypes == {torch.float16}, (folder.name, name, dtypes)
    assert [str(w.message) for w in recwarn] == []
    err = capfd.readouterr().err
    assert "float32" not in err and "deprecat" not in err.lower(), err


def test_dtype_and_torch_dtype_must_agree(saved_tree):
    from magicanimate import MagicAnimatePipeline

    with pytest.raises(InputError, match="torch_dtype"):
        MagicAnimatePipeline.from_pretrained(saved_tree, dtype=torch.float16, torch_dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------------------ converted folder


def test_converted_folder_keeps_and_overrides_fusion_blocks(tiny_tree, tmp_path):
    from magicanimate import MagicAnimatePipeline

    full = MagicAnimatePipeline.from_pretrained(tiny_tree, fusion_blocks="full")
    full.save_pretrained(tmp_path / "full")
    assert len(full.reference_control.readers) == 16  # SD 1.5 topology: 16 fused layers, 10 for "midup"
    kept = MagicAnimatePipeline.from_pretrained(tmp_path / "full")
    assert kept.config.fusion_blocks == "full" and set(kept.reference_control.readers) == set(
        full.reference_control.readers
    )
    midup = MagicAnimatePipeline.from_pretrained(tmp_path / "full", fusion_blocks="midup")
    assert midup.config.fusion_blocks == "midup" and len(midup.reference_control.readers) == 10


def _perturbed_copy(source: Path, target: Path, seed: int) -> dict[str, torch.Tensor]:
    """A copy of a diffusers folder whose safetensors weights are all shifted by random offsets; returns them."""
    shutil.copytree(source, target)
    weights = target / "diffusion_pytorch_model.safetensors"
    generator = torch.Generator().manual_seed(seed)
    state = {k: (v + torch.randn(v.shape, generator=generator)).contiguous() for k, v in load_file(weights).items()}
    safetensors.torch.save_file(state, weights)
    return state


def test_converted_folder_takes_standalone_pieces(tiny_tree, saved_tree, tmp_path):
    from magicanimate import MagicAnimatePipeline

    vae = _perturbed_copy(tiny_tree / "sd-vae-ft-mse", tmp_path / "vae", 1)
    controlnet = _perturbed_copy(tiny_tree / "MagicAnimate/densepose_controlnet", tmp_path / "controlnet", 2)
    appearance = _perturbed_copy(tiny_tree / "MagicAnimate/appearance_encoder", tmp_path / "appearance", 3)
    pipe = MagicAnimatePipeline.from_pretrained(
        saved_tree,
        pretrained_vae_path=tmp_path / "vae",
        pretrained_controlnet_path=tmp_path / "controlnet",
        pretrained_appearance_encoder_path=tmp_path / "appearance",  # release format: without the dead tail
    )
    for component, expected in ((pipe.vae, vae), (pipe.controlnet, controlnet), (pipe.appearance_encoder, appearance)):
        state = component.state_dict()
        for key, value in expected.items():
            assert torch.equal(state[key], value), key
    unchanged = MagicAnimatePipeline.from_pretrained(saved_tree)
    for key, value in unchanged.unet.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[key], value), key
    assert pipe.reference_control.appearance_encoder is pipe.appearance_encoder


@pytest.mark.parametrize(
    "setting",
    [
        {"motion_only": True},
        {"motion_module": "MagicAnimate/temporal_attention/temporal_attention.ckpt"},
        {"pretrained_model_path": "stable-diffusion-v1-5"},
    ],
    ids=lambda setting: next(iter(setting)),
)
def test_converted_folder_refuses_settings_that_cannot_apply(tiny_tree, saved_tree, setting):
    from magicanimate import MagicAnimatePipeline

    name, value = next(iter(setting.items()))
    value = tiny_tree / value if isinstance(value, str) else value
    with pytest.raises(InputError) as info:
        MagicAnimatePipeline.from_pretrained(saved_tree, **{name: value})
    message = str(info.value)
    assert name in message and "converted" in message and "\n" not in message, message


# ------------------------------------------------------------------------------------------------ unusable files

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4c4e6d81c8d7b1c3e0d2c6f5e1f3a2b4c5d6e7f8091a2b3c4d5e6f708192a3b4\nsize 5110000000\n"
)
# One weights file of each piece of the release tree, each read by a different loader.
TREE_WEIGHTS = [
    "MagicAnimate/temporal_attention/temporal_attention.ckpt",
    "stable-diffusion-v1-5/unet/diffusion_pytorch_model.bin",
    "stable-diffusion-v1-5/text_encoder/model.safetensors",
    "sd-vae-ft-mse/diffusion_pytorch_model.safetensors",
    "MagicAnimate/appearance_encoder/diffusion_pytorch_model.safetensors",
    "MagicAnimate/densepose_controlnet/diffusion_pytorch_model.safetensors",
]


def _tree_with(tmp_path: Path, tiny_tree: Path, relative: str, write) -> Path:
    """A tree of symlinks to ``tiny_tree`` in which ``relative``'s folder is a real copy and ``write(path)`` has
    replaced (or removed) that file."""
    piece = next(p for p in PIECES if relative.startswith(p + "/"))
    root = _linked_tree(tmp_path / "tree", tiny_tree, omit=piece)
    shutil.copytree(tiny_tree / piece, root / piece)
    (root / relative).unlink(missing_ok=True)
    write(root / relative)
    return root


def _one_line_error(root: Path, relative: str) -> str:
    """The error of loading ``root`` in which ``relative`` is unusable, asserted to be one line."""
    from magicanimate import MagicAnimatePipeline

    # SD 1.5's UNet weights are only read when the temporal checkpoint's spatial weights are not taken.
    kwargs = {"motion_only": True} if relative.startswith(str(SD_UNET)) else {}
    with pytest.raises(CheckpointError) as info:
        MagicAnimatePipeline.from_pretrained(root, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "pretrained/README.md" not in message, message
    return message


@pytest.mark.parametrize("relative", TREE_WEIGHTS)
def test_lfs_pointer_is_named_as_such(tiny_tree, tmp_path, relative):
    root = _tree_with(tmp_path, tiny_tree, relative, lambda path: path.write_text(LFS_POINTER))
    message = _one_line_error(root, relative)
    assert "Git LFS pointer" in message and relative in message, message


MALFORMED = {
    "empty": lambda path: path.write_bytes(b""),
    "random_bytes": lambda path: path.write_bytes(np.random.default_rng(0).bytes(4096)),
    "truncated": lambda path: path.write_bytes(b"\x50\x4b\x03\x04" + bytes(600)),
    "folder": lambda path: path.mkdir(),
}


@pytest.mark.parametrize("damage", sorted(MALFORMED))
@pytest.mark.parametrize("relative", TREE_WEIGHTS)
def test_malformed_checkpoint_file_is_one_line(tiny_tree, tmp_path, relative, damage):
    root = _tree_with(tmp_path, tiny_tree, relative, MALFORMED[damage])
    message = _one_line_error(root, relative)
    assert relative in message, message
    expected = {"empty": "empty", "folder": "folder"}.get(damage, "damaged")
    assert expected in message, message


def test_malformed_config_is_one_line(tiny_tree, tmp_path):
    root = _tree_with(tmp_path, tiny_tree, "sd-vae-ft-mse/config.json", lambda path: path.write_text("{not json"))
    assert "sd-vae-ft-mse" in _one_line_error(root, "sd-vae-ft-mse/config.json")


@pytest.mark.parametrize(
    ("relative", "key"),
    [
        ("stable-diffusion-v1-5/text_encoder/pytorch_model.bin", "text_model.embeddings.token_embedding.weight"),
        ("stable-diffusion-v1-5/unet/diffusion_pytorch_model.bin", "conv_in.weight"),
        ("sd-vae-ft-mse/diffusion_pytorch_model.bin", "encoder.conv_in.weight"),
        ("MagicAnimate/appearance_encoder/diffusion_pytorch_model.bin", "conv_in.weight"),
        ("MagicAnimate/densepose_controlnet/diffusion_pytorch_model.bin", "conv_in.weight"),
        ("MagicAnimate/temporal_attention/temporal_attention.ckpt", "conv_in.weight"),
    ],
)
def test_code_running_pickle_anywhere_in_the_tree_is_refused(tiny_tree, tmp_path, relative, key):
    """Each loader (ours, diffusers', transformers') sees a .bin only after our weights-only reader accepted it."""
    marker = tmp_path / "pwned"
    piece = next(p for p in PIECES if relative.startswith(p + "/"))
    root = _linked_tree(tmp_path / "tree", tiny_tree, omit=piece)
    shutil.copytree(tiny_tree / piece, root / piece, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.ckpt"))
    torch.save({key: _WritesMarker(marker)}, root / relative)
    message = _one_line_error(root, relative)
    assert "would run code" in message and relative in message and "weights_only" not in message, message
    assert not marker.exists(), "the checkpoint ran code"


@pytest.fixture(scope="module")
def world_readable_tree(tiny_tree):
    """A copy of the tiny tree another user can read (pytest's own temporary folders are private to their owner)."""
    root = Path(tempfile.mkdtemp(prefix="magicanimate-readable-"))
    shutil.copytree(tiny_tree, root / "tree")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield root / "tree"
    shutil.rmtree(root)


def _load_as_unprivileged_user(root: Path) -> str:
    """The error of ``from_pretrained(root)`` as this user, or as ``nobody`` when we are root (root may read any
    file, so a permission check would pass): in a forked child, which keeps the modules already imported."""
    import magicanimate.pipelines  # noqa: F401 - imported before the fork: nobody cannot read our interpreter
    from magicanimate import MagicAnimatePipeline

    if os.geteuid() != 0:
        with pytest.raises(CheckpointError) as info:
            MagicAnimatePipeline.from_pretrained(root)
        return str(info.value)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        try:
            os.setgid(65534)
            os.setuid(65534)
            MagicAnimatePipeline.from_pretrained(root)
            result = "loaded"
        except CheckpointError as err:
            result = f"CheckpointError: {err}"
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            result = f"{type(err).__name__}: {err}"
        os.write(write_end, result.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        result = pipe.read().decode()
    os.waitpid(child, 0)
    assert result.startswith("CheckpointError: "), result
    return result.removeprefix("CheckpointError: ")


@pytest.mark.skipif(
    not hasattr(os, "fork"), reason="POSIX permissions and os.fork needed (root runs the read as nobody)"
)
@pytest.mark.parametrize(
    "relative", ["sd-vae-ft-mse/diffusion_pytorch_model.safetensors", "stable-diffusion-v1-5/unet/config.json"]
)
def test_unreadable_file_is_a_permission_problem_not_corruption(world_readable_tree, relative):
    path = world_readable_tree / relative
    path.chmod(0o600 if os.geteuid() == 0 else 0o000)  # root owns it: nobody may not read it
    try:
        message = _load_as_unprivileged_user(world_readable_tree)
    finally:
        path.chmod(0o644)
    assert "permission denied" in message and relative in message, message
    assert "damaged" not in message and "corrupt" not in message, message
