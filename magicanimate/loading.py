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
    from .pipelines import MagicAnimatePipeline

    start = time.perf_counter()
    log.info(f"loading the models from {root} onto {device} ({str(dtype).removeprefix('torch.')})")
    with quiet_loading():
        pipe = MagicAnimatePipeline.from_pretrained(
            root, **pieces, motion_only=config.motion_only, fusion_blocks=config.fusion_blocks, dtype=dtype
        )
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
    return root, pieces


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
# activations are the largest tensors of a call) and one window per UNet call.
LOW_VRAM_CALL = {"decode_chunk_size": 1, "context_batch_size": 1}


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
