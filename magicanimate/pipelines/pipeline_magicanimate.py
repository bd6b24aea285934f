"""The MagicAnimate denoising algorithm as a diffusers pipeline.

Per denoising step: the appearance encoder encodes the reference image at the current timestep (its self-attention
inputs are the "reference bank"); the DensePose ControlNet encodes every motion frame; the video UNet denoises the
clip in overlapping windows, its conditional rows attending to the reference bank; window predictions are averaged
per frame, classifier-free guidance is applied, and the scheduler takes a step.
"""

import inspect
import itertools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from ..distributed import all_reduce_sum, map_shared
from ..errors import CheckpointError, InputError, ResourceError
from ..io import load_image, read_video
from ..models.original_checkpoints import (
    check_converted_folder,
    load_appearance_encoder,
    load_diffusers_model,
    load_release_components,
    materialize_weights,
)
from ..models.reference_attention import ReferenceAttentionControl
from ..models.shallow_controlnet import shallow_controlnet_residuals
from ..models.video_unet import VideoUNet
from .context_windows import WindowAccumulator, WindowWork, check_schedule, context_windows, fusion_weights
from .control_residuals import ControlResiduals
from .feature_cache import FeatureCache
from .keyframes import KeyframePlan, check_keyframes, reversed_windows

VAE_SCALING_FACTOR = 0.18215  # hard-coded by the original, equal to sd-vae-ft-mse's config
OUTPUT_TYPES = ("np", "pt", "pil", "latent")


def magicanimate_scheduler() -> DDIMScheduler:
    """The original's sampler: DDIM, linear betas 0.00085-0.012, steps_offset 1, no clipping, leading spacing."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="linear",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="leading",
    )


@dataclass
class MagicAnimatePipelineOutput(BaseOutput):
    """``frames``: ``(F, H, W, 3)`` float32 in [0, 1] (``output_type="np"``), a tensor, PIL images, or latents."""

    frames: np.ndarray | torch.Tensor | list[PIL.Image.Image]


class MagicAnimatePipeline(DiffusionPipeline):
    """Animate a reference image with a DensePose motion sequence (MagicAnimate).

    Components: ``vae`` (sd-vae-ft-mse), ``text_encoder``/``tokenizer`` (SD 1.5 CLIP; only the empty prompt is used),
    ``unet`` (:class:`VideoUNet`), ``appearance_encoder`` (an SD 1.5 ``UNet2DConditionModel``), ``controlnet``
    (DensePose ``ControlNetModel``) and any diffusers ``scheduler``. ``fusion_blocks`` picks the layers that attend
    to the reference: ``"midup"`` (the original's) or ``"full"``.
    """

    model_cpu_offload_seq = "text_encoder->appearance_encoder->controlnet->unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: VideoUNet,
        appearance_encoder,
        controlnet: ControlNetModel,
        scheduler: KarrasDiffusionSchedulers,
        fusion_blocks: str = "midup",
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            appearance_encoder=appearance_encoder,
            controlnet=controlnet,
            scheduler=scheduler,
        )
        self.register_to_config(fusion_blocks=fusion_blocks)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._interrupt = False
        self._share_down_path = True
        self.reference_control = ReferenceAttentionControl(appearance_encoder, unet, fusion_blocks)

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        pretrained_model_path: str | Path | None = None,
        pretrained_vae_path: str | Path | None = None,
        pretrained_appearance_encoder_path: str | Path | None = None,
        pretrained_controlnet_path: str | Path | None = None,
        motion_module: str | Path | None = None,
        motion_only: bool = False,
        fusion_blocks: str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> "MagicAnimatePipeline":
        """Load the original release tree, or a folder written by :meth:`save_pretrained` / ``magicanimate convert``.

        The release tree holds ``stable-diffusion-v1-5/``, ``sd-vae-ft-mse/`` and ``MagicAnimate/`` (read by
        :func:`~magicanimate.models.original_checkpoints.load_release_components`); any piece can be given on its
        own with the original config's key names, and ``motion_only=True`` takes only the motion modules from
        ``temporal_attention.ckpt``. A converted folder (``model_index.json``) takes the pieces that are whole
        components (``pretrained_vae_path``, ``pretrained_appearance_encoder_path``, ``pretrained_controlnet_path``)
        and ``fusion_blocks`` (default: the folder's own, for the release tree ``"midup"``); it refuses
        ``pretrained_model_path``, ``motion_module`` and ``motion_only``, which change what its UNet was built from.

        ``dtype`` casts every model (``torch_dtype`` is accepted as an alias, without a warning). Both kinds of
        folder end in the same step (:func:`~magicanimate.models.original_checkpoints.materialize_weights`), so the
        same weights give the same modules and memory layout, hence the same output, wherever they were read from.

        Raises:
            CheckpointError: a piece is missing or unusable (one line). InputError: a setting cannot apply.
        """
        torch_dtype = kwargs.pop("torch_dtype", None)
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise InputError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass only dtype")
        dtype = dtype if dtype is not None else torch_dtype
        root = Path(pretrained_model_name_or_path)
        if (root / "model_index.json").is_file():
            given = {"pretrained_model_path": pretrained_model_path, "motion_module": motion_module}
            refused = [name for name, value in {**given, "motion_only": motion_only}.items() if value]
            if refused:
                raise InputError(
                    f"{' and '.join(refused)} cannot apply to the converted folder {root}: its UNet already joins SD "
                    "1.5's weights and the motion modules; load the release tree with these settings instead, or "
                    "convert it again with motion_only"
                )
            overrides = {}
            if pretrained_vae_path:
                overrides["vae"] = load_diffusers_model(AutoencoderKL, pretrained_vae_path, "VAE")
            if pretrained_appearance_encoder_path:
                overrides["appearance_encoder"] = load_appearance_encoder(pretrained_appearance_encoder_path)
            if pretrained_controlnet_path:
                overrides["controlnet"] = load_diffusers_model(
                    ControlNetModel, pretrained_controlnet_path, "DensePose ControlNet"
                )
            check_converted_folder(root, skip=tuple(overrides))
            if fusion_blocks is not None:
                kwargs["fusion_blocks"] = fusion_blocks
            try:
                pipe = super().from_pretrained(root, **overrides, **kwargs)
            except (OSError, ValueError, RuntimeError) as err:
                message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise CheckpointError(f"cannot load the converted folder {root}: {message[:300]}") from err
        else:
            if kwargs:
                raise TypeError(f"unexpected arguments for the release tree {root}: {', '.join(sorted(kwargs))}")
            components = load_release_components(
                root,
                pretrained_model_path=pretrained_model_path,
                pretrained_vae_path=pretrained_vae_path,
                pretrained_appearance_encoder_path=pretrained_appearance_encoder_path,
                pretrained_controlnet_path=pretrained_controlnet_path,
                motion_module=motion_module,
                motion_only=motion_only,
            )
            pipe = cls(**components, scheduler=magicanimate_scheduler(), fusion_blocks=fusion_blocks or "midup")
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                # Not Module.to / ModelMixin.to: diffusers' warns about "modules kept in float32: []" on every cast.
                materialize_weights(component, dtype).eval()
        return pipe

    # ------------------------------------------------------------------------------------------------ inputs

    @staticmethod
    def load_motion(motion) -> np.ndarray:
        """DensePose frames as an array, from an array, a list of images, or a video path (see :meth:`check_inputs`
        for what they must be)."""
        if isinstance(motion, (str, Path)):
            motion, _ = read_video(motion)
        elif isinstance(motion, (list, tuple)):
            motion = np.stack([np.asarray(load_image(frame)) for frame in motion]) if motion else np.zeros((0,))
        return np.asarray(motion)

    def output_size(self, frames: np.ndarray, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """``(height, width)``: the given size or the motion frames', rounded down to a multiple of the VAE's."""
        scale = self.vae_scale_factor
        return (height or frames.shape[1]) // scale * scale, (width or frames.shape[2]) // scale * scale

    def check_inputs(
        self,
        frames: np.ndarray,
        height,
        width,
        num_inference_steps,
        guidance_scale,
        latents,
        context_frames,
        context_overlap,
        context_schedule,
        context_batch_size,
        controlnet_conditioning_scale,
        decode_chunk_size,
        output_type,
        distributed,
        cfg_parallel,
    ) -> None:
        """Raise :class:`InputError` with a one-line message for any argument the call cannot use, before any model
        runs (a bad setting must not cost a whole denoising run)."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
            raise InputError(f"motion must be F x H x W x 3 frames, got shape {frames.shape}")
        if frames.dtype != np.uint8:
            raise InputError(f"motion frames must be uint8 RGB, got {frames.dtype}")
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        counts = {
            "num_inference_steps": num_inference_steps,
            "context_frames": context_frames,
            "context_batch_size": context_batch_size,
            "decode_chunk_size": decode_chunk_size,
        }
        for name, value in counts.items():
            if not _is_int(value) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if not _is_int(context_overlap) or not 0 <= context_overlap < context_frames:
            raise InputError(
                f"context_overlap must be an integer from 0 to context_frames - 1 ({context_frames - 1}), "
                f"got {context_overlap!r}"
            )
        max_frames = self.unet.config.get("motion_max_seq_length")
        if max_frames is not None and context_frames > max_frames:
            raise InputError(
                f"context_frames must be at most {max_frames} (the motion modules' length), got {context_frames}"
            )
        check_schedule(context_schedule)
        for name, value in (
            ("guidance_scale", guidance_scale),
            ("controlnet_conditioning_scale", controlnet_conditioning_scale),
        ):
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value!r}")
        for name, value in (("height", height), ("width", width)):
            if value is not None and (not _is_int(value) or value < 1):
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        size, scale = self.output_size(frames, height, width), self.vae_scale_factor
        if min(size) < scale:
            raise InputError(f"output size {size[1]}x{size[0]} is too small; it must be at least {scale}x{scale}")
        if latents is not None:
            expected = (1, self.unet.config.in_channels, size[0] // scale, size[1] // scale)
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else None
            if shape is None or len(shape) != 5 or shape[:2] + shape[3:] != expected or not latents.is_floating_point():
                raise InputError(
                    f"latents must be a float tensor of shape ({expected[0]}, {expected[1]}, F, {expected[2]}, "
                    f"{expected[3]}), got {shape if shape is not None else type(latents).__name__}"
                )
        if cfg_parallel and not distributed:
            raise InputError("cfg_parallel splits the guidance branches across ranks: it needs distributed=True")

    @staticmethod
    def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
        """Resize like the original: PIL bicubic to the exact size (no-op when already that size)."""
        if frames.shape[1:3] == (height, width):
            return frames
        resized = [PIL.Image.fromarray(f).resize((width, height), PIL.Image.BICUBIC) for f in frames]
        return np.stack([np.asarray(f) for f in resized])

    def encode_prompt(self, prompt: str = "") -> torch.Tensor:
        """CLIP embedding of the prompt (the original always uses ``""``): ``(1, 77, dim)``."""
        ids = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self._execution_device))[0]

    def encode_reference(self, image: np.ndarray) -> torch.Tensor:
        """Clean VAE latent of the reference image (``latent_dist.mean``, not a sample), as the original does."""
        pixels = torch.from_numpy(image[None].copy()).to(self._execution_device, self.vae.dtype) / 127.5 - 1
        latent = self.vae.encode(pixels.permute(0, 3, 1, 2)).latent_dist.mean
        return latent * VAE_SCALING_FACTOR

    def prepare_noise(self, latents, num_frames, height, width, context_frames, generator) -> torch.Tensor:
        """Unit Gaussian noise ``(1, 4, num_frames, h, w)`` float32: one ``context_frames`` block tiled along frames,
        as the original draws it; given ``latents`` with fewer frames are padded by repeating their last frame."""
        device = self._execution_device
        scale = self.vae_scale_factor
        shape = (1, self.unet.config.in_channels, context_frames, height // scale, width // scale)
        if latents is None:
            block = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
            return block.repeat(1, 1, -(-num_frames // context_frames), 1, 1)[:, :, :num_frames]
        latents = latents.to(device, torch.float32)
        if latents.shape[2] < num_frames:
            padding = latents[:, :, -1:].expand(-1, -1, num_frames - latents.shape[2], -1, -1)
            latents = torch.cat([latents, padding], dim=2)
        return latents[:, :, :num_frames]

    def prepare_latents(self, latents, num_frames, height, width, context_frames, generator):
        """Initial latents ``(1, 4, num_frames, h, w)`` float32: :meth:`prepare_noise` scaled by the scheduler's
        ``init_noise_sigma``."""
        noise = self.prepare_noise(latents, num_frames, height, width, context_frames, generator)
        return noise * self.scheduler.init_noise_sigma

    def apply_noise_prior(self, noise, reference_latents, timestep, strength: float) -> torch.Tensor:
        """The latent noise prior (MagicVideo-V2, UniAnimate): unit noise whose mean moves towards the reference
        latent ``z``, ``x = s * a * z + sqrt(1 - s**2 * a**2) * noise`` with ``s = strength`` and ``a`` the signal
        scale ``sqrt(alphas_cumprod[t])`` at the first timestep ``t`` of the run.

        ``s = 0`` is the plain noise (the original's start); ``s = 1`` is exactly the reference latent noised to the
        first timestep, ``q_sample(z, t)``, the distribution the sampler assumes there, with the reference's layout in
        its low frequencies; between them the variance stays that of the noise (for unit-variance latents), so the
        sampler's assumptions hold all the way. The result is scaled by ``init_noise_sigma`` like any start (for
        sigma-space samplers, Euler, that is ``z + sigma * noise`` at ``s = 1``)."""
        alphas = self.scheduler.alphas_cumprod.to(device=noise.device, dtype=torch.float32)
        signal = float(strength) * float(alphas[int(timestep)].sqrt())
        if reference_latents.ndim == 4:  # one reference for every frame; keyframes give (1, 4, F, h, w)
            reference_latents = reference_latents[:, :, None]
        prior = signal * reference_latents.float() + math.sqrt(1.0 - signal**2) * noise
        return prior * self.scheduler.init_noise_sigma

    def encode_video(self, video, num_frames: int, chunk_size: int) -> torch.Tensor:
        """Clean VAE latents ``(1, 4, num_frames, h, w)`` float32 of ``video`` (``(F, H, W, 3)``, uint8 or float in
        [0, 1], at the output size; shorter videos are padded with their last frame), encoded ``chunk_size`` frames
        per VAE call so that memory stays flat in the clip length (``latent_dist.mean``, as for the reference)."""
        video = torch.as_tensor(np.asarray(video))
        if video.dtype == torch.uint8:
            video = video.float() / 255
        latents = []
        for chunk in video.split(chunk_size):
            pixels = chunk.to(self._execution_device, self.vae.dtype).permute(0, 3, 1, 2) * 2 - 1
            latents.append(self.vae.encode(pixels).latent_dist.mean.float() * VAE_SCALING_FACTOR)
        latents = torch.cat(latents).transpose(0, 1)[None]  # (1, 4, F, h, w)
        if latents.shape[2] < num_frames:
            padding = latents[:, :, -1:].expand(-1, -1, num_frames - latents.shape[2], -1, -1)
            latents = torch.cat([latents, padding], dim=2)
        return latents[:, :, :num_frames]

    def start_timesteps(self, num_inference_steps: int, strength: float) -> torch.Tensor:
        """The timesteps this call runs: all of them, or for ``strength < 1`` (SDEdit, as diffusers' img2img
        pipelines) the last ``min(int(steps * strength), steps)`` of the schedule (none for ``strength = 0``)."""
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        if strength >= 1:
            return self.scheduler.timesteps
        start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
        order = getattr(self.scheduler, "order", 1)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start * order)
        return self.scheduler.timesteps[start * order :]

    def prepare_step_kwargs(self, generator, eta: float) -> dict:
        """``eta`` and ``generator`` for schedulers whose ``step`` takes them (DDIM does)."""
        parameters = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {"eta": eta} if "eta" in parameters else {}
        if "generator" in parameters:
            kwargs["generator"] = generator
        return kwargs

    # ------------------------------------------------------------------------------------------------ denoising

    def encode_appearance(self, reference_latents, t, text):
        """Run the appearance encoder once for this step; its fused layers' inputs become the reference bank.
        ``reference_latents``: ``(K, 4, h, w)``, one row per reference (keyframes: one bank each, in one call)."""
        self.reference_control.clear()
        latents = reference_latents.to(self.appearance_encoder.dtype)
        count = len(latents)
        # GroupNorm rejects one value per group, which a single row hits when the deepest level is 1x1 (tiny
        # sizes); a second identical row (as the original always runs) avoids it without changing the bank.
        if count == 1 and max(latents.shape[-2:]) <= 2 ** (len(self.appearance_encoder.down_blocks) - 1):
            latents = latents.repeat(2, 1, 1, 1)
        self.appearance_encoder(latents, t, encoder_hidden_states=text.expand(len(latents), -1, -1), return_dict=False)
        self.reference_control.load_reference(count)

    def encode_motion(
        self, latents, t, text, control, frames: slice, scale: float, depth: int | None = None
    ) -> list[torch.Tensor]:
        """ControlNet residuals (12 down + 1 mid) of a run of frames. Conditional text only, as in the original;
        the same residuals serve both guidance halves. ``depth``: only those of the first ``depth`` down blocks (a
        step that reuses cached deep features needs no more; see :mod:`..models.shallow_controlnet`)."""
        sample = self.scheduler.scale_model_input(latents[0][:, frames].transpose(0, 1), t)
        pixels = control[frames].to(self._execution_device, self.controlnet.dtype).permute(0, 3, 1, 2) / 255
        if depth is not None:
            text = text.expand(len(sample), -1, -1)
            return shallow_controlnet_residuals(
                self.controlnet, sample.to(self.controlnet.dtype), t, text, pixels, scale, depth
            )
        down, mid = self.controlnet(
            sample.to(self.controlnet.dtype),
            t,
            encoder_hidden_states=text.expand(len(sample), -1, -1),
            controlnet_cond=pixels,
            conditioning_scale=scale,
            return_dict=False,
        )
        return [*down, mid]

    def denoise_windows(
        self,
        latents,
        t,
        text,
        windows,
        residuals,
        branches,
        share_down_path: bool | None = None,
        cache: FeatureCache | None = None,
        reuse: bool = False,
        banks: list[int] | None = None,
    ) -> torch.Tensor:
        """One video-UNet call: the noise predicted for ``windows`` (lists of frame indices of ``latents``) at
        timestep ``t``, for each guidance branch in ``branches`` (``False``: unconditional, without the reference;
        ``True``: conditional, attending to the reference bank that :meth:`encode_appearance` loaded).

        ``residuals``: the ControlNet residuals (12 down + 1 mid) of the windows' frames in order (what
        :meth:`ControlResiduals.take` returns); both branches use them. Where :meth:`shares_down_path` allows it (and
        ``share_down_path``, default: the call's setting, is on) the down blocks run once for all branches. Returns
        ``(len(branches) * len(windows), C, F, h, w)`` float32, rows grouped by branch.

        With a ``cache`` (feature reuse across steps), a full call stores the windows' deep features in it and a
        ``reuse`` call runs only the outer blocks on the stored ones (``residuals``: those of the outer ControlNet
        blocks only, as :meth:`encode_motion` gives them with ``depth``). ``banks``: with several references
        loaded (keyframes), the reference of every frame of the clip, which conditional rows attend to.
        """
        index = torch.tensor(windows, device=latents.device)  # (windows, frames)
        sample = self.scheduler.scale_model_input(latents[0][:, index].transpose(0, 1), t).to(self.unet.dtype)
        share = self._share_down_path if share_down_path is None else share_down_path
        if share and self.shares_down_path(branches, [text] * len(branches)):
            mid_up_repeats = len(branches)  # one down path; the UNet repeats its result for the branches
        else:
            mid_up_repeats = 1
            sample = sample.repeat(len(branches), 1, 1, 1, 1)  # (rows, C, F, h, w)
            residuals = [residual.repeat(len(branches), 1, 1, 1) for residual in residuals]
        conditional = [branch for branch in branches for _ in windows]
        if banks is not None:
            # Rows are branch-major, then window, then frame, in the down path and in the mid and up blocks alike.
            row_banks = [banks[frame] for window in windows for frame in window] * len(branches)
            self.reference_control.set_conditional(conditional, banks=row_banks)
        else:
            self.reference_control.set_conditional(conditional)
        text = text.expand(sample.shape[0] * sample.shape[2], -1, -1)
        extra = {"down_block_additional_residuals": residuals[:-1], "mid_block_additional_residual": residuals[-1]}
        if cache is not None:
            extra["cache_depth"] = cache.depth
            if reuse:  # the outer blocks' residuals only, and the deep features kept from the last full step
                extra = {"down_block_additional_residuals": residuals, "cache_depth": cache.depth}
                extra["deep_features"] = cache.take(windows, branches, sample.device)
        out = self.unet(
            sample, t, encoder_hidden_states=text, return_dict=False, mid_up_repeats=mid_up_repeats, **extra
        )
        if cache is not None and not reuse:
            cache.store(windows, branches, out[1])
        return out[0].float()

    def shares_down_path(self, branches: list[bool], branch_texts: list[torch.Tensor]) -> bool:
        """Whether the guidance branches of a UNet call see the same down blocks, so one down path serves them all.

        The branches get the same latents and the same ControlNet residuals (computed once, with the conditional
        text, as the original does); what sets them apart is the reference attention of the conditional rows. So
        their down paths are one computation when: there are several branches (not with guidance off or a
        ``cfg_parallel`` rank's single branch); no reference layer lies in the down blocks (``fusion_blocks``
        ``"midup"``, not ``"full"``); and every branch has the same text embedding (``branch_texts``, one per branch:
        the pipeline encodes one prompt for both; a negative prompt that differs would change the down path).
        """
        if len(branches) < 2:
            return False
        if any(name.startswith("down_blocks.") for name in self.reference_control.readers):
            return False
        return all(text is branch_texts[0] for text in branch_texts[1:])

    def predict_noise(
        self,
        latents,
        t,
        text,
        control,
        work: WindowWork,
        guidance_scale: float,
        scale: float,
        step: int = 0,
        cache: FeatureCache | None = None,
        keyframes: KeyframePlan | None = None,
        reverse_work: WindowWork | None = None,
        reverse_cache: FeatureCache | None = None,
    ):
        """Guided noise prediction for the whole clip at timestep ``t``.

        This process denoises its share of the windows (``work.share``), ``work.batch_size`` per UNet call, with
        the ControlNet residuals of their frames; the window predictions are fused per frame and guided. In a
        process group one ``all_reduce`` first sums every rank's part. With a feature ``cache``, step ``step`` of the
        run either refreshes it (a full step) or reuses it (only the outer blocks of the UNet and the ControlNet run).

        With ``keyframes`` (see :mod:`.keyframes`) a second, time-reversed pass runs over ``reverse_work``'s windows,
        each pass attending per frame to its keyframe's reference bank, and the two guided estimates are blended per
        frame. The passes take their window batches in turn, both sweeping the clip from its start, so the ControlNet
        residuals (computed once for both) are freed as the sweep moves on.
        """
        passes = [(work, cache, keyframes.forward_banks if keyframes is not None else None)]
        if keyframes is not None:
            passes.append((reverse_work, reverse_cache, keyframes.reverse_banks))
        reuse = cache is not None and cache.reuses(step, work.branches)
        for _, pass_cache, _ in passes:
            if pass_cache is not None and not reuse:
                pass_cache.start_full_step(work.branches)
        depth = cache.depth if reuse else None
        encode = partial(self.encode_motion, latents, t, text, control, scale=scale, depth=depth)
        mine = [window for pass_work, _, _ in passes for window in pass_work.share.windows]
        residuals = ControlResiduals(encode, work.window_frames, mine)
        accumulators = [WindowAccumulator(w.windows, w.weights, w.branches, latents) for w, _, _ in passes]
        for batches in itertools.zip_longest(*(pass_work.batches() for pass_work, _, _ in passes)):
            for (pass_work, pass_cache, banks), fused, windows in zip(passes, accumulators, batches, strict=True):
                if windows is None:
                    continue
                branches = pass_work.share.branches
                noise = self.denoise_windows(
                    latents, t, text, windows, residuals.take(windows), branches,
                    cache=pass_cache, reuse=reuse, banks=banks,
                )  # fmt: skip
                fused.add(noise, windows, branches)
        if work.share.split:
            for fused in accumulators:
                all_reduce_sum(fused.sums)
        estimates = [fused.guided_noise(guidance_scale) for fused in accumulators]
        return estimates[0] if keyframes is None else keyframes.fuse(*estimates)

    def decode_latents(self, latents: torch.Tensor, decode_chunk_size: int, distributed: bool = False):
        """``(F, H, W, 3)`` float32 frames in [0, 1] on the CPU, decoded in chunks of ``decode_chunk_size`` frames
        (chunk k: frames ``k*c .. (k+1)*c - 1``); each chunk leaves the accelerator at once, so its memory does not
        grow with the clip length. In a process group the ranks share the chunks: the same chunks as in one process,
        so the same bits.

        Every chunk goes straight into one clip tensor in the output layout, so the clip is held once: not as a list
        of chunks, then their concatenation, then ``VaeImageProcessor.postprocess``'s denormalised copies."""
        frames = latents[0].transpose(0, 1) / VAE_SCALING_FACTOR
        chunks = list(frames.split(decode_chunk_size))
        h, w = (side * self.vae_scale_factor for side in frames.shape[2:])
        empty = torch.empty((0, h, w, self.vae.config.out_channels))
        if distributed:
            return map_shared(self.decode_frames, chunks, empty)
        video = empty.new_empty((len(frames), *empty.shape[1:]))
        for k, chunk in enumerate(chunks):
            video[k * decode_chunk_size : k * decode_chunk_size + len(chunk)] = self.decode_frames(chunk)
        return video

    def decode_frames(self, latents: torch.Tensor) -> torch.Tensor:
        """One VAE call: ``(frames, 4, h, w)`` latents (divided by the scaling factor) to ``(frames, H, W, 3)``
        float32 frames in [0, 1] (``x / 2 + 0.5``, clamped: the same float32 operations as
        ``VaeImageProcessor.postprocess``), on the CPU. Computed in place where the VAE ran, on its output."""
        images = self.vae.decode(latents.to(self.vae.dtype)).sample.float()
        return images.mul_(0.5).add_(0.5).clamp_(0, 1).permute(0, 2, 3, 1).cpu()

    def output_frames(self, frames: torch.Tensor, output_type: str):
        """``frames`` from :meth:`decode_latents` as ``output_type``: ``"np"`` the ``(F, H, W, 3)`` array (sharing
        the tensor's memory, no copy), ``"pt"`` a ``(F, 3, H, W)`` view of it, ``"pil"`` a list of images."""
        if output_type == "pt":
            return frames.permute(0, 3, 1, 2)
        array = frames.numpy()
        return self.image_processor.numpy_to_pil(array) if output_type == "pil" else array

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` (e.g. in ``callback_on_step_end``) to stop denoising after this step; the
        call then decodes and returns the latents as they are. In a process group every rank must set it at the
        same step."""
        return self._interrupt

    @torch.no_grad()
    def __call__(
        self,
        reference_image,
        motion,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        guidance_start: float = 0.0,
        guidance_end: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        context_frames: int = 16,
        context_overlap: int = 4,
        context_schedule: str = "uniform",
        context_batch_size: int = 1,
        controlnet_conditioning_scale: float = 1.0,
        eta: float = 0.0,
        prompt: str = "",
        decode_chunk_size: int = 4,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[["MagicAnimatePipeline", int, int, dict], dict] | None = None,
        distributed: bool = False,
        cfg_parallel: bool = False,
        share_down_path: bool = True,
        noise_prior: float = 0.0,
        init_video=None,
        strength: float = 1.0,
        cache_interval: int = 1,
        cache_device: str | torch.device | None = None,
        reference_end=None,
        keyframes=None,
        keyframe_blend: str = "linear",
    ) -> MagicAnimatePipelineOutput | tuple:
        """Animate ``reference_image`` (PIL image, HxWx3 uint8 array or path) following ``motion`` (DensePose frames:
        FxHxWx3 uint8 array, list of images, or a video path).

        Args:
            num_inference_steps: denoising steps (the original: 25).
            guidance_scale: reference guidance; the unconditional branch differs only by not seeing the reference.
                ``<= 1`` skips it (one UNet pass per window).
            guidance_start, guidance_end: classifier-free guidance only on the steps whose index fraction
                ``i / steps`` lies in ``[guidance_start, guidance_end)``; the other steps run the conditional branch
                alone (no unconditional rows: about half the UNet work of a step). The defaults (0, 1) guide every
                step, as the original does; e.g. ``guidance_end=0.6`` drops guidance from the late, detail steps.
            height, width: output size; defaults to the motion frames' size (rounded down to a multiple of 8). The
                reference and, if needed, the motion frames are resized to it.
            generator, latents: noise control as in diffusers; ``latents`` is ``(1, 4, F, H/8, W/8)``.
            context_frames, context_overlap, context_schedule: the sliding window (16, 4, ``"uniform"`` = the
                original's wrap-around schedule; ``"sliding"`` never wraps; see ``CONTEXT_SCHEDULES``). The clip is
                padded to a multiple of ``context_frames`` by repeating its last frame; the output is cropped back.
            context_batch_size: windows per UNet call (more is faster on a large GPU, same result).
            controlnet_conditioning_scale: strength of the DensePose ControlNet (1.0).
            eta: DDIM eta (0: deterministic).
            decode_chunk_size: frames per VAE decode call. The decoder's full-resolution activations, in proportion
                to it, are the largest tensors of a call: fewer frames use less memory (on GPUs, a little slower).
            output_type: ``"np"`` (``(F, H, W, 3)`` float32), ``"pt"`` (``(F, 3, H, W)``), ``"pil"`` or ``"latent"``.
            callback_on_step_end: ``fn(pipe, step, timestep, {"latents": ...})`` after every step; may return a
                dict with replacement ``latents``, or set ``pipe._interrupt = True`` to stop (see :attr:`interrupt`).
            distributed: inside an initialised ``torch.distributed`` process group, split the windows, their
                ControlNet frames and the decode chunks across ranks; every rank returns the whole video.
            cfg_parallel: with ``distributed`` and guidance, run the unconditional and conditional branches on
                different ranks (needs an even number of ranks).
            share_down_path: run the video UNet's down blocks once per window for both guidance branches where they
                see the same input (``fusion_blocks="midup"``, one prompt; see :meth:`shares_down_path`): the same
                result up to float rounding, about a sixth less UNet work. Off: the original's two full passes.
            noise_prior: 0 to 1: move the initial noise towards the reference image's latent (see
                :meth:`apply_noise_prior`); 0 is the original's start.
            init_video, strength: SDEdit (the refine pass): with ``strength < 1``, start from ``init_video``
                (``(F, H, W, 3)`` uint8 or float in [0, 1] at the output size) noised to the timestep ``strength``
                gives and run only the remaining steps (``int(steps * strength)`` of them; none for 0, which
                returns the VAE round trip of ``init_video``). ``strength = 1`` starts from noise as usual.
            cache_interval: feature reuse across steps (DeepCache; see :mod:`.feature_cache`): the whole video UNet
                every ``cache_interval`` steps, in between only its outermost down and up blocks (and the
                ControlNet's outermost blocks) on the deep features kept per window and branch. 1: off. The kept
                features cost memory in proportion to the windows (at 512x512 in float16 about 84 MB per window and
                branch); ``cache_device="cpu"`` keeps them on the CPU instead (``low_vram`` does).
            reference_end, keyframes, keyframe_blend: keyframes (see :mod:`.keyframes`): ``reference_end`` is the
                photo the clip ends at (its last frame); ``keyframes`` a list of ``(frame, photo)`` pairs (frames of
                the motion, from 0), with ``reference_image`` (if given) the keyframe at frame 0. Every step blends a
                forward estimate and a time-reversed one, each attending to its keyframe (about twice the UNet work
                of a step); ``keyframe_blend`` (``"linear"`` or ``"smooth"``) shapes the blend between keyframes.
        """
        # 1. Check the inputs before any model runs. The motion frames define the clip length and (by default) the
        # size; the clip is padded to whole windows by repeating its last frame.
        frames = self.load_motion(motion)
        self.check_inputs(
            frames,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            latents,
            context_frames,
            context_overlap,
            context_schedule,
            context_batch_size,
            controlnet_conditioning_scale,
            decode_chunk_size,
            output_type,
            distributed,
            cfg_parallel,
        )
        check_guidance_interval(guidance_start, guidance_end)
        height, width = self.output_size(frames, height, width)
        check_start(noise_prior, init_video, strength, len(frames), (height, width))
        if not _is_int(cache_interval) or cache_interval < 1:
            raise InputError(f"cache_interval must be a positive integer (1: off), got {cache_interval!r}")
        num_frames = len(frames)
        padded_frames = -(-num_frames // context_frames) * context_frames
        windows = context_windows(padded_frames, context_frames, context_overlap, context_schedule)
        weights = fusion_weights(min(context_frames, padded_frames), context_schedule)
        work = WindowWork.plan(windows, weights, guidance_scale, context_batch_size, distributed, cfg_parallel)
        # The steps outside the guidance interval: the conditional branch alone (guidance scale 1).
        conditional_work = WindowWork.plan(windows, weights, 1.0, context_batch_size, distributed, cfg_parallel)
        pairs = [] if reference_image is None else [(0, reference_image)]
        pairs += list(keyframes or [])
        if reference_end is not None:
            pairs.append((num_frames - 1, reference_end))
        if not pairs:
            raise InputError("no reference image: pass reference_image (or keyframes)")
        pairs = check_keyframes(pairs, num_frames)
        keyframe_plan = reverse_work = reverse_conditional_work = None
        if len(pairs) > 1:  # a second, time-reversed pass whose windows sweep the clip from its start too
            keyframe_plan = KeyframePlan.plan([frame for frame, _ in pairs], padded_frames, keyframe_blend)
            backwards = reversed_windows(windows, padded_frames)[::-1]
            plan = partial(WindowWork.plan, backwards, weights, batch_size=context_batch_size, distributed=distributed)
            reverse_work = plan(guidance_scale=guidance_scale, cfg_parallel=cfg_parallel)
            reverse_conditional_work = plan(guidance_scale=1.0, cfg_parallel=cfg_parallel)
        references = [np.asarray(load_image(image).resize((width, height), PIL.Image.BICUBIC)) for _, image in pairs]
        frames = self.resize_frames(frames, height, width)
        frames = np.concatenate([frames, np.repeat(frames[-1:], padded_frames - num_frames, axis=0)])
        control = torch.from_numpy(frames)  # stays uint8 on the CPU; each ControlNet chunk moves what it needs

        self._interrupt = False
        self._share_down_path = bool(share_down_path)
        # Re-installing the reference processors keeps this pipeline working when another one was built from the
        # same models. Whatever happens below, the reference state is cleared and offloaded models are freed.
        self.reference_control.install()
        try:
            # 2. Conditioning that does not change over the steps.
            text = self.encode_prompt(prompt)
            reference_latents = torch.cat([self.encode_reference(reference) for reference in references])

            # 3. Timesteps and the start: noise (moved towards the reference latent by the noise prior), or for a
            # refine pass the given video's latents noised part-way (SDEdit).
            refine = init_video is not None and strength < 1
            timesteps = self.start_timesteps(num_inference_steps, strength if refine else 1.0)
            noise = self.prepare_noise(latents, padded_frames, height, width, context_frames, generator)
            if refine:
                latents = self.encode_video(init_video, padded_frames, decode_chunk_size)
                if len(timesteps):
                    latents = self.scheduler.add_noise(latents, noise, timesteps[:1])
            elif noise_prior > 0:
                prior = reference_latents if keyframe_plan is None else keyframe_plan.per_frame(reference_latents)
                latents = self.apply_noise_prior(noise, prior, timesteps[0], noise_prior)
            else:
                latents = noise * self.scheduler.init_noise_sigma
            del noise
            step_kwargs = self.prepare_step_kwargs(generator, eta)
            cache = FeatureCache(cache_interval, device=cache_device) if cache_interval > 1 else None
            reverse_cache = FeatureCache(cache_interval, device=cache_device) if cache_interval > 1 else None

            # 4. Denoising loop.
            with self.progress_bar(total=len(timesteps)) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        break
                    self.encode_appearance(reference_latents, t, text)
                    guided = guidance_start <= i / len(timesteps) < guidance_end
                    noise = self.predict_noise(
                        latents,
                        t,
                        text,
                        control,
                        work if guided else conditional_work,
                        guidance_scale,
                        controlnet_conditioning_scale,
                        step=i,
                        cache=cache,
                        keyframes=keyframe_plan,
                        reverse_work=reverse_work if guided else reverse_conditional_work,
                        reverse_cache=reverse_cache,
                    )
                    latents = self.scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
                    if not bool(torch.isfinite(latents).all()):
                        raise ResourceError(
                            f"the latents became NaN/inf at denoising step {i + 1} of {len(timesteps)}; float16 "
                            "overflow is the usual cause: run in dtype bfloat16 or float32"
                        )
                    if callback_on_step_end is not None:
                        latents = (callback_on_step_end(self, i, t, {"latents": latents}) or {}).get("latents", latents)
                    progress_bar.update()
            self.reference_control.clear()  # the reference bank is not needed for the decode
            cache = reverse_cache = None  # nor the cached features

            # 5. Crop the padding off and decode (in a process group, each rank its share of the chunks).
            latents = latents[:, :, :num_frames]
            if output_type == "latent":
                video = latents
            else:
                decoded = self.decode_latents(latents, decode_chunk_size, distributed=work.share.split)
                video = self.output_frames(decoded, output_type)
        finally:
            self.reference_control.clear()
            self.maybe_free_model_hooks()
        return MagicAnimatePipelineOutput(frames=video) if return_dict else (video,)


def check_start(noise_prior, init_video, strength, num_frames: int, size: tuple[int, int]) -> None:
    """``noise_prior`` and ``strength`` in [0, 1]; with ``strength < 1`` an ``init_video`` of ``(frames, H, W, 3)``
    at the output ``size``, at most ``num_frames`` frames; or :class:`InputError`."""
    for name, value in (("noise_prior", noise_prior), ("strength", strength)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value <= 1:
            raise InputError(f"{name} must be a number from 0 to 1, got {value!r}")
    if strength < 1:
        if init_video is None:
            raise InputError("strength below 1 re-noises a video part-way: pass it as init_video")
        shape = tuple(np.shape(init_video))
        if len(shape) != 4 or shape[-1] != 3 or shape[1:3] != tuple(size) or not 0 < shape[0] <= num_frames:
            raise InputError(
                f"init_video must be (F, {size[0]}, {size[1]}, 3) frames at the output size with at most "
                f"{num_frames} frames, got shape {shape}"
            )


def check_guidance_interval(start, end) -> None:
    """``[start, end)``: fractions of the schedule with ``0 <= start <= end <= 1``, or :class:`InputError`."""
    for name, value in (("guidance_start", start), ("guidance_end", end)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value <= 1:
            raise InputError(f"{name} must be a number from 0 to 1 (a fraction of the steps), got {value!r}")
    if start > end:
        raise InputError(f"guidance_start ({start:g}) must not be above guidance_end ({end:g})")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
