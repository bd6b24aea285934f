"""The training forward pass: one sample's diffusion loss, computed by the pipeline's own pieces.

:class:`TrainingModel` noises the VAE latents of the target frames at the sample's timestep and lets the pipeline
predict the noise exactly as one denoising step of ``animate`` does: :meth:`~MagicAnimatePipeline.encode_appearance`
(the appearance encoder on the clean reference latent at the same timestep, the empty prompt; its reference bank),
:meth:`~MagicAnimatePipeline.encode_motion` (the DensePose ControlNet) and
:meth:`~MagicAnimatePipeline.denoise_windows` (one video-UNet call whose window is the sample's frames, conditional
branch: attending to the reference; unconditional: not, when the reference is dropped). What trains depends on the
stage (:func:`select_trainable`); everything else is frozen. The module holds the three models that can train, so
accelerate (DDP, mixed precision) wraps them as one.
"""

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ..pipelines.pipeline_magicanimate import VAE_SCALING_FACTOR

TRAINED_MODELS = ("appearance_encoder", "controlnet", "unet")
VAE_CHUNK = 4  # frames per VAE encode call (the pipeline decodes in chunks of 4 too)


def _skip(hidden_states, *args, **kwargs):
    return hidden_states


def motion_modules(unet) -> list[nn.Module]:
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [module for block in blocks if block is not None for module in getattr(block, "motion_modules", [])]


@contextmanager
def motion_modules_off(unet):
    """The video UNet without its motion modules (each passes its input through): stage 1 trains on single frames,
    as the paper's first stage, whose UNet has no temporal layers yet."""
    modules = motion_modules(unet)
    for module in modules:
        module.forward = _skip  # an instance attribute: nn.Module.__call__ calls it instead of the class's forward
    try:
        yield
    finally:
        for module in modules:
            del module.forward


def select_trainable(pipe, stage: str) -> None:
    """Freeze everything, then unfreeze what ``stage`` trains: ``"1"`` the appearance encoder (but its dead tail,
    whose output is never read) and the DensePose ControlNet; ``"2"`` the motion modules of the video UNet;
    ``"lora"`` the LoRA adapters (injected before, see :func:`~magicanimate.training.lora.add_lora`)."""
    from ..models.original_checkpoints import APPEARANCE_ENCODER_DEAD_TAIL

    for component in pipe.components.values():
        if isinstance(component, nn.Module):
            component.requires_grad_(False)
    if stage == "1":
        for name, param in pipe.appearance_encoder.named_parameters():
            param.requires_grad_(name not in APPEARANCE_ENCODER_DEAD_TAIL)
        pipe.controlnet.requires_grad_(True)
    elif stage == "2":
        for module in motion_modules(pipe.unet):
            module.requires_grad_(True)
    elif stage == "lora":
        for name in ("appearance_encoder", "unet"):
            for key, param in getattr(pipe, name).named_parameters():
                param.requires_grad_(".lora_" in key)
    else:
        raise ValueError(f"unknown stage {stage!r}")


class TrainingModel(nn.Module):
    """``forward(sample) -> loss``: the noise-prediction loss of one :class:`~.dataset.TrainingSample`.

    Args:
        pipe: a loaded :class:`~magicanimate.pipelines.MagicAnimatePipeline` (its DDIM scheduler's schedule is the
            training schedule: the release's linear betas, epsilon prediction).
        stage: ``"1"``, ``"2"`` or ``"lora"`` (what :func:`select_trainable` has unfrozen; stage 1 runs the video UNet
            without motion modules).
        snr_gamma: min-SNR weighting (``min(SNR, gamma) / SNR`` per sample), or ``None``.
    """

    def __init__(self, pipe, stage: str, snr_gamma: float | None = None):
        super().__init__()
        from diffusers import DDPMScheduler

        self.unet, self.appearance_encoder, self.controlnet = pipe.unet, pipe.appearance_encoder, pipe.controlnet
        object.__setattr__(self, "pipe", pipe)  # not a submodule: the frozen VAE and text encoder stay out of DDP
        self.stage, self.snr_gamma = stage, snr_gamma
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        with torch.no_grad():
            self.register_buffer("text", pipe.encode_prompt("").float(), persistent=False)  # the empty prompt

    def trains(self, name: str) -> bool:
        return any(param.requires_grad for param in getattr(self, name).parameters())

    def encode_frames(self, frames, generator: torch.Generator) -> torch.Tensor:
        """VAE latents ``(1, 4, F, h, w)`` float32 of uint8 frames ``(F, H, W, 3)``: a sample of the latent
        distribution (as diffusion training uses; the reference is encoded as its mean, as the pipeline does)."""
        vae = self.pipe.vae
        pixels = torch.from_numpy(frames).to(self.text.device, vae.dtype).permute(0, 3, 1, 2) / 127.5 - 1
        latents = [vae.encode(chunk).latent_dist.sample(generator) for chunk in pixels.split(VAE_CHUNK)]
        return (torch.cat(latents).float() * VAE_SCALING_FACTOR).transpose(0, 1)[None]

    def sample_cached(self, mean, std, generator: torch.Generator) -> torch.Tensor:
        """What :meth:`encode_frames` returns, from the cached latent distribution (``mean``, ``std`` ``(F, 4, h,
        w)``) instead of the VAE encoder: the same draws as diffusers' ``DiagonalGaussianDistribution.sample``
        (``randn_tensor`` of each :data:`VAE_CHUNK`-frame chunk's shape, in the VAE's dtype, on its device, from
        ``generator``, chunk after chunk), then ``mean + std * draw``; so the generator is left where
        :meth:`encode_frames` leaves it and the diffusion noise drawn next is the same too."""
        from diffusers.utils.torch_utils import randn_tensor

        vae, device = self.pipe.vae, self.text.device
        mean = torch.from_numpy(mean).to(device, vae.dtype)
        std = torch.from_numpy(std).to(device, vae.dtype)
        latents = [
            m + s * randn_tensor(m.shape, generator=generator, device=device, dtype=vae.dtype)
            for m, s in zip(mean.split(VAE_CHUNK), std.split(VAE_CHUNK), strict=True)
        ]
        return (torch.cat(latents).float() * VAE_SCALING_FACTOR).transpose(0, 1)[None]

    def forward(self, sample) -> torch.Tensor:
        pipe, device = self.pipe, self.text.device
        text = self.text
        generator = torch.Generator().manual_seed(sample.noise_seed)
        with torch.no_grad():
            if sample.latent_mean is not None:  # cached latents (as pipe.encode_reference scales the mean)
                reference_mean = torch.from_numpy(sample.reference_mean[None]).to(device, pipe.vae.dtype)
                reference = reference_mean * VAE_SCALING_FACTOR
                latents = self.sample_cached(sample.latent_mean, sample.latent_std, generator)
            else:
                reference = pipe.encode_reference(sample.reference)
                latents = self.encode_frames(sample.frames, generator)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timestep = torch.tensor([sample.timestep], device=device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timestep)
        t = timestep[0]
        num_frames = noisy.shape[2]

        grad = torch.is_grad_enabled()
        if sample.drop_reference:
            pipe.reference_control.clear()
        else:
            with torch.set_grad_enabled(grad and self.trains("appearance_encoder")):
                pipe.encode_appearance(reference, t, text)
        control = torch.from_numpy(sample.control)
        with torch.set_grad_enabled(grad and self.trains("controlnet")):
            residuals = pipe.encode_motion(noisy, t, text, control, slice(0, num_frames), scale=1.0)
        with motion_modules_off(self.unet) if self.stage == "1" else nullcontext():
            branch = [not sample.drop_reference]
            prediction = pipe.denoise_windows(
                noisy, t, text, [list(range(num_frames))], residuals, branch, share_down_path=False
            )
        # Checkpointed layers recompute their forward in the backward pass; each must project the reference again
        # there, as it did here, instead of reusing the keys/values it cached (set_reference drops the cache).
        for reader in pipe.reference_control.readers.values():
            reader.set_reference(reader.reference)
        return self.loss(prediction, noise, timestep, sample.weights)

    def loss(self, prediction, noise, timestep, weights=None) -> torch.Tensor:
        """Mean squared error of the noise, weighted per pixel (``weights`` ``(F, H, W)``, averaged over each
        latent pixel's 8x8 patch) and per sample (min-SNR)."""
        error = (prediction.float() - noise.float()) ** 2  # (1, C, F, h, w)
        if weights is not None:
            pixels = torch.from_numpy(weights).to(error.device)[:, None]  # (F, 1, H, W)
            latent_weights = F.adaptive_avg_pool2d(pixels, error.shape[-2:])  # (F, 1, h, w)
            error = error * latent_weights.transpose(0, 1)[None]
        loss = error.mean()
        if self.snr_gamma is not None:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.noise_scheduler, timestep.cpu()).to(loss.device)
            loss = loss * (torch.clamp(snr, max=self.snr_gamma) / snr)[0]
        return loss
