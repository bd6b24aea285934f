"""Reading the MagicAnimate release's checkpoint files into diffusers models.

Two pieces of the release are not plain diffusers folders:

* ``temporal_attention/temporal_attention.ckpt``: a torch pickle of either the motion modules alone or the whole
  AnimateDiff-v1 UNet (the released file is the latter, 5.1 GB). As in the original loader, when every key names a
  UNet weight the file is loaded whole and its spatial weights replace SD 1.5's; otherwise only its
  ``motion_modules`` keys are used. Motion keys are renamed by diffusers' own AnimateDiff converter.
* ``appearance_encoder/``: an SD 1.5 UNet folder missing 24 weights of a tail the original never runs
  (:data:`APPEARANCE_ENCODER_DEAD_TAIL`). Those are filled with zeros; nothing reads what they produce.

Pickles are read with ``weights_only=True``: no code in a checkpoint is ever executed.
"""

import zipfile
from pathlib import Path

import safetensors.torch
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

from ..errors import CheckpointError
from .video_unet import VideoUNet, magicanimate_motion_adapter

_TAIL_BLOCK = "up_blocks.3.attentions.2.transformer_blocks.0."
APPEARANCE_ENCODER_DEAD_TAIL = frozenset(
    ["conv_norm_out.weight", "conv_norm_out.bias", "conv_out.weight", "conv_out.bias"]
    + ["up_blocks.3.attentions.2.proj_out.weight", "up_blocks.3.attentions.2.proj_out.bias"]
    + [
        _TAIL_BLOCK + key
        for key in [
            "attn1.to_q.weight",
            "attn1.to_k.weight",
            "attn1.to_v.weight",
            "attn1.to_out.0.weight",
            "attn1.to_out.0.bias",
            "norm2.weight",
            "norm2.bias",
            "attn2.to_q.weight",
            "attn2.to_k.weight",
            "attn2.to_v.weight",
            "attn2.to_out.0.weight",
            "attn2.to_out.0.bias",
            "norm3.weight",
            "norm3.bias",
            "ff.net.0.proj.weight",
            "ff.net.0.proj.bias",
            "ff.net.2.weight",
            "ff.net.2.bias",
        ]
    ]
)
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch pickle (plain, or ``{"state_dict": ...}``, ``module.`` prefix
    stripped), loaded without running code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(path)
        else:
            # mmap avoids a second copy of a 5 GB file; only zip-format pickles (torch >= 1.6) support it.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # noqa: BLE001 - any failure here means the file is unusable
        if "Weights only load failed" in str(err):
            raise CheckpointError(
                f"refusing to load {path}: it is a pickle that would run code when loaded (only plain tensors are "
                "read); use the released file ('magicanimate download'), or save its tensors as a plain state dict in "
                "a trusted session and run 'magicanimate convert' to get a safetensors-only tree"
            ) from None
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}


def find_weights(folder: str | Path, names=WEIGHT_NAMES) -> Path:
    """The weights file of a diffusers-style folder, safetensors preferred."""
    for name in names:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise CheckpointError(f"no weights in {folder} (expected one of: {', '.join(names)})")


def _load_into_skeleton(model: torch.nn.Module, state: dict, source: str, allowed_missing=frozenset()):
    """Assign ``state`` to a model built on the meta device; zero-fill ``allowed_missing``; error on anything else."""
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(k for k in set(expected) - set(state) if expected[k].is_meta)
    bad_shapes = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    problems = []
    if set(missing) - allowed_missing:
        problems.append(f"missing keys {_names(sorted(set(missing) - allowed_missing))}")
    if unexpected:
        problems.append(f"unexpected keys {_names(unexpected)}")
    if bad_shapes:
        shapes = [f"{k} {tuple(state[k].shape)} != model {tuple(expected[k].shape)}" for k in bad_shapes]
        problems.append(f"keys with the wrong shape (checkpoint vs model): {_names(shapes, limit=3)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state, strict=False, assign=True)
    for key in missing:
        module_name, _, tensor_name = key.rpartition(".")
        module = model.get_submodule(module_name)
        zeros = torch.zeros(expected[key].shape, dtype=expected[key].dtype)
        setattr(module, tensor_name, torch.nn.Parameter(zeros, requires_grad=False))
    return model


def _names(keys, limit=6):
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def load_appearance_encoder(folder: str | Path) -> UNet2DConditionModel:
    """The released appearance encoder (or any full SD 1.5 UNet folder) as a ``UNet2DConditionModel``."""
    config = UNet2DConditionModel.load_config(folder)
    with init_empty_weights():
        model = UNet2DConditionModel.from_config(config)
    weights = find_weights(folder)
    return _load_into_skeleton(model, read_state_dict(weights), str(weights), APPEARANCE_ENCODER_DEAD_TAIL).eval()


def split_temporal_checkpoint(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """``(spatial, motion)`` weights of a temporal_attention checkpoint, motion keys in diffusers names."""
    spatial, motion = {}, {}
    for key, value in state.items():
        (motion if "motion_modules" in key else spatial)[key] = value
    return spatial, convert_animatediff_checkpoint_to_diffusers(motion)


def load_video_unet(sd_unet_folder: str | Path, temporal_checkpoint: str | Path, motion_only: bool = False):
    """Build MagicAnimate's video UNet from SD 1.5's ``unet/`` folder and ``temporal_attention.ckpt``.

    ``motion_only=True`` ignores any spatial weights in the checkpoint, so another SD 1.5 fine-tune can serve as
    the base (the original always lets the checkpoint's spatial weights win when the file holds the whole UNet).
    """
    unet_config = UNet2DConditionModel.load_config(sd_unet_folder)
    with init_empty_weights():
        unet2d = UNet2DConditionModel.from_config(unet_config)
        adapter = magicanimate_motion_adapter(unet_config["block_out_channels"])
        model = VideoUNet.from_unet2d(unet2d, adapter, load_weights=False)
    spatial_keys = set(unet2d.state_dict())
    checkpoint = read_state_dict(temporal_checkpoint)
    spatial, motion = split_temporal_checkpoint(checkpoint)
    if not motion:
        raise CheckpointError(f"{temporal_checkpoint} holds no motion_modules weights")
    # The original's rule: a checkpoint whose every key is a UNet key is loaded whole (its spatial weights win);
    # otherwise (e.g. keys prefixed "unet.") only the motion modules are taken.
    checkpoint_is_whole_unet = set(spatial) <= spatial_keys
    motion = {key.removeprefix("unet."): value for key, value in motion.items()}
    if motion_only or not checkpoint_is_whole_unet or not spatial_keys <= set(spatial):
        base = read_state_dict(find_weights(sd_unet_folder))
        if checkpoint_is_whole_unet and not motion_only:
            base.update(spatial)
        spatial = base
    return _load_into_skeleton(model, {**spatial, **motion}, f"{sd_unet_folder} + {temporal_checkpoint}").eval()
