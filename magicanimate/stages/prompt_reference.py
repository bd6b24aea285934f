"""A reference photo from a text prompt: the text -> image stage in front of the animation (MagicVideo-V2's T2I).

The release tree already holds everything SD 1.5 needs to draw a picture: the animation pipeline has loaded its VAE
(sd-vae-ft-mse, a drop-in for SD 1.5's), CLIP text encoder and tokenizer, and ``stable-diffusion-v1-5/unet`` is on
disk (the video UNet is built from it). So this stage is diffusers' own :class:`StableDiffusionPipeline` around
those shared components plus the 2D UNet, which is loaded the first time a prompt is used and kept for later ones
(batch jobs, demo requests): no extra download, and no memory spent on it by runs without a prompt. Another SD 1.5
fine-tune in diffusers layout (``prompt_model``) brings its own UNet, VAE, text encoder and tokenizer instead.

The photo is drawn at the motion's aspect ratio, at the animation's size (so the pipeline never stretches it),
from the run's seed: the same settings give the same photo.

The safety checker is off: the release tree has no safety-checker weights (it would be a 1.2 GB download), and a
blacked-out reference would be animated as a black video. Whoever serves this to others is responsible for what
it generates.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler
from transformers.utils import logging as transformers_logging

from ..errors import CheckpointError
from ..models.original_checkpoints import (
    load_diffusers_model,
    load_text_encoder,
    load_tokenizer,
    load_unet2d,
    materialize_weights,
)

# Importing the pipeline imports transformers' image processors, which note (on every import, without torchvision)
# that they fall back to PIL: about the safety checker's feature extractor, which this stage never uses.
_verbosity = transformers_logging.get_verbosity()
transformers_logging.set_verbosity_error()
try:
    from diffusers import StableDiffusionPipeline
finally:
    transformers_logging.set_verbosity(_verbosity)

# SD 1.5's noise schedule (its scheduler_config.json: scaled-linear betas, unlike MagicAnimate's linear ones); the
# release tree does not ship that file. DPM-Solver++ (2M) reaches a clean picture in the default 30 steps.
SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
# The folders of an SD 1.5 fine-tune in diffusers layout that this stage reads.
FINE_TUNE_PARTS = ("unet", "vae", "text_encoder", "tokenizer")


def sd15_scheduler(folder: Path | None = None) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ on SD 1.5's schedule, or on ``folder/scheduler``'s (a fine-tune's own betas and prediction type)
    when that folder has one."""
    if folder is not None and (folder / "scheduler" / "scheduler_config.json").is_file():
        config = DPMSolverMultistepScheduler.load_config(folder / "scheduler")
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    return DPMSolverMultistepScheduler(**SD15_SCHEDULER, algorithm_type="dpmsolver++", solver_order=2)


def check_fine_tune(folder: str | Path) -> Path:
    """``folder`` once it looks like an SD 1.5 fine-tune in diffusers layout (the files themselves are checked when
    they load), else one :class:`CheckpointError` line saying what is missing."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(
            f"prompt model folder not found: {folder}; pass an SD 1.5 fine-tune in diffusers layout "
            f"({'/, '.join(FINE_TUNE_PARTS)}/)"
        )
    missing = [part for part in FINE_TUNE_PARTS if not (folder / part).is_dir()]
    if missing:
        raise CheckpointError(
            f"prompt model {folder} is not an SD 1.5 folder in diffusers layout (missing: {', '.join(missing)}); a "
            "single .safetensors/.ckpt file needs converting first (diffusers' StableDiffusionPipeline."
            "from_single_file(...).save_pretrained(DIR))"
        )
    return folder


@dataclass
class PromptReference:
    """Text -> reference photo with a :class:`StableDiffusionPipeline`.

    ``source`` says where the UNet came from (the cache key of :func:`magicanimate.loading.load_prompt_stage`).
    ``offload``: the UNet waits on the CPU and visits the execution device only while it draws (the animation
    pipeline runs with model offload, ``low_vram``); the shared VAE and text encoder move by their own hooks.
    """

    pipeline: StableDiffusionPipeline
    source: Path
    offload: bool = False

    @classmethod
    def from_animation_pipeline(cls, pipe, unet_folder: str | Path) -> "PromptReference":
        """Share ``pipe``'s VAE, text encoder and tokenizer; load SD 1.5's 2D UNet from ``unet_folder`` in the
        animation pipeline's precision, on its device."""
        unet = load_unet2d(unet_folder)
        dtype, device = pipe.text_encoder.dtype, pipe._execution_device
        offload = pipe.text_encoder.device.type != device.type  # model offload: every model waits on the CPU
        materialize_weights(unet, dtype).eval()
        torch.nn.Module.to(unet, "cpu" if offload else device)
        text_to_image = StableDiffusionPipeline(
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            unet=unet,
            scheduler=sd15_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        text_to_image.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        return cls(text_to_image, Path(unet_folder), offload)

    @classmethod
    def from_fine_tune(
        cls,
        folder: str | Path,
        device: torch.device,
        dtype: torch.dtype,
        progress_bar: dict | None = None,
        offload: bool = False,
    ) -> "PromptReference":
        """An SD 1.5 fine-tune in diffusers layout, with its own UNet, VAE, text encoder and tokenizer, on ``device``
        in ``dtype`` (``offload``: waiting on the CPU, each moved to ``device`` while it runs: diffusers' model
        offload, as the animation pipeline's with ``low_vram``)."""
        folder = check_fine_tune(folder)
        models = {
            "unet": load_unet2d(folder / "unet", "prompt model's UNet"),
            "vae": load_diffusers_model(AutoencoderKL, folder / "vae", "prompt model's VAE"),
            "text_encoder": load_text_encoder(folder / "text_encoder"),
        }
        for model in models.values():
            materialize_weights(model, dtype).eval()
            torch.nn.Module.to(model, "cpu" if offload else device)
        text_to_image = StableDiffusionPipeline(
            **models,
            tokenizer=load_tokenizer(folder / "tokenizer"),
            scheduler=sd15_scheduler(folder),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        text_to_image.set_progress_bar_config(**(progress_bar or {}))
        if offload:
            text_to_image.enable_model_cpu_offload(device=device)
        return cls(text_to_image, folder)

    @property
    def device(self) -> torch.device:
        return self.pipeline._execution_device

    def __call__(
        self,
        prompt: str,
        *,
        height: int,
        width: int,
        negative_prompt: str | None = None,
        steps: int = 30,
        guidance: float = 7.5,
        seed: int = 1,
        on_step: Callable[[int], None] | None = None,
    ) -> PIL.Image.Image:
        """The photo ``prompt`` describes, ``width x height`` (multiples of 8), from ``seed``. ``on_step(i)`` is
        told after each of the ``steps`` denoising steps (it may raise to stop)."""

        def step_end(pipeline, step, timestep, tensors):
            if on_step is not None:
                on_step(step)
            return tensors

        unet = self.pipeline.unet
        if self.offload:
            torch.nn.Module.to(unet, self.device)
        try:
            image = self.pipeline(
                prompt,
                height=height,
                width=width,
                negative_prompt=negative_prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator(self.device).manual_seed(seed),
                output_type="np",
                callback_on_step_end=step_end,
            ).images[0]
        finally:
            if self.offload:
                torch.nn.Module.to(unet, "cpu")
        return PIL.Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))


def reference_output_path(output: str | Path) -> Path:
    """Where the generated photo of an animation written to ``output`` goes: ``out.mp4`` -> ``out.reference.png``
    (``frames/`` -> ``frames.reference.png``, beside the folder)."""
    output = Path(output)
    return output.with_name(f"{output.stem if output.suffix else output.name}.reference.png")


def save_reference(image: PIL.Image.Image, output: str | Path) -> Path:
    """Write ``image`` next to the animation ``output`` (:func:`reference_output_path`), complete or not at all."""
    from ..io.output import atomic_output

    path = reference_output_path(output)
    with atomic_output(path) as temp:
        image.save(temp, format="PNG")
    return path
