"""The MagicAnimate denoising algorithm as a diffusers pipeline.

Per denoising step: the appearance encoder encodes the reference image at the current timestep (its self-attention
inputs are the "reference bank"); the DensePose ControlNet encodes every motion frame; the video UNet denoises the
clip in overlapping windows, its conditional rows attending to the reference bank; window predictions are averaged
per frame, classifier-free guidance is applied, and the scheduler takes a step.
"""

import inspect
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, DiffusionPipeline
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from ..distributed import all_reduce_sum, gather_frames, rank_and_world, share
from ..errors import CheckpointError, InputError, ResourceError
from ..io import load_image, read_video
from ..models.original_checkpoints import load_appearance_encoder, load_video_unet
from ..models.reference_attention import ReferenceAttentionControl
from ..models.video_unet import VideoUNet
from ..weights import EXPECTED_TREE
from .context_windows import WindowWork, context_windows, fusion_weights

VAE_SCALING_FACTOR = 0.18215  # hard-coded by the original, equal to sd-vae-ft-mse's config


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


def _prefer_safetensors(path: Path) -> Path:
    """``path`` with a ``.safetensors`` suffix when such a converted copy sits beside it."""
    converted = path.with_suffix(".safetensors")
    return converted if converted.is_file() else path


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
        fusion_blocks: str = "midup",
        torch_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> "MagicAnimatePipeline":
        """Load the original release tree, or a folder written by :meth:`save_pretrained`.

        The release tree (``root``) holds ``stable-diffusion-v1-5/``, ``sd-vae-ft-mse/`` and ``MagicAnimate/``
        (``appearance_encoder/``, ``densepose_controlnet/``, ``temporal_attention/temporal_attention.ckpt``). Any
        piece can be given on its own with the original config's key names. ``motion_only=True`` takes only the
        motion modules from ``temporal_attention.ckpt``, keeping SD 1.5's (or a fine-tune's) spatial weights.
        """
        root = Path(pretrained_model_name_or_path)
        if (root / "model_index.json").is_file():
            return super().from_pretrained(root, torch_dtype=torch_dtype, **kwargs)
        sd = Path(pretrained_model_path or root / "stable-diffusion-v1-5")
        vae_path = Path(pretrained_vae_path or root / "sd-vae-ft-mse")
        appearance_path = Path(pretrained_appearance_encoder_path or root / "MagicAnimate" / "appearance_encoder")
        controlnet_path = Path(pretrained_controlnet_path or root / "MagicAnimate" / "densepose_controlnet")
        default_motion = root / "MagicAnimate" / "temporal_attention" / "temporal_attention.ckpt"
        motion_path = Path(motion_module or _prefer_safetensors(default_motion))
        folders = (sd / "unet", sd / "text_encoder", sd / "tokenizer", vae_path, appearance_path, controlnet_path)
        missing = [str(p) for p in folders if not p.is_dir()] + ([] if motion_path.is_file() else [str(motion_path)])
        if missing:
            raise CheckpointError(
                f"incomplete checkpoint tree, missing {', '.join(missing)}; {EXPECTED_TREE.format(root=root)}; run "
                f"'magicanimate download --to {root}' or see pretrained/README.md"
            )
        try:
            pipe = cls(
                vae=AutoencoderKL.from_pretrained(vae_path),
                text_encoder=CLIPTextModel.from_pretrained(sd / "text_encoder"),
                tokenizer=CLIPTokenizer.from_pretrained(sd / "tokenizer"),
                unet=load_video_unet(sd / "unet", motion_path, motion_only=motion_only),
                appearance_encoder=load_appearance_encoder(appearance_path),
                controlnet=ControlNetModel.from_pretrained(controlnet_path),
                scheduler=magicanimate_scheduler(),
                fusion_blocks=fusion_blocks,
            )
        except (OSError, ValueError, RuntimeError) as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"cannot load the checkpoints under {root}: {message}") from err
        if torch_dtype is not None:
            # torch's own .to: diffusers' ModelMixin.to warns about fp32 modules even when a model has none.
            for component in pipe.components.values():
                if isinstance(component, torch.nn.Module):
                    torch.nn.Module.to(component, dtype=torch_dtype)
        return pipe

    # ------------------------------------------------------------------------------------------------ inputs

    @staticmethod
    def load_motion(motion) -> np.ndarray:
        """DensePose frames as ``(F, H, W, 3)`` uint8 RGB from an array, a list of images, or a video path."""
        if isinstance(motion, (str, Path)):
            motion, _ = read_video(motion)
        elif isinstance(motion, (list, tuple)):
            motion = np.stack([np.asarray(load_image(frame)) for frame in motion]) if motion else np.zeros((0,))
        motion = np.asarray(motion)
        if motion.ndim != 4 or motion.shape[-1] != 3 or len(motion) == 0:
            raise InputError(f"motion must be F x H x W x 3 frames, got shape {motion.shape}")
        if motion.dtype != np.uint8:
            raise InputError(f"motion frames must be uint8 RGB, got {motion.dtype}")
        return motion

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
        return self.text_encoder(ids.to(self.device))[0]

    def encode_reference(self, image: np.ndarray) -> torch.Tensor:
        """Clean VAE latent of the reference image (``latent_dist.mean``, not a sample), as the original does."""
        pixels = torch.from_numpy(image[None].copy()).to(self.device, self.vae.dtype) / 127.5 - 1
        latent = self.vae.encode(pixels.permute(0, 3, 1, 2)).latent_dist.mean
        return latent * VAE_SCALING_FACTOR

    def prepare_latents(self, latents, num_frames, height, width, context_frames, generator):
        """Initial noise ``(1, 4, num_frames, h, w)`` float32: one ``context_frames`` block tiled along frames, as
        the original draws it; given ``latents`` with fewer frames are padded by repeating their last frame."""
        shape = (1, self.unet.config.in_channels, context_frames, height // 8, width // 8)
        if latents is None:
            block = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
            latents = block.repeat(1, 1, -(-num_frames // context_frames), 1, 1)[:, :, :num_frames]
            return latents * self.scheduler.init_noise_sigma
        latents = latents.to(self.device, torch.float32)
        if latents.shape[0] != 1 or latents.shape[1] != shape[1] or latents.shape[3:] != shape[3:]:
            raise InputError(
                f"latents must have shape (1, {shape[1]}, F, {shape[3]}, {shape[4]}), got {tuple(latents.shape)}"
            )
        if latents.shape[2] < num_frames:
            padding = latents[:, :, -1:].expand(-1, -1, num_frames - latents.shape[2], -1, -1)
            latents = torch.cat([latents, padding], dim=2)
        return latents[:, :, :num_frames] * self.scheduler.init_noise_sigma

    # ------------------------------------------------------------------------------------------------ denoising

    def encode_appearance(self, reference_latents, t, text):
        """Run the appearance encoder once for this step; its fused layers' inputs become the reference bank."""
        self.reference_control.clear()
        latents = reference_latents.to(self.appearance_encoder.dtype)
        # GroupNorm rejects one value per group, which a single row hits when the deepest level is 1x1 (tiny
        # sizes); a second identical row (as the original always runs) avoids it without changing the bank.
        if max(latents.shape[-2:]) <= 2 ** (len(self.appearance_encoder.down_blocks) - 1):
            latents = latents.repeat(2, 1, 1, 1)
        self.appearance_encoder(latents, t, encoder_hidden_states=text.expand(len(latents), -1, -1), return_dict=False)
        self.reference_control.load_reference()

    def encode_motion(self, latents, t, text, control, frames: slice, scale: float) -> list[torch.Tensor]:
        """ControlNet residuals (12 down + 1 mid) of a run of frames. Conditional text only, as in the original;
        the same residuals serve both guidance halves."""
        sample = self.scheduler.scale_model_input(latents[0][:, frames].transpose(0, 1), t)
        down, mid = self.controlnet(
            sample.to(self.controlnet.dtype),
            t,
            encoder_hidden_states=text.expand(len(sample), -1, -1),
            controlnet_cond=control[frames].to(self.device, self.controlnet.dtype).permute(0, 3, 1, 2) / 255,
            conditioning_scale=scale,
            return_dict=False,
        )
        return [*down, mid]

    def predict_noise(self, latents, t, text, control, work: "WindowWork", guidance_scale: float, scale: float):
        """Guided noise prediction for the whole clip.

        Window predictions are summed in float32 with per-position weights and divided by the summed weights (the
        original's plain mean when all weights are 1), then classifier-free guidance is applied. ControlNet
        residuals are computed for the frames of each window batch when first needed and dropped after their last
        window, so memory does not grow with the clip length and no frame is encoded twice. They are computed in
        the original's fixed ``context_frames`` chunks, so every frame's residuals are the same floats however the
        windows are batched or split. In a process group each rank computes its share (``work``) and one
        ``all_reduce`` sums the predictions.
        """
        total = torch.zeros((len(work.branches), *latents.shape[1:]), dtype=torch.float32, device=self.device)
        weights = torch.tensor(work.weights, dtype=torch.float32, device=self.device)[:, None, None]
        count = torch.zeros((1, 1, latents.shape[2], 1, 1), dtype=torch.float32, device=self.device)
        for window in work.windows:
            count[:, :, window] += weights
        size = work.control_chunk
        uses_left = Counter(frame // size for window in work.mine for frame in window)
        residuals: dict[int, list[torch.Tensor]] = {}  # chunk index -> residuals of its frames
        rows = len(work.my_branches)
        for first in range(0, len(work.mine), work.batch_size):
            batch = work.mine[first : first + work.batch_size]
            frames = [frame for window in batch for frame in window]
            for chunk in sorted({frame // size for frame in frames} - residuals.keys()):
                run = slice(chunk * size, (chunk + 1) * size)
                residuals[chunk] = self.encode_motion(latents, t, text, control, run, scale)
            stacked = [
                torch.stack([residuals[frame // size][i][frame % size] for frame in frames]).repeat(rows, 1, 1, 1)
                for i in range(len(residuals[frames[0] // size]))
            ]

            index = torch.tensor(batch, device=self.device)  # (windows, frames)
            sample = latents[0][:, index].transpose(0, 1).repeat(rows, 1, 1, 1, 1)  # (rows*windows, C, F, h, w)
            # Rows are grouped by branch ([unconditional ; conditional]); only conditional rows see the reference.
            self.reference_control.set_conditional(torch.tensor(work.my_branches).repeat_interleave(len(batch)))
            pred = self.unet(
                self.scheduler.scale_model_input(sample, t).to(self.unet.dtype),
                t,
                encoder_hidden_states=text.expand(sample.shape[0] * sample.shape[2], -1, -1),
                down_block_additional_residuals=stacked[:-1],
                mid_block_additional_residual=stacked[-1],
                return_dict=False,
            )[0].float()
            for row, branch in enumerate(work.my_branches):
                for w, window in enumerate(batch):
                    total[work.branches.index(branch), :, window] += pred[row * len(batch) + w] * weights
            for frame in frames:
                uses_left[frame // size] -= 1
                if uses_left[frame // size] == 0:
                    del residuals[frame // size]
        if work.distributed:
            all_reduce_sum(total)
        noise = total / count
        if len(work.branches) == 2:
            uncond, cond = noise.chunk(2)
            return uncond + guidance_scale * (cond - uncond)
        return noise

    def decode_latents(self, latents: torch.Tensor, decode_chunk_size: int) -> torch.Tensor:
        """``(F, 3, H, W)`` float32 in [0, 1] on the CPU, decoded ``decode_chunk_size`` frames at a time; each chunk
        leaves the accelerator at once, so its memory does not grow with the clip length."""
        frames = latents[0].transpose(0, 1) / VAE_SCALING_FACTOR
        images = [
            (self.vae.decode(chunk.to(self.vae.dtype)).sample.float() / 2 + 0.5).clamp(0, 1).cpu()
            for chunk in frames.split(decode_chunk_size)
        ]
        return torch.cat(images)

    @torch.no_grad()
    def __call__(
        self,
        reference_image,
        motion,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
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
        decode_chunk_size: int = 16,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[["MagicAnimatePipeline", int, int, dict], dict] | None = None,
        distributed: bool = False,
        cfg_parallel: bool = False,
    ) -> MagicAnimatePipelineOutput | tuple:
        """Animate ``reference_image`` (PIL image, HxWx3 uint8 array or path) following ``motion`` (DensePose frames:
        FxHxWx3 uint8 array, list of images, or a video path).

        Args:
            num_inference_steps: denoising steps (the original: 25).
            guidance_scale: reference guidance; the unconditional branch differs only by not seeing the reference.
                ``<= 1`` skips it (one UNet pass per window).
            height, width: output size; defaults to the motion frames' size (rounded down to a multiple of 8). The
                reference and, if needed, the motion frames are resized to it.
            generator, latents: noise control as in diffusers; ``latents`` is ``(1, 4, F, H/8, W/8)``.
            context_frames, context_overlap, context_schedule: the sliding window (16, 4, ``"uniform"`` = the
                original's wrap-around schedule; ``"sliding"`` never wraps). The clip is padded to a multiple of
                ``context_frames`` by repeating its last frame; the output is cropped back.
            context_batch_size: windows per UNet call (more is faster on a large GPU, same result).
            controlnet_conditioning_scale: strength of the DensePose ControlNet (1.0).
            eta: DDIM eta (0: deterministic).
            decode_chunk_size: frames per VAE decode call.
            output_type: ``"np"`` (``(F, H, W, 3)`` float32), ``"pt"``, ``"pil"`` or ``"latent"``.
            callback_on_step_end: ``fn(pipe, step, timestep, {"latents": ...})`` after every step; may return a
                dict with replacement ``latents``.
            distributed: inside an initialised ``torch.distributed`` process group, split the windows, their
                ControlNet frames and the decoded frames across ranks; every rank returns the whole video.
            cfg_parallel: with ``distributed`` and guidance, run the unconditional and conditional branches on
                different ranks (needs an even number of ranks).
        """
        # 1. Inputs: motion frames define the clip length and (by default) the size.
        frames = self.load_motion(motion)
        num_frames = len(frames)
        height = (height or frames.shape[1]) // 8 * 8
        width = (width or frames.shape[2]) // 8 * 8
        if height < 8 or width < 8:
            raise InputError(f"output size {width}x{height} is too small; it must be at least 8x8")
        frames = self.resize_frames(frames, height, width)
        reference = np.asarray(load_image(reference_image).resize((width, height), PIL.Image.BICUBIC))
        padded_frames = -(-num_frames // context_frames) * context_frames
        frames = np.concatenate([frames, np.repeat(frames[-1:], padded_frames - num_frames, axis=0)])
        control = torch.from_numpy(frames)  # stays uint8 on the CPU; each ControlNet chunk moves what it needs

        # 2. Conditioning that does not change over the steps. (Re-installing the reference processors keeps this
        # pipeline working when another one was built from the same models.)
        self.reference_control.install()
        text = self.encode_prompt(prompt)
        reference_latents = self.encode_reference(reference)
        work = WindowWork.plan(
            context_windows(padded_frames, context_frames, context_overlap, context_schedule),
            fusion_weights(min(context_frames, padded_frames), context_schedule),
            guidance_scale,
            context_batch_size,
            distributed,
            cfg_parallel,
        )

        # 3. Noise and timesteps.
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        latents = self.prepare_latents(latents, padded_frames, height, width, context_frames, generator)
        step_kwargs = {}
        step_parameters = set(inspect.signature(self.scheduler.step).parameters)
        if "eta" in step_parameters:
            step_kwargs["eta"] = eta
        if "generator" in step_parameters:
            step_kwargs["generator"] = generator

        # 4. Denoising loop.
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            self.encode_appearance(reference_latents, t, text)
            noise = self.predict_noise(latents, t, text, control, work, guidance_scale, controlnet_conditioning_scale)
            latents = self.scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
            if not bool(torch.isfinite(latents).all()):
                raise ResourceError(
                    f"the latents became NaN/inf at denoising step {i + 1} of {len(self.scheduler.timesteps)}; "
                    "float16 overflow is the usual cause: try --dtype bfloat16 or --dtype float32"
                )
            if callback_on_step_end is not None:
                latents = (callback_on_step_end(self, i, t, {"latents": latents}) or {}).get("latents", latents)
        self.reference_control.clear()

        # 5. Decode (each rank its share of the frames in a process group), crop the padding off.
        latents = latents[:, :, :num_frames]
        if output_type == "latent":
            video = latents
        elif work.distributed:
            rank, world = rank_and_world()
            mine = share(list(range(num_frames)), world, rank)
            decoded = self.decode_latents(latents[:, :, mine], decode_chunk_size).to(self.device)
            video = gather_frames(decoded, num_frames).cpu()
        else:
            video = self.decode_latents(latents, decode_chunk_size)
        if output_type != "latent":
            if output_type == "np":
                video = video.permute(0, 2, 3, 1).cpu().numpy()
            elif output_type == "pil":
                video = [PIL.Image.fromarray(f) for f in (video.permute(0, 2, 3, 1) * 255).round().byte().cpu().numpy()]
            elif output_type != "pt":
                raise InputError(f"output_type must be 'np', 'pt', 'pil' or 'latent', got {output_type!r}")
        self.maybe_free_model_hooks()
        return MagicAnimatePipelineOutput(frames=video) if return_dict else (video,)
