"""Cached VAE latents of a clip: ``latents.safetensors`` next to its ``frames.mp4`` (or ``image.png``).

Training encodes every target frame with the VAE encoder at every step, and samples the latent distribution
(``latent_dist.sample``). The encoder's output does not change while the UNet trains, so ``prepare-data
--cache-latents`` computes it once: for every frame of the clip, the mean and standard deviation of the latent
distribution (unscaled, before the 0.18215 factor), in float16 (half the disk; the rounding, relative 2**-11, is
far below what the noise at any timestep adds). With ``cached_latents`` on, training samples ``mean + std * noise``
with exactly the draws ``latent_dist.sample(generator)`` makes (see
:meth:`~magicanimate.training.model.TrainingModel.sample_cached`) instead of running the encoder.

The frames encoded are those of the written ``frames.mp4`` as decoded (H.264 and all), the very pixels training
reads without the cache, at the clip's size: latents of the whole frame, so a run with cached latents takes no
random crop or flip and trains at the clip's size. Frames are decoded and encoded :data:`ENCODE_CHUNK` at a time into
the two float16 arrays (64 KiB per frame at 512 px, about 94 MiB per minute of clip), which the safetensors
library then writes.

File: two float16 tensors ``mean`` and ``std`` of shape ``(F, 4, size/8, size/8)``; its metadata names the VAE
(``vae``: the folder, ``vae_fingerprint``: a hash of its weights, so that training can refuse latents of another
VAE), ``frames`` and ``size``.
"""

import hashlib
import os
from pathlib import Path

import numpy as np
import safetensors.numpy

from ..errors import CheckpointError, InputError

LATENTS_FILE = "latents.safetensors"
ENCODE_CHUNK = 4  # frames per VAE encode call (as training encodes them)
STORAGE = "float16"


def vae_folder(pretrained: str | Path) -> Path:
    """The VAE folder of ``pretrained``: a release tree (``sd-vae-ft-mse/``), a converted folder (``vae/``), or a
    VAE folder itself (``config.json``)."""
    root = Path(pretrained)
    if not root.is_dir():
        raise InputError(f"pretrained tree not found: {root}")
    if (root / "model_index.json").is_file():
        return root / "vae"
    if (root / "sd-vae-ft-mse").is_dir():
        return root / "sd-vae-ft-mse"
    if (root / "config.json").is_file():
        return root
    raise CheckpointError(
        f"no VAE in {root}: expected the release tree (sd-vae-ft-mse/), a converted folder (model_index.json, vae/) "
        "or a VAE folder (config.json)"
    )


def vae_fingerprint(vae) -> str:
    """A hash of the VAE's weights (as float32, by name): the same VAE gives the same fingerprint whatever folder
    or file format it was read from, and whatever dtype it was cast to afterwards is not part of it."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class LatentEncoder:
    """The VAE of a pretrained tree, float32 on ``device``, that writes a clip's ``latents.safetensors``.

    Attributes: ``vae``, ``device``, ``source`` (the VAE folder), ``fingerprint`` (:func:`vae_fingerprint`).
    """

    def __init__(self, vae, device, source: str, progress: bool = False):
        self.vae, self.device, self.source, self.progress = vae, device, source, progress
        self.fingerprint = vae_fingerprint(vae)

    @classmethod
    def load(cls, pretrained: str | Path, device: str = "auto", progress: bool = False) -> "LatentEncoder":
        """Only the VAE of ``pretrained`` (see :func:`vae_folder`), loaded as the pipeline loads it.

        Raises:
            InputError: no such folder, or the device is not available. CheckpointError: no usable VAE there.
        """
        from diffusers import AutoencoderKL

        from ..devices import resolve_device
        from ..loading import quiet_loading
        from ..models.original_checkpoints import load_diffusers_model, materialize_weights

        folder = vae_folder(pretrained)
        torch_device = resolve_device(device)[0]
        with quiet_loading():
            vae = load_diffusers_model(AutoencoderKL, folder, "VAE")
        import torch

        vae = materialize_weights(vae, torch.float32).to(torch_device).eval()  # the pipeline's memory layout
        vae.requires_grad_(False)
        return cls(vae, torch_device, str(folder.resolve()), progress)

    def record(self) -> dict:
        """What ``meta.json`` says of the latents."""
        return {"file": LATENTS_FILE, "vae": self.source, "vae_fingerprint": self.fingerprint, "dtype": STORAGE}

    def encode(self, frames):
        """``(mean, std)`` float16 ``(n, 4, h, w)`` numpy arrays of uint8 RGB frames ``(n, H, W, 3)``: the latent
        distribution of the pixels scaled as training scales them (``x / 127.5 - 1``)."""
        import torch

        with torch.no_grad():
            pixels = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device, torch.float32)
            dist = self.vae.encode(pixels.permute(0, 3, 1, 2) / 127.5 - 1).latent_dist
            return dist.mean.to("cpu", torch.float16).numpy(), dist.std.to("cpu", torch.float16).numpy()

    def write(self, folder: Path, frames: int, size: int, name: str | None = None) -> Path:
        """Encode every frame of ``folder``'s ``frames.mp4`` (or ``image.png``) into ``folder/latents.safetensors``,
        whole or not at all (``name``: the clip, for the progress bar).

        Raises:
            InputError: the clip has another number of frames or another size than its ``frames``/``size``.
        """
        from tqdm.auto import tqdm

        from ..io import iter_frames, load_image
        from ..io.output import atomic_output

        folder = Path(folder)
        video = folder / "frames.mp4"
        source = iter_frames(video) if video.is_file() else iter([np.asarray(load_image(folder / "image.png"))])
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        shape = (frames, self.vae.config.latent_channels, size // scale, size // scale)
        metadata = {"vae": self.source, "vae_fingerprint": self.fingerprint, "frames": str(frames), "size": str(size)}
        path = folder / LATENTS_FILE
        bar = tqdm(
            total=frames, desc=f"VAE {name or folder.name}", unit="frame", disable=not self.progress, leave=False
        )
        mean, std = np.empty(shape, np.float16), np.empty(shape, np.float16)
        done = 0

        def add(chunk: list[np.ndarray]) -> int:
            if done + len(chunk) > frames:
                raise InputError(f"{folder} has more than the {frames} frames its manifest entry says")
            mean[done : done + len(chunk)], std[done : done + len(chunk)] = self.encode(np.stack(chunk))
            bar.update(len(chunk))
            return done + len(chunk)

        with bar:
            chunk = []
            for frame in source:
                if frame.shape != (size, size, 3):
                    raise InputError(f"{folder} has {frame.shape[1]}x{frame.shape[0]} frames, not {size}x{size}")
                chunk.append(frame)
                if len(chunk) == ENCODE_CHUNK:
                    done, chunk = add(chunk), []
            if chunk:
                done = add(chunk)
        if done != frames:
            raise InputError(f"{path.name}: {done} frames encoded, but the clip has {frames}")
        with atomic_output(path) as temp:
            safetensors.numpy.save_file({"mean": mean, "std": std}, str(temp), metadata=metadata)
        return path


def latents_info(path: Path) -> dict | None:
    """The metadata of a ``latents.safetensors`` (``vae``, ``vae_fingerprint``, ``frames``, ``size``, and
    ``shape``), or ``None`` when there is no readable one."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        return None
    try:
        with safe_open(str(path), "np") as file:
            info = dict(file.metadata() or {})
            info["shape"] = tuple(file.get_slice("mean").get_shape())
            if tuple(file.get_slice("std").get_shape()) != info["shape"]:
                return None
    except Exception:  # noqa: BLE001 - a damaged or foreign file is as good as none: it is written again
        return None
    return info


def read_latents(path: Path, frames: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std)`` float16 ``(len(frames), 4, h, w)`` of the clip frames ``frames``, read from the file one
    frame at a time (never the whole clip)."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as file:
        mean, std = file.get_slice("mean"), file.get_slice("std")
        return (
            np.concatenate([mean[t : t + 1] for t in frames]),
            np.concatenate([std[t : t + 1] for t in frames]),
        )
