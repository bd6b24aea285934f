"""Reading the MagicAnimate release's checkpoint tree into diffusers models.

Two pieces of the release are not plain diffusers folders:

* ``temporal_attention/temporal_attention.ckpt``: a torch pickle of either the motion modules alone or the whole
  AnimateDiff-v1 UNet (the released file is the latter, 5.1 GB). As in the original loader, when every key names a
  UNet weight the file is loaded whole and its spatial weights replace SD 1.5's; otherwise only its
  ``motion_modules`` keys are used. Motion keys are renamed by diffusers' own AnimateDiff converter.
* ``appearance_encoder/``: an SD 1.5 UNet folder missing 24 weights of a tail the original never runs
  (:data:`APPEARANCE_ENCODER_DEAD_TAIL`). Those are filled with zeros; nothing reads what they produce.

The other pieces (VAE, ControlNet, text encoder, tokenizer) are loaded by diffusers and transformers, after every
file they will read has been checked here: a missing, unreadable or empty file, a Git LFS pointer, a damaged file
and a pickle that would run code each fail with one :class:`CheckpointError` line naming the file, instead of a
library's traceback. Pickles are read with ``weights_only=True``: no code in a checkpoint is ever executed.
"""

import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

from ..errors import CheckpointError, MagicAnimateError
from ..io.files import check_checkpoint_file
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

# Weight files in the order the loaders pick them (safetensors first, as diffusers and transformers do).
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
)
TRANSFORMERS_WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# A CLIP tokenizer is either vocab.json + merges.txt (the release) or tokenizer.json (saved by transformers 5).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
TEMPORAL_CHECKPOINT = Path("MagicAnimate/temporal_attention/temporal_attention.ckpt")

# What a library loader raises for an unusable file (json.JSONDecodeError is a ValueError).
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, safetensors.SafetensorError)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch pickle (plain, or ``{"state_dict": ...}``, ``module.`` prefix
    stripped), loaded without running code.

    Zip-format pickles (torch >= 1.6) and safetensors files are memory-mapped: the tensors are views of the file,
    so checking a pickle before a library loader reads it costs no second copy. :func:`materialize_weights` gives
    a loaded model memory of its own.
    """
    path = check_checkpoint_file(path)
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(path)
        else:
            with warnings.catch_warnings():  # "Detected pickle protocol 4": a note to torch developers, not to users
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # noqa: BLE001 - any failure here means the file is unusable
        imports = _code_imports(path) if "Weights only load failed" in str(err) else []
        if imports:
            raise CheckpointError(
                f"refusing to load {path}: it is a pickle that would run code when loaded ({', '.join(imports[:3])}; "
                "only plain tensors are read, nothing in it was run); use the released file ('magicanimate "
                "download'), or save its tensors as a plain state dict in a trusted session and run 'magicanimate "
                "convert' to get a safetensors-only tree"
            ) from None
        reason = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
        if "Weights only load failed" in reason:
            reason = "not a pickle of plain tensors"  # torch's advice to load it unsafely does not apply
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is damaged or not a checkpoint ({reason[:200]}); download it again"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors; is it the right file?")
    return {key.removeprefix("module."): value for key, value in state.items()}


# Modules whose globals torch's weights-only unpickler may accept (tensor rebuilding, containers, numpy scalars).
_TENSOR_MODULES = ("torch", "collections", "_codecs", "numpy", "builtins.set", "builtins.frozenset")
_MAX_PICKLES = 8  # the legacy (non-zip) torch format is a few pickles in a row: magic, protocol, sys info, data


def _code_imports(path: Path) -> list[str]:
    """The functions and classes outside torch/containers that the pickles of ``path`` would import when
    unpickled ([] when none, or when the file is no well-formed pickle at all: then it is damaged, not malicious).

    Read with :mod:`pickletools`, which decodes opcodes without executing any of them.
    """
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [name for name in archive.namelist() if name.endswith("data.pkl")]
                streams = [archive.open(name) for name in names[:1]]
        else:
            streams = [open(path, "rb")]  # noqa: SIM115 - closed below
    except (OSError, zipfile.BadZipFile):
        return []
    imports: list[str] = []
    for stream in streams:
        with stream:
            for _ in range(_MAX_PICKLES):
                strings: list[str] = []
                try:
                    for opcode, arg, _ in pickletools.genops(stream):
                        if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                            strings = [*strings[-1:], arg]
                        elif opcode.name in ("GLOBAL", "INST"):
                            imports.append(str(arg).replace(" ", "."))
                        elif opcode.name == "STACK_GLOBAL" and len(strings) == 2:
                            imports.append(".".join(strings))
                except (ValueError, EOFError, UnicodeDecodeError, pickle.UnpicklingError):
                    break  # no further pickle (raw tensor bytes follow in the legacy format) or a damaged one
    return sorted({name for name in imports if not name.startswith(_TENSOR_MODULES)})


def find_weights(folder: str | Path, names=WEIGHT_NAMES) -> Path:
    """The weights file of a diffusers-style folder, safetensors preferred, once :func:`check_checkpoint_file`
    accepts it (so a Git LFS pointer or an unreadable file is named as such, not skipped or called corrupt)."""
    for name in names:
        if os.path.lexists(Path(folder) / name):
            return check_checkpoint_file(Path(folder) / name)
    raise CheckpointError(f"no weights in {folder} (expected one of: {', '.join(names)})")


def check_weight_files(folder: str | Path, names=DIFFUSERS_WEIGHT_NAMES) -> list[Path]:
    """Check the files a diffusers/transformers loader will read from ``folder`` (its config, then the first of
    ``names`` present, or the shards a ``*.index.json`` lists) and return the weight files.

    Safetensors headers are parsed and pickles are read with our weights-only reader, so a pickle that would run
    code is refused here in one line instead of by the library (transformers prints a traceback and suggests
    loading it unsafely).
    """
    folder = Path(folder)
    check_checkpoint_file(folder / "config.json")
    for name in names:
        path = folder / name
        if not os.path.lexists(path):
            continue
        files = _shards(path) if name.endswith(".index.json") else [path]
        for file in files:
            if file.suffix == ".safetensors":
                _check_safetensors(file)
            else:
                read_state_dict(file)
        return files
    raise CheckpointError(f"no weights in {folder} (expected one of: {', '.join(names)})")


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(check_checkpoint_file(index).read_text())["weight_map"]
        return [check_checkpoint_file(index.parent / name) for name in sorted(set(weight_map.values()))]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"cannot read the shard index {index}: {type(err).__name__}: {err}") from None


def _check_safetensors(path: Path) -> None:
    check_checkpoint_file(path)
    try:
        with safetensors.safe_open(path, framework="pt") as handle:
            handle.keys()
    except Exception as err:  # noqa: BLE001 - a header that does not parse: the file is unusable
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is damaged or not a safetensors file ({reason[:200]}); download it "
            "again"
        ) from None


@contextmanager
def _loading(what: str, path: str | Path) -> Iterator[None]:
    """Any library error while ``what`` loads from ``path`` becomes one CheckpointError line."""
    try:
        yield
    except MagicAnimateError:
        raise
    except _LOAD_ERRORS as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot load the {what} from {path}: {message[:300]}") from err


def materialize_weights(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Give every parameter and buffer of ``model`` memory of its own: contiguous, allocated by torch (64-byte
    aligned) and cast to ``dtype`` (floating-point tensors only, as ``Module.to`` casts); returns ``model``.

    Why: a loaded tensor is a view of wherever its loader got it from. Tensors assigned from a memory-mapped
    ``torch.load`` or ``safetensors`` file keep that file's byte offsets (so their alignment differs between the
    release's pickles, a converted safetensors folder and a ``save_pretrained`` folder) and, from a pickle, its
    strides. BLAS kernels may round differently for differently aligned operands (oneMKL documents this; it is why
    the same weights animated a few values apart on an AVX2 CPU depending on the folder they came from). With this
    one last step, every loading path hands the pipeline the same memory layout, and no model keeps a file mapped.
    """
    sources: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(buffer) -> (buffer, its copy), for shared ones
    done: set[int] = set()  # parameters tied between modules are copied once

    def owned(tensor: torch.Tensor) -> torch.Tensor:
        cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        return torch.empty(tensor.shape, dtype=cast, device=tensor.device).copy_(tensor)  # contiguous, torch's memory

    with torch.no_grad():
        for module in model.modules():
            for param in module._parameters.values():
                if param is not None and id(param) not in done and not param.is_meta:
                    param.data = owned(param.data)
                    done.add(id(param))
            for name, buffer in module._buffers.items():
                if buffer is not None and not buffer.is_meta:
                    if id(buffer) not in sources:
                        sources[id(buffer)] = (buffer, owned(buffer))
                    module._buffers[name] = sources[id(buffer)][1]
    return model


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
        trainable = getattr(module, tensor_name).requires_grad  # as every other parameter (and diffusers' loader)
        setattr(module, tensor_name, torch.nn.Parameter(zeros, requires_grad=trainable))
    return model


def _names(keys, limit=6):
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def load_unet2d(folder: str | Path, what: str = "SD 1.5 UNet", allowed_missing=frozenset()) -> UNet2DConditionModel:
    """A ``UNet2DConditionModel`` from a diffusers UNet folder, read the way the release tree's other pickles are
    (weights only, memory-mapped, every key checked: one :class:`CheckpointError` line for a missing, damaged or
    unfitting file); ``allowed_missing`` keys are zero-filled."""
    folder = Path(folder)
    with _loading(f"{what} config", folder):
        config = UNet2DConditionModel.load_config(check_checkpoint_file(folder / "config.json").parent)
        with init_empty_weights():
            model = UNet2DConditionModel.from_config(config)
    weights = find_weights(folder)
    return _load_into_skeleton(model, read_state_dict(weights), str(weights), allowed_missing).eval()


def load_appearance_encoder(folder: str | Path) -> UNet2DConditionModel:
    """The released appearance encoder (or any full SD 1.5 UNet folder) as a ``UNet2DConditionModel``."""
    return load_unet2d(folder, "appearance encoder", APPEARANCE_ENCODER_DEAD_TAIL)


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
    sd_unet_folder = Path(sd_unet_folder)
    with _loading("SD 1.5 UNet config", sd_unet_folder):
        unet_config = UNet2DConditionModel.load_config(check_checkpoint_file(sd_unet_folder / "config.json").parent)
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


def load_diffusers_model(cls: type, folder: str | Path, what: str):
    """``cls.from_pretrained(folder)`` (a diffusers model folder) once its files pass :func:`check_weight_files`."""
    check_weight_files(folder, DIFFUSERS_WEIGHT_NAMES)
    with _loading(what, folder):
        return cls.from_pretrained(folder).eval()


def load_text_encoder(folder: str | Path):
    """SD 1.5's CLIP text encoder (transformers), once its files pass :func:`check_weight_files`."""
    from transformers import CLIPTextModel

    check_weight_files(folder, TRANSFORMERS_WEIGHT_NAMES)
    with _loading("text encoder", folder):
        return CLIPTextModel.from_pretrained(folder).eval()


def check_tokenizer_files(folder: str | Path) -> None:
    """Check the tokenizer files present in ``folder``, and that they make a tokenizer."""
    folder = Path(folder)
    present = {name for name in TOKENIZER_FILES if os.path.lexists(folder / name)}
    for name in sorted(present):
        check_checkpoint_file(folder / name)
    if "tokenizer.json" not in present and not {"vocab.json", "merges.txt"} <= present:
        raise CheckpointError(f"no tokenizer in {folder} (expected tokenizer.json, or vocab.json and merges.txt)")


def load_tokenizer(folder: str | Path):
    """SD 1.5's CLIP tokenizer."""
    from transformers import CLIPTokenizer

    check_tokenizer_files(folder)
    with _loading("tokenizer", folder):
        return CLIPTokenizer.from_pretrained(folder)


def temporal_checkpoint_path(root: str | Path) -> Path:
    """The release's ``temporal_attention.ckpt``, or the ``.safetensors`` copy beside it when there is one."""
    path = Path(root) / TEMPORAL_CHECKPOINT
    converted = path.with_suffix(".safetensors")
    return converted if converted.is_file() else path


def load_release_components(
    root: str | Path,
    *,
    pretrained_model_path: str | Path | None = None,
    pretrained_vae_path: str | Path | None = None,
    pretrained_appearance_encoder_path: str | Path | None = None,
    pretrained_controlnet_path: str | Path | None = None,
    motion_module: str | Path | None = None,
    motion_only: bool = False,
) -> dict[str, torch.nn.Module]:
    """The models of the release tree under ``root``: ``vae``, ``text_encoder``, ``tokenizer``, ``unet`` (the
    video UNet), ``appearance_encoder`` and ``controlnet``, as loaded (no dtype cast, no device move).

    The keyword arguments (the original config's key names) replace single pieces: ``pretrained_model_path`` the
    SD 1.5 folder (``unet/``, ``text_encoder/``, ``tokenizer/``), ``motion_module`` the temporal checkpoint file.
    ``motion_only=True`` takes only the motion modules from the temporal checkpoint, keeping SD 1.5's (or a
    fine-tune's) spatial weights.

    Raises:
        CheckpointError: pieces are missing (all named in one line, see
            :func:`magicanimate.weights.incomplete_tree_error`), or a file is unusable.
    """
    from ..weights import incomplete_tree_error, missing_weights

    root = Path(root)
    sd = Path(pretrained_model_path) if pretrained_model_path else root / "stable-diffusion-v1-5"
    vae = Path(pretrained_vae_path) if pretrained_vae_path else root / "sd-vae-ft-mse"
    appearance = Path(pretrained_appearance_encoder_path or root / "MagicAnimate" / "appearance_encoder")
    controlnet = Path(pretrained_controlnet_path or root / "MagicAnimate" / "densepose_controlnet")
    motion = Path(motion_module) if motion_module else temporal_checkpoint_path(root)
    locations = {"sd-vae-ft-mse": vae, "MagicAnimate/appearance_encoder": appearance}
    locations["MagicAnimate/densepose_controlnet"] = controlnet
    locations.update({f"stable-diffusion-v1-5/{piece}": sd / piece for piece in ("unet", "text_encoder", "tokenizer")})
    given = {
        "stable-diffusion-v1-5/unet": pretrained_model_path,
        "stable-diffusion-v1-5/text_encoder": pretrained_model_path,
        "stable-diffusion-v1-5/tokenizer": pretrained_model_path,
        "sd-vae-ft-mse": pretrained_vae_path,
        "MagicAnimate/appearance_encoder": pretrained_appearance_encoder_path,
        "MagicAnimate/densepose_controlnet": pretrained_controlnet_path,
    }
    missing = missing_weights(root, {piece: locations[piece] for piece, value in given.items() if value})
    if motion_module:  # a file, not a folder of the tree
        missing = [m for m in missing if not m.startswith("MagicAnimate/temporal_attention")]
        missing += [] if os.path.lexists(motion) else [str(motion)]
    if missing:
        raise incomplete_tree_error(root, missing)
    return {
        "vae": load_diffusers_model(AutoencoderKL, vae, "VAE"),
        "text_encoder": load_text_encoder(sd / "text_encoder"),
        "tokenizer": load_tokenizer(sd / "tokenizer"),
        "unet": load_video_unet(sd / "unet", motion, motion_only=motion_only),
        "appearance_encoder": load_appearance_encoder(appearance),
        "controlnet": load_diffusers_model(ControlNetModel, controlnet, "DensePose ControlNet"),
    }


def check_converted_folder(root: str | Path, skip: tuple[str, ...] = ()) -> dict:
    """Check the files of a folder written by ``save_pretrained`` / ``magicanimate convert`` that diffusers will
    read (every component but those in ``skip``, which are given separately) and return its ``model_index.json``."""
    root = Path(root)
    index_path = check_checkpoint_file(root / "model_index.json")
    try:
        index = json.loads(index_path.read_text())
        if not isinstance(index, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read {index_path}: {err}; convert the release tree again") from None
    for name, entry in index.items():
        if name.startswith("_") or name in skip or not isinstance(entry, list) or len(entry) != 2 or None in entry:
            continue
        folder = root / name
        if name == "tokenizer":
            check_tokenizer_files(folder)
        elif name != "scheduler":
            names = TRANSFORMERS_WEIGHT_NAMES if entry[0] == "transformers" else DIFFUSERS_WEIGHT_NAMES
            check_weight_files(folder, names)
    return index
