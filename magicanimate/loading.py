"""From settings to a pipeline ready to run: find the weights, load them on the chosen device and precision, and
apply the speed switches that change how the models run (not what they compute)."""

import logging
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig

from .settings import PIECE_KEYS, load_config, pipeline_arguments

log = logging.getLogger("magicanimate")


def load_pipeline(config: DictConfig | str | Path | None = None, **settings):
    """The pipeline for the configured checkpoints on the configured device; the default tree is fetched on first
    use when online. ``config`` is a validated config, a YAML file, or ``None``; ``settings`` override it."""
    from .devices import resolve_device

    if not isinstance(config, DictConfig) or settings:
        config = load_config(config, **settings)
    device, dtype = resolve_device(config.device, config.dtype)
    root, pieces = locate_weights(config)
    from .training.lora import lora_from_settings

    lora = lora_from_settings(config)  # a missing or foreign LoRA file fails before the long loading
    from .pipelines import MagicAnimatePipeline

    start = time.perf_counter()
    log.info(f"loading the models from {root} onto {device} ({str(dtype).removeprefix('torch.')})")
    with quiet_loading():
        pipe = MagicAnimatePipeline.from_pretrained(
            root, **pieces, motion_only=config.motion_only, fusion_blocks=config.fusion_blocks, dtype=dtype
        )
    if lora is not None:
        lora.apply(pipe, config.lora_scale)  # fused into the weights: the pipeline runs plain modules
    import torch

    if config.low_vram and device.type == "cpu":
        warnings.warn("low_vram saves accelerator memory; on a CPU it changes nothing", stacklevel=2)
    if config.low_vram and device.type != "cpu":
        # The models stay on the CPU; each moves to the device when it runs, and the one before it leaves.
        pipe.enable_model_cpu_offload(device=device)
    else:
        for component in pipe.components.values():
            # torch's own .to: DiffusionPipeline.to warns about float16 on a CPU even where it works.
            if isinstance(component, torch.nn.Module):
                torch.nn.Module.to(component, device)
    log.info(f"models loaded in {time.perf_counter() - start:.0f} s")
    pipe.weights_root = root  # where the prompt stage finds SD 1.5's 2D UNet later (load_prompt_stage)
    return apply_speed_settings(pipe, config)


def locate_weights(config: DictConfig) -> tuple[Path, dict]:
    """``(root, pieces)``: the weights tree and the single pieces that replace parts of it, once every file the
    settings name is there (the default tree is fetched on first use when online). Cheap, so a run checks it before
    its plan and the long loading."""
    from .weights import default_pretrained_dir, ensure_weights, incomplete_tree_error, missing_weights

    pieces = {key: config[key] for key in PIECE_KEYS if config[key]}
    root = Path(config.pretrained).expanduser() if config.pretrained else default_pretrained_dir()
    converted = (root / "model_index.json").is_file()  # a tree written by `magicanimate convert`
    if len(pieces) < len(PIECE_KEYS) and not converted:
        if config.pretrained is None:
            ensure_weights(root, download=True)
        elif missing := missing_weights(root):
            raise incomplete_tree_error(root, missing)
    if config.prompt is not None:
        locate_prompt_weights(config, root)
    return root, pieces


def prompt_unet_folder(config: DictConfig, root: Path) -> Path:
    """SD 1.5's 2D UNet folder of the tree (or of ``pretrained_model_path``), which the prompt stage draws with."""
    if config.pretrained_model_path:
        return Path(config.pretrained_model_path).expanduser() / "unet"
    return root / "stable-diffusion-v1-5" / "unet"


def locate_prompt_weights(config: DictConfig, root: Path) -> Path:
    """What the prompt stage loads: the ``prompt_model`` folder (an SD 1.5 fine-tune in diffusers layout), else the
    tree's SD 1.5 UNet folder, once it is there; checked only when a prompt is used, before any model loads.

    Raises:
        CheckpointError: the folder is missing or incomplete (one line, with what to do).
    """
    from .errors import CheckpointError
    from .models.original_checkpoints import WEIGHT_NAMES
    from .weights import incomplete_tree_error

    if config.prompt_model:
        from .stages.prompt_reference import check_fine_tune

        return check_fine_tune(config.prompt_model)
    folder = prompt_unet_folder(config, root)
    files = [("config.json",), WEIGHT_NAMES]
    if all(any((folder / name).exists() for name in names) for names in files):
        return folder
    if (root / "model_index.json").is_file() and not config.pretrained_model_path:
        raise CheckpointError(
            f"a prompt needs SD 1.5's 2D UNet, which the converted folder {root} does not hold (it has the video "
            f"UNet only): copy the release tree's stable-diffusion-v1-5/unet to {folder}, or pass prompt_model "
            "(--prompt-model DIR, an SD 1.5 model in diffusers layout)"
        )
    missing = [str(folder / "|".join(names)) for names in files if not any((folder / n).exists() for n in names)]
    raise incomplete_tree_error(root, missing)


def tree_root(config: DictConfig, pipe=None) -> Path:
    """The weights tree ``pipe`` was loaded from (:func:`load_pipeline` records it), else the one the settings name
    (``pretrained``, or the default location)."""
    from .weights import default_pretrained_dir

    if getattr(pipe, "weights_root", None) is not None:
        return Path(pipe.weights_root)
    return Path(config.pretrained).expanduser() if config.pretrained else default_pretrained_dir()


def load_prompt_stage(pipe, config: DictConfig):
    """The prompt stage (:class:`~magicanimate.stages.prompt_reference.PromptReference`) for ``pipe``: SD 1.5's 2D
    UNet around ``pipe``'s VAE, text encoder and tokenizer, or the ``prompt_model`` fine-tune. Loaded on the first
    call that uses a prompt and kept on the pipeline for the next ones (batch jobs, demo requests)."""
    from .stages.prompt_reference import PromptReference

    source = locate_prompt_weights(config, tree_root(config, pipe))
    stage = getattr(pipe, "prompt_reference", None)
    if stage is not None and stage.source == source:
        return stage
    pipe.prompt_reference = None  # a stage of another source: freed before the next one loads
    log.info(f"loading the prompt stage's UNet from {source}")
    with quiet_loading():
        if config.prompt_model:
            device, bar = pipe._execution_device, getattr(pipe, "_progress_bar_config", {})
            offload = pipe.text_encoder.device.type != device.type  # low_vram: the pipeline's models wait on the CPU
            stage = PromptReference.from_fine_tune(source, device, pipe.text_encoder.dtype, bar, offload)
        else:
            stage = PromptReference.from_animation_pipeline(pipe, source)
    pipe.prompt_reference = stage
    return stage


@contextmanager
def quiet_loading():
    """No per-tensor "Loading weights" progress bars from transformers (seconds of noise, and lines in front of an
    error message when a checkpoint is broken)."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def apply_speed_settings(pipe, config):
    """The speed switches of the settings that change how the models run, not what they compute."""
    import torch

    if config.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.controlnet.to(memory_format=torch.channels_last)
    if config.motion_attention == "bmm":
        # Sequence length 16 with a huge batch: two batched GEMMs can beat fused SDPA kernels (the original's path).
        from diffusers.models.attention_processor import AttnProcessor

        processors = pipe.unet.attn_processors
        pipe.unet.set_attn_processor(
            {name: AttnProcessor() if "motion_modules" in name else proc for name, proc in processors.items()}
        )
    if config.compile:
        if pipe.unet.device.type == "cpu":
            warnings.warn(
                "compile on a CPU: the first step waits minutes for compilation and later steps gain little; it "
                "pays off on a GPU",
                stacklevel=2,
            )
        compile_models(pipe, config.compile_mode)
    return pipe


# What low_vram changes in every call on an accelerator: one frame per VAE decode call (the decoder's full-resolution
# activations are the largest tensors of a call), one window per UNet call, and the features that cache_interval
# keeps between steps wait on the CPU.
LOW_VRAM_CALL = {"decode_chunk_size": 1, "context_batch_size": 1, "cache_device": "cpu"}


def call_arguments(config, pipe) -> dict:
    """The ``MagicAnimatePipeline.__call__`` keyword arguments of the settings, with ``low_vram``'s on an
    accelerator (:data:`LOW_VRAM_CALL`, over the settings' own values)."""
    arguments = pipeline_arguments(config)
    if config.low_vram and pipe._execution_device.type != "cpu":
        arguments.update(LOW_VRAM_CALL)
    return arguments


def compile_models(pipe, mode: str = "default", **options) -> None:
    """``torch.compile`` the video UNet and the ControlNet, with ``mode`` ``"default"``, ``"max-autotune"`` or
    ``"reduce-overhead"`` (CUDA graphs); ``options`` go to ``torch.compile`` (e.g. ``backend``).

    The compiled wrappers replace the pipeline's components and forward everything else (config, dtype) to the
    models, whose reference-attention processors stay installed. Both calls of a denoising step trace as one graph
    each, without graph breaks (tests/test_compile.py). Each new window-batch shape or reference-row pattern (a
    guided or conditional-only step, a shorter last batch) compiles once and is then reused; CUDA graphs replay
    fixed shapes, which a window schedule gives.
    """
    import torch

    pipe.unet = torch.compile(pipe.unet, mode=mode, **options)
    pipe.controlnet = torch.compile(pipe.controlnet, mode=mode, **options)
