"""Per-character LoRA: peft adapters on the attention projections of the appearance encoder and the video UNet, the
``.safetensors`` file ``magicanimate export`` writes for them, and applying that file to a loaded pipeline
(``magicanimate animate --lora FILE --lora-scale S``).

The file holds peft's state dict of each model (``get_peft_model_state_dict``: ``...to_q.lora_A.weight``, ...)
under the prefixes ``appearance_encoder.`` and ``unet.``, and in its metadata the LoRA config (rank, alpha, target
modules), so loading needs nothing but the file. Applying fuses the adapters into the base weights (diffusers'
``fuse_lora`` at the given scale, then ``unload_lora``): the pipeline then runs plain modules at no extra cost, and
everything else (torch.compile, offload, several processes) sees an ordinary model.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

ADAPTER = "magicanimate"
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_MODELS = ("appearance_encoder", "unet")
FORMAT = "magicanimate-lora"


def dead_tail_modules() -> list[str]:
    """The appearance encoder's attention projections after its last reference layer: what they compute is never
    read (see :data:`~magicanimate.models.original_checkpoints.APPEARANCE_ENCODER_DEAD_TAIL`), so no adapter goes
    there (it could not learn anything)."""
    from ..models.original_checkpoints import APPEARANCE_ENCODER_DEAD_TAIL

    names = {key.rsplit(".", 1)[0] for key in APPEARANCE_ENCODER_DEAD_TAIL}
    return sorted(name for name in names if name.endswith(tuple(TARGET_MODULES)))


def lora_config(rank: int, alpha: float | None = None, model: str = "unet"):
    """peft's ``LoraConfig`` for ``model`` (``"unet"`` or ``"appearance_encoder"``), Gaussian-initialised A and zero
    B (an adapter that starts as a no-op)."""
    from peft import LoraConfig

    exclude = dead_tail_modules() if model == "appearance_encoder" else None
    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        init_lora_weights="gaussian",
        target_modules=list(TARGET_MODULES),
        exclude_modules=exclude,
    )


def add_lora(pipe, rank: int, alpha: float | None = None) -> None:
    """Inject trainable LoRA adapters into the pipeline's appearance encoder and video UNet (peft, through
    diffusers' ``add_adapter``); the reference-attention processors stay in place."""
    for name in LORA_MODELS:
        getattr(pipe, name).add_adapter(lora_config(rank, alpha, name), adapter_name=ADAPTER)


def lora_state_dict(pipe) -> dict:
    """The adapters' weights, as peft names them, under ``appearance_encoder.`` and ``unet.``."""
    from peft import get_peft_model_state_dict

    state = {}
    for name in LORA_MODELS:
        for key, value in get_peft_model_state_dict(getattr(pipe, name), adapter_name=ADAPTER).items():
            state[f"{name}.{key}"] = value.detach().float().cpu().contiguous()
    return state


def save_lora_file(path: str | Path, state: dict, rank: int, alpha: float | None) -> Path:
    """Write a LoRA file (see the module docstring), whole or not at all."""
    import safetensors.torch

    from ..io.output import atomic_output

    metadata = {
        "format": FORMAT,
        "config": json.dumps({"rank": rank, "alpha": alpha if alpha is not None else rank, "targets": TARGET_MODULES}),
    }
    path = Path(path)
    with atomic_output(path) as temp:
        safetensors.torch.save_file(state, temp, metadata=metadata)
    return path


@dataclass
class LoraFile:
    """A checked LoRA file: its weights per model and its config."""

    path: Path
    weights: dict[str, dict]
    rank: int
    alpha: float

    def apply(self, pipe, scale: float = 1.0) -> None:
        """Fuse the adapters into ``pipe``'s appearance encoder and video UNet at ``scale`` (0: unchanged)."""
        from peft import set_peft_model_state_dict

        for name in LORA_MODELS:
            model = getattr(pipe, name)
            model.add_adapter(lora_config(self.rank, self.alpha, name), adapter_name=ADAPTER)
            result = set_peft_model_state_dict(model, self.weights[name], adapter_name=ADAPTER)
            unexpected = getattr(result, "unexpected_keys", None) or []
            missing = [key for key in getattr(result, "missing_keys", None) or [] if "lora_" in key]
            if unexpected or missing:
                model.unload_lora()
                keys = ", ".join((unexpected or missing)[:3])
                raise CheckpointError(
                    f"the LoRA {self.path} does not fit the {name} ({keys}); it was trained on another model"
                )
            model.fuse_lora(lora_scale=scale)
            model.unload_lora()


def read_lora(path: str | Path) -> LoraFile:
    """Read and check a LoRA file written by ``magicanimate export`` (before any model loads, so a wrong file is
    named at once).

    Raises:
        CheckpointError: missing, unreadable, or not one of our LoRA files (one line).
    """
    import safetensors

    from ..io.files import check_checkpoint_file

    path = check_checkpoint_file(Path(path).expanduser())
    try:
        with safetensors.safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no items
    except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
        raise CheckpointError(f"cannot read the LoRA {path}: not a safetensors file ({str(err)[:120]})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a magicanimate LoRA (write one with 'magicanimate export RUN/checkpoint-N "
            "-o NAME.safetensors' after 'magicanimate train --stage lora')"
        )
    try:
        config = json.loads(metadata["config"])
        rank, alpha = int(config["rank"]), float(config["alpha"])
    except (KeyError, ValueError, TypeError):
        raise CheckpointError(f"{path} has no readable LoRA config in its metadata") from None
    weights = {name: {} for name in LORA_MODELS}
    for key, value in tensors.items():
        model, _, rest = key.partition(".")
        if model not in weights:
            raise CheckpointError(f"{path} holds {key}, which is no weight of the appearance encoder or the UNet")
        weights[model][rest] = value
    return LoraFile(path, weights, rank, alpha)


def lora_from_settings(config) -> LoraFile | None:
    """The checked LoRA file the animation settings name (``lora``), or ``None``; ``load_pipeline`` applies it at
    ``lora_scale``."""
    return read_lora(config.lora) if config.get("lora") else None
