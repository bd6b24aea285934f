"""``magicanimate export RUN/checkpoint-N -o TREE2/ [--ema]``: a training checkpoint -> weights ``animate`` uses.

Stages 1 and 2 give a tree in the original release layout, which ``MagicAnimatePipeline.from_pretrained`` (and the
original code) load like the release::

    TREE2/stable-diffusion-v1-5/, sd-vae-ft-mse/          the run's base tree (hard links, or copies)
    TREE2/MagicAnimate/appearance_encoder/                stage 1: trained (release key names, dead tail left out)
    TREE2/MagicAnimate/densepose_controlnet/              stage 1: trained
    TREE2/MagicAnimate/temporal_attention/temporal_attention.ckpt
                                                          stage 2: the whole UNet, AnimateDiff key names

The pieces a stage did not train are the base tree's files. The motion modules are renamed back to the original's
keys by inverting diffusers' own converter (``convert_animatediff_checkpoint_to_diffusers``, which our loader uses),
and every renamed key is checked to convert back to the name it came from. A LoRA run gives one ``.safetensors``
file for ``animate --lora FILE`` (see :mod:`.lora`). Only argparse is imported until the command runs.
"""

import argparse
import os
import re
import shutil
from pathlib import Path

from ..errors import CheckpointError, InputError

SHARED_PIECES = ("stable-diffusion-v1-5", "sd-vae-ft-mse")
APPEARANCE = Path("MagicAnimate/appearance_encoder")
CONTROLNET = Path("MagicAnimate/densepose_controlnet")
TEMPORAL = Path("MagicAnimate/temporal_attention")
TRAINED_PIECES = {"1": (APPEARANCE, CONTROLNET), "2": (TEMPORAL,)}


def add_parser(commands) -> argparse.ArgumentParser:
    """Register ``export`` on the ``magicanimate`` subcommands."""
    parser = commands.add_parser(
        "export",
        help="turn a training checkpoint into a weights tree (stages 1, 2) or a LoRA file",
        description="Write a training checkpoint as weights that animate uses: stages 1 and 2 give a tree in the "
        "release layout (pass it as --pretrained), a LoRA run gives NAME.safetensors (pass it as --lora).",
    )
    parser.add_argument("checkpoint", metavar="RUN/checkpoint-N", help="a checkpoint folder of a training run")
    parser.add_argument("-o", "--output", required=True, help="TREE/ for stages 1 and 2, NAME.safetensors for lora")
    parser.add_argument("--ema", action="store_true", help="export the moving average of the weights (train --ema)")
    parser.add_argument(
        "--pretrained", default=None, help="the tree the run started from (default: the run's pretrained setting)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.set_defaults(run=_run_and_report)
    return parser


def _run_and_report(args) -> int:
    path = export(args.checkpoint, args.output, ema=args.ema, pretrained=args.pretrained, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------------------------- motion-module keys

_MOTION_KEY = re.compile(r"^((?:down|up)_blocks\.\d+\.motion_modules\.\d+)\.(.+)$")
# diffusers' converter renames ``.norms.0`` -> ``.norm1`` and so on; these are its renames the other way round.
_TO_ORIGINAL = ((".norm1.", ".norms.0."), (".norm2.", ".norms.1."), (".norm3.", ".ff_norm."),
                (".attn1.", ".attention_blocks.0."), (".attn2.", ".attention_blocks.1."))  # fmt: skip
_POSITIONS = ".transformer_blocks.0.pos_embed.pe"


def original_unet_state(state: dict) -> dict:
    """A video-UNet state dict (diffusers names) in the release's ``temporal_attention.ckpt`` names: spatial keys
    as they are (SD 1.5's, identical in both), motion-module keys renamed, and each transformer block's sinusoidal
    table written for both of its attention blocks (the original keeps one ``pos_encoder.pe`` per attention block;
    the values are the same sinusoid).

    Raises:
        CheckpointError: a motion key that diffusers' converter would not turn back into its own name.
    """
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    out = {}
    for key, value in state.items():
        match = _MOTION_KEY.match(key)
        if match is None:
            out[key] = value
            continue
        prefix, rest = match.groups()
        if rest.endswith(_POSITIONS.removeprefix(".")):
            block = rest.removesuffix(".pos_embed.pe")
            for attention in (0, 1):
                out[f"{prefix}.temporal_transformer.{block}.attention_blocks.{attention}.pos_encoder.pe"] = value
            continue
        rest = "." + rest
        for new, old in _TO_ORIGINAL:
            rest = rest.replace(new, old)
        original = f"{prefix}.temporal_transformer{rest}"
        if list(convert_animatediff_checkpoint_to_diffusers({original: value})) != [key]:
            raise CheckpointError(f"cannot name {key} in the original layout ({original} converts to another key)")
        out[original] = value
    return out


# --------------------------------------------------------------------------------------------- export


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no extra space, independent of the source's later deletion), or a copy across file systems."""
    if source.is_dir():
        shutil.copytree(source, target, copy_function=_link_file)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        _link_file(source, target)


def _link_file(source, target) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def checkpoint_pipeline(checkpoint: Path, state: dict, pretrained: Path, ema: bool):
    """The run's base pipeline with the checkpoint's trained weights in place (LoRA injected for a LoRA run)."""
    import torch

    from ..loading import quiet_loading
    from ..pipelines import MagicAnimatePipeline
    from . import checkpoints as ckpt
    from .lora import add_lora
    from .model import TRAINED_MODELS
    from .trainer import load_trained

    config = state["config"]
    weights = ckpt.read_weights(checkpoint, ema=ema)  # a missing or damaged file fails before the models load
    with quiet_loading():
        pipe = MagicAnimatePipeline.from_pretrained(pretrained)
    if state["stage"] == "lora":
        add_lora(pipe, config["lora_rank"], config["lora_alpha"])
    params = {f"{m}.{n}": p for m in TRAINED_MODELS for n, p in getattr(pipe, m).named_parameters()}
    with torch.no_grad():
        load_trained({name: params[name] for name in weights if name in params}, weights, checkpoint)
    return pipe


def export(checkpoint, output, *, ema: bool = False, pretrained=None, overwrite: bool = False) -> Path:
    """Write ``checkpoint`` as a release-layout tree (stages 1 and 2) or a LoRA ``.safetensors`` (lora).

    Raises:
        InputError: not a checkpoint; the output exists (without ``overwrite``), is an input, or has the wrong kind
            (a LoRA needs ``.safetensors``); the base tree is not the release layout. CheckpointError: missing or
            damaged weights (e.g. ``--ema`` for a run without EMA).
    """
    from ..io.output import atomic_output, check_output
    from . import checkpoints as ckpt

    checkpoint, output = Path(checkpoint), Path(output)
    state = ckpt.read_state(checkpoint)
    stage = state["stage"]
    base = Path(pretrained or state["config"]["pretrained"])
    if stage == "lora":
        check_output(output, inputs=[checkpoint, base], overwrite=overwrite, suffixes=(".safetensors",))
    else:
        if output.suffix:
            raise InputError(
                f"a stage {stage} checkpoint exports a folder (a weights tree); -o {output} looks like a file"
            )
        check_output(output, inputs=[checkpoint, base], overwrite=overwrite, suffixes=None, folder_ok=True)
    if output.resolve().is_relative_to(base.resolve()):
        raise InputError(f"the output {output} is inside the pretrained tree {base}; choose a folder outside it")
    if not base.is_dir():
        raise InputError(
            f"the run's pretrained tree {base} is not there; pass --pretrained TREE (the tree the run started from)"
        )
    if stage != "lora" and not all((base / piece).is_dir() for piece in (*SHARED_PIECES, "MagicAnimate")):
        raise InputError(
            f"{base} is not in the release layout (stable-diffusion-v1-5/, sd-vae-ft-mse/, "
            "MagicAnimate/); export needs the release tree the run started from (--pretrained TREE)"
        )
    pipe = checkpoint_pipeline(checkpoint, state, base, ema)
    if stage == "lora":
        from .lora import lora_state_dict, save_lora_file

        return save_lora_file(
            output, lora_state_dict(pipe), state["config"]["lora_rank"], state["config"]["lora_alpha"]
        )
    with atomic_output(output, folder=True) as temp:
        for piece in SHARED_PIECES:
            link_or_copy(base / piece, temp / piece)
        trained = TRAINED_PIECES[stage]
        for piece in (APPEARANCE, CONTROLNET, TEMPORAL):
            if piece not in trained:
                link_or_copy(base / piece, temp / piece)
        if APPEARANCE in trained:
            write_appearance_encoder(pipe.appearance_encoder, base / APPEARANCE, temp / APPEARANCE)
        if CONTROLNET in trained:
            write_weights_folder(pipe.controlnet.state_dict(), base / CONTROLNET, temp / CONTROLNET)
        if TEMPORAL in trained:
            write_temporal_checkpoint(pipe.unet, temp / TEMPORAL / "temporal_attention.ckpt")
    return output


def write_weights_folder(state: dict, base_folder: Path, folder: Path) -> None:
    """``config.json`` of the base piece (the original's loader reads it) and the weights as safetensors."""
    import safetensors.torch

    folder.mkdir(parents=True)
    shutil.copy2(base_folder / "config.json", folder / "config.json")
    tensors = {key: value.detach().contiguous() for key, value in state.items()}
    safetensors.torch.save_file(tensors, folder / "diffusion_pytorch_model.safetensors")


def write_appearance_encoder(model, base_folder: Path, folder: Path) -> None:
    """The appearance encoder as the release ships it: without the 24 dead-tail weights it never had."""
    from ..models.original_checkpoints import APPEARANCE_ENCODER_DEAD_TAIL

    state = {k: v for k, v in model.state_dict().items() if k not in APPEARANCE_ENCODER_DEAD_TAIL}
    write_weights_folder(state, base_folder, folder)


def write_temporal_checkpoint(unet, path: Path) -> None:
    """``temporal_attention.ckpt`` as released: a torch pickle of plain tensors (the whole UNet, original names),
    which the original code ``torch.load``s and ours reads with ``weights_only=True``."""
    import torch

    path.parent.mkdir(parents=True)
    state = {key: value.detach().contiguous() for key, value in unet.state_dict().items()}
    torch.save(original_unet_state(state), path)
