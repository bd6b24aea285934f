"""The run folder's checkpoints: ``RUN/checkpoint-STEP/``, each everything a resume or an export needs.

A checkpoint holds what accelerate's ``save_state`` writes (optimizer, learning-rate schedule, random states, one
file per process) plus, instead of accelerate's copy of the whole model, only the trained weights
(``trained.safetensors``: the parameters that train in this stage, by name; ``ema.safetensors``: their moving
average) and ``training_state.json`` (step, stage, the run's settings). The frozen weights are the pretrained tree's,
named in the settings, so a checkpoint is the size of what trains (LoRA: megabytes) rather than of the models.

A checkpoint is written under a hidden temporary name and renamed when complete, so ``--resume latest`` never
picks up a half-written one; older ones beyond the retention limit are deleted after a new one is complete.
"""

import json
import re
import shutil
from pathlib import Path

from ..errors import CheckpointError, InputError

PREFIX = "checkpoint-"
STATE_FILE = "training_state.json"
TRAINED_FILE = "trained.safetensors"
EMA_FILE = "ema.safetensors"
_NAME = re.compile(rf"{PREFIX}(\d+)")


def list_checkpoints(run: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the complete checkpoints of ``run``, oldest first."""
    run = Path(run)
    if not run.is_dir():
        return []
    found = []
    for folder in run.iterdir():
        match = _NAME.fullmatch(folder.name)
        if match and folder.is_dir() and (folder / STATE_FILE).is_file():
            found.append((int(match.group(1)), folder))
    return sorted(found)


def resume_folder(run: str | Path, resume: str | None) -> Path | None:
    """The checkpoint ``resume`` names: ``"latest"`` (the run's newest, or ``None`` when it has none yet: a fresh
    start, so the same command can start and restart a job), or a checkpoint folder.

    Raises:
        InputError: ``resume`` is neither, or names a folder that is not a complete checkpoint.
    """
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(run)
        return checkpoints[-1][1] if checkpoints else None
    folder = Path(resume)
    if not (folder / STATE_FILE).is_file():
        raise InputError(
            f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}); pass latest or RUN/{PREFIX}STEP"
        )
    return folder


def read_state(checkpoint: str | Path) -> dict:
    """``training_state.json`` of a checkpoint: ``step``, ``stage``, ``config`` (the run's settings), ``ema``."""
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise InputError(f"{checkpoint} is not a training checkpoint (no {STATE_FILE}); pass RUN/{PREFIX}STEP")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None


def write_state(folder: Path, state: dict) -> None:
    (Path(folder) / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")


def read_weights(checkpoint: str | Path, ema: bool = False) -> dict:
    """The trained weights of a checkpoint by parameter name (``ema``: their moving average)."""
    import safetensors.torch

    path = Path(checkpoint) / (EMA_FILE if ema else TRAINED_FILE)
    if not path.is_file():
        what = "an EMA (train with --ema)" if ema else "trained weights"
        raise CheckpointError(f"{checkpoint} holds no {what} ({path.name} is missing)")
    try:
        return safetensors.torch.load_file(path)
    except Exception as err:  # noqa: BLE001 - damaged or truncated
        raise CheckpointError(f"cannot read {path}: {str(err)[:200]}; the checkpoint is damaged") from None


def save_weights(path: Path, weights: dict) -> None:
    import safetensors.torch

    tensors = {name: tensor.detach().float().cpu().contiguous() for name, tensor in weights.items()}
    safetensors.torch.save_file(tensors, path)


def prune(run: str | Path, limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``limit`` (and stale temporary ones); returns what went."""
    run = Path(run)
    removed = []
    for stale in run.glob(f".{PREFIX}*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    checkpoints = list_checkpoints(run)
    if limit is not None and len(checkpoints) > limit:
        for _, folder in checkpoints[: len(checkpoints) - limit]:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def partial_folder(run: Path, step: int) -> Path:
    """The temporary name of checkpoint ``step`` while it is written (the same on every process)."""
    return Path(run) / f".{PREFIX}{step}.partial"


def final_folder(run: Path, step: int) -> Path:
    return Path(run) / f"{PREFIX}{step}"
