"""Evaluation protocols: which metric definitions, and exactly how frames and clips are prepared for each network.

``disco`` follows DisCo's TikTok evaluation (Wangt-CN/DisCo ``gen_eval.sh``, ``tool/metrics/``), which the
MagicAnimate paper and most of its successors used ("We used evaluation code released by DisCo and followed their
train/test split", magic-animate#136). Every rule and its source is listed in ``docs/evaluation.md``; in short:

- frames are matched by index; a prediction of another size is resized to the ground truth's with OpenCV's
  bilinear ``cv2.resize`` (``ssim_l1_lpips_psnr.py``); nothing is cropped;
- L1, PSNR and SSIM are DisCo's definitions (:mod:`.metrics`), averaged over all frames of all videos;
- LPIPS uses the VGG backbone and gets the frames in [0, 1], not [-1, 1] (``compute_lpips`` passes
  ``ToTensor()`` images to ``lpips.LPIPS(net="vgg")``);
- FID: all compared frames of all videos per set, PIL bicubic resize of each channel as float to 299x299, values
  0-255, the TorchScript Inception (clean-fid's "clean" mode, which ``gen_eval.sh`` runs);
- FID-VID and FVD: 16-frame clips starting at every frame whose clip is followed by at least one more frame
  (``gen_gifs_for_fvd.py`` writes a GIF for each start in ``range(0, N - 16)``), each frame through a 256-colour
  GIF palette, PIL bicubic resize (as float) to 112x112 minus the Kinetics mean for the 3D-ResNet-50 (FID-VID) and
  to 224x224 scaled to [-1, 1] for I3D (FVD), one feature row per clip (``DatasetFVDVideoResize``).

``standard`` is the textbook form of each metric, for comparing our own results with each other (``--compare``)
and for training's validation: plain L1/PSNR/SSIM on RGB in [0, 1] (PSNR over many frames: that of their mean
squared error), LPIPS-AlexNet on [-1, 1], and non-overlapping 16-frame clips, the same networks and resizing.
"""

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from . import metrics

__all__ = ["PROTOCOLS", "Protocol", "get_protocol", "pil_bicubic_float"]

# DisCo's DatasetFVDVideoResize: the per-channel mean (0-255) subtracted for the 3D-ResNet-50 (Kinetics statistics).
KINETICS_MEAN = (114.7748, 107.7354, 99.4750)


def pil_bicubic_float(frame: np.ndarray, size: int) -> np.ndarray:
    """``frame`` ``(H, W, 3)`` resized to ``(size, size, 3)`` float32 0-255 by PIL's bicubic filter on each channel
    as a float image, with no rounding in between (clean-fid's ``make_resizer("PIL", False, "bicubic")``; PIL
    widens the filter when shrinking, so there is no aliasing)."""
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(frame[..., c], dtype=np.float32)).resize(
                (size, size), resample=Image.Resampling.BICUBIC
            )
        )
        for c in range(3)
    ]
    return np.stack(channels, axis=-1).astype(np.float32)


def gif_palette(frame: np.ndarray) -> np.ndarray:
    """``frame`` through a GIF's 256-colour adaptive palette (what Pillow does to an RGB frame it saves as GIF)."""
    image = Image.fromarray(frame).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    return np.asarray(image.convert("RGB"))


def inception_batch(frames: list[np.ndarray], size: int) -> torch.Tensor:
    """Frames for the Inception: ``(N, 3, size, size)`` float32, 0-255."""
    return torch.from_numpy(np.stack([pil_bicubic_float(f, size) for f in frames])).permute(0, 3, 1, 2)


def clips_batch(clips: list[list[np.ndarray]]) -> torch.Tensor:
    """Clips of frames already prepared by a :class:`ClipNetwork` as ``(N, 3, T, S, S)``."""
    return torch.from_numpy(np.stack([np.stack(clip) for clip in clips])).permute(0, 4, 1, 2, 3)


@dataclass(frozen=True)
class ClipNetwork:
    """How one frame of a clip is prepared for a video network: resized to ``size`` and then ``scale * x + shift``
    per channel (float32)."""

    size: int
    scale: float
    shift: tuple[float, float, float]

    def prepare(self, frame: np.ndarray) -> np.ndarray:
        return pil_bicubic_float(frame, self.size) * self.scale + np.asarray(self.shift, dtype=np.float32)


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol (see the module docstring). Frozen: derive variants with ``dataclasses.replace``
    (``replace(get_protocol("disco"), inception_size=64)`` in tests)."""

    name: str
    description: str
    l1: Callable
    psnr: Callable
    ssim: Callable
    lpips_net: str
    lpips_zero_one_inputs: bool
    inception_size: int = 299
    resnet3d: ClipNetwork = ClipNetwork(112, 1.0, tuple(-m for m in KINETICS_MEAN))
    i3d: ClipNetwork = ClipNetwork(224, 1 / 127.5, (-1.0, -1.0, -1.0))
    clip_length: int = 16
    clip_stride: int = 1
    clip_needs_next_frame: bool = True
    clip_gif_palette: bool = True
    resize_interpolation: int = cv2.INTER_LINEAR
    psnr_average: Callable = np.mean  # how per-frame PSNRs of many frames become one number
    notes: tuple[str, ...] = field(default=())

    def average(self, metric: str, values: np.ndarray) -> float:
        """One number from the per-frame values of ``metric`` (the mean; PSNR by ``psnr_average``)."""
        return float(self.psnr_average(values) if metric == "psnr" else np.mean(values))

    def resize_to(self, frame: np.ndarray, height: int, width: int) -> np.ndarray:
        """A prediction frame at the ground truth's size (OpenCV, ``resize_interpolation``)."""
        return cv2.resize(frame, (width, height), interpolation=self.resize_interpolation)

    def clip_frame(self, frame: np.ndarray) -> np.ndarray:
        """A frame as it enters the clips (through a GIF palette under DisCo's protocol)."""
        return gif_palette(frame) if self.clip_gif_palette else frame

    def clip_starts(self, num_frames: int) -> list[int]:
        """First frames of the clips of a video of ``num_frames`` frames."""
        last = num_frames - self.clip_length - (1 if self.clip_needs_next_frame else 0)
        return list(range(0, last + 1, self.clip_stride))


PROTOCOLS = {
    "disco": Protocol(
        name="disco",
        description="DisCo's TikTok evaluation code (gen_eval.sh), as the published tables use",
        l1=metrics.disco_l1,
        psnr=metrics.disco_psnr,
        ssim=metrics.disco_ssim,
        lpips_net="vgg",
        lpips_zero_one_inputs=True,
        notes=(
            "L1 is divided by H*W and PSNR wraps around in uint8 arithmetic (DisCo's formulas)",
            "FID-VID and FVD see the 16 distinct frames of each clip; DisCo's ffmpeg decode of its 3-fps GIFs "
            "repeats each frame about 8 times (DisCo#36)",
        ),
    ),
    "standard": Protocol(
        name="standard",
        description="textbook metrics on RGB in [0, 1] (for comparing our own results)",
        l1=metrics.l1,
        psnr=metrics.psnr,
        ssim=metrics.ssim,
        lpips_net="alex",
        lpips_zero_one_inputs=False,
        clip_stride=16,
        clip_needs_next_frame=False,
        clip_gif_palette=False,
        psnr_average=metrics.mean_psnr,
    ),
}


def get_protocol(protocol: "str | Protocol") -> Protocol:
    if isinstance(protocol, Protocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[protocol]


def with_sizes(protocol: Protocol, inception: int, resnet3d: int, i3d: int) -> Protocol:
    """``protocol`` with other network input sizes (small injected networks in tests)."""
    return replace(
        protocol,
        inception_size=inception,
        resnet3d=replace(protocol.resnet3d, size=resnet3d),
        i3d=replace(protocol.i3d, size=i3d),
    )
