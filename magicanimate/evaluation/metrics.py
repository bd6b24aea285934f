"""Frame metrics that need no network: L1, PSNR and SSIM, each in two definitions.

The plain definitions (:func:`l1`, :func:`psnr`, :func:`ssim`) are the textbook ones on RGB values in [0, 1]:
mean absolute error, PSNR with peak 1 (``inf`` for identical frames), and SSIM with an 11x11 Gaussian window
(torchmetrics). They are the ones to use for comparing our own results (``magicanimate evaluate --compare``) and in
training's validation.

The ``disco_*`` definitions reproduce DisCo's evaluation code (``tool/metrics/ssim_l1_lpips_psnr.py`` of
Wangt-CN/DisCo), which most TikTok papers used; their numbers are only comparable with each other:

- L1: the mean absolute difference of the 0-255 values divided once more by ``H * W`` (so a clip that is 20 levels
  off at 256x256 scores about 3e-4, the scale of the published tables).
- PSNR: computed on the uint8 arrays themselves, so the difference and its square wrap around modulo 256 before
  the mean (``numpy`` uint8 arithmetic), and 100 for identical frames. This is the known flaw some papers correct
  as "PSNR*"; it is kept here because the published numbers contain it.
- SSIM: scikit-image's ``structural_similarity`` with its defaults (7x7 uniform window, sample covariance,
  data range 255) on the grayscale frames (OpenCV's ``0.299 R + 0.587 G + 0.114 B``, rounded to uint8).

Every function takes a prediction and a ground truth of the same shape, as uint8 ``(F, H, W, 3)`` or ``(H, W, 3)``
arrays (or floats in [0, 1], numpy or torch), and returns the mean over frames (for the plain PSNR: the PSNR of the
mean squared error, see :func:`mean_psnr`), or one value per frame with ``reduction="none"``.
"""

import math

import numpy as np
import torch

from ..errors import InputError

__all__ = ["disco_l1", "disco_psnr", "disco_ssim", "l1", "mean_psnr", "psnr", "ssim", "to_uint8", "to_unit_tensor"]


def _as_clip(frames, name: str) -> np.ndarray | torch.Tensor:
    """``frames`` as a 4-D ``(F, H, W, 3)`` array or tensor (a single frame gets a leading axis)."""
    if not isinstance(frames, torch.Tensor):
        frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise InputError(f"{name} must be frames of shape (F, H, W, 3) or (H, W, 3), got {tuple(frames.shape)}")
    return frames


def to_uint8(frames, name: str = "frames") -> np.ndarray:
    """``(F, H, W, 3)`` uint8: uint8 stays as it is, floats in [0, 1] are rounded to the nearest of 256 levels."""
    frames = _as_clip(frames, name)
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if frames.dtype == np.uint8:
        return frames
    if not np.issubdtype(frames.dtype, np.floating):
        raise InputError(f"{name} must be uint8 or float in [0, 1], got {frames.dtype}")
    return np.round(np.clip(frames, 0.0, 1.0) * 255).astype(np.uint8)


def to_unit_tensor(frames, name: str = "frames") -> torch.Tensor:
    """``(F, 3, H, W)`` float32 in [0, 1] (the layout torchmetrics and the networks take)."""
    frames = _as_clip(frames, name)
    if not isinstance(frames, torch.Tensor):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if frames.dtype == torch.uint8:
        frames = frames.float() / 255
    elif frames.is_floating_point():
        frames = frames.float().clamp(0, 1)
    else:
        raise InputError(f"{name} must be uint8 or float in [0, 1], got {frames.dtype}")
    return frames.permute(0, 3, 1, 2)


def check_pair(pred, gt, convert):
    pred, gt = convert(pred, "the prediction"), convert(gt, "the ground truth")
    if tuple(pred.shape) != tuple(gt.shape):
        raise InputError(
            f"prediction and ground truth differ in shape: {tuple(pred.shape)} and {tuple(gt.shape)}; resize or cut "
            "them to match first (evaluate_videos does)"
        )
    return pred, gt


def reduce_values(values: np.ndarray, reduction: str):
    if reduction == "none":
        return values
    if reduction == "mean":
        return float(np.mean(values))
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def l1(pred, gt, reduction: str = "mean"):
    """Mean absolute error of RGB values in [0, 1] (0 for identical frames)."""
    pred, gt = check_pair(pred, gt, to_unit_tensor)
    return reduce_values((pred - gt).abs().flatten(1).mean(1).double().numpy(), reduction)


def psnr(pred, gt, reduction: str = "mean"):
    """Peak signal-to-noise ratio in dB with peak 1 on RGB values in [0, 1], through torchmetrics: per frame
    (``inf`` for an identical frame) with ``reduction="none"``; else the PSNR of the mean squared error over all
    frames (:func:`mean_psnr`), so that one identical frame does not make a clip's PSNR infinite."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    pred, gt = check_pair(pred, gt, to_unit_tensor)
    values = peak_signal_noise_ratio(pred, gt, data_range=1.0, reduction="none", dim=(1, 2, 3)).double().numpy()
    return values if reduction == "none" else mean_psnr(values)


def mean_psnr(values) -> float:
    """The PSNR (peak 1) of the mean of the squared errors behind per-frame PSNRs: ``inf`` only when every frame is
    identical. (The mean of per-frame PSNRs, DisCo's average, is infinite as soon as one frame is.)"""
    mse = float(np.mean(10 ** (-np.asarray(values, dtype=np.float64) / 10)))
    return math.inf if mse == 0 else -10 * math.log10(mse)


def ssim(pred, gt, reduction: str = "mean"):
    """Structural similarity of the RGB frames (11x11 Gaussian window, sigma 1.5, data range 1), through
    torchmetrics; 1 for identical frames. Frames need at least 11 pixels a side."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    pred, gt = check_pair(pred, gt, to_unit_tensor)
    if min(pred.shape[-2:]) < 11:
        raise InputError(f"SSIM needs frames of at least 11x11 pixels, got {pred.shape[-1]}x{pred.shape[-2]}")
    values = structural_similarity_index_measure(pred, gt, data_range=1.0, reduction="none")
    return reduce_values(values.double().numpy().reshape(-1), reduction)


def disco_l1(pred, gt, reduction: str = "mean"):
    """DisCo's L1: mean absolute difference of the uint8 values, divided by ``H * W``."""
    pred, gt = check_pair(pred, gt, to_uint8)
    height, width = pred.shape[1:3]
    error = np.abs(pred.astype(np.float64) - gt.astype(np.float64)) / float(height * width)
    return reduce_values(error.reshape(len(error), -1).mean(1), reduction)


def disco_psnr(pred, gt, reduction: str = "mean"):
    """DisCo's PSNR: ``20 log10(255 / sqrt(mse))`` with the mse of uint8 arithmetic (the difference and its square
    wrap around modulo 256), 100 for identical frames."""
    pred, gt = check_pair(pred, gt, to_uint8)
    values = []
    for a, b in zip(pred, gt, strict=True):
        mse = np.mean((a - b) ** 2)  # uint8 - uint8 and its square stay uint8: the wrap-around of DisCo's code
        values.append(100.0 if mse == 0 else 20 * math.log10(255.0 / math.sqrt(mse)))
    return reduce_values(np.asarray(values), reduction)


def disco_ssim(pred, gt, reduction: str = "mean"):
    """DisCo's SSIM: scikit-image's defaults on the uint8 grayscale frames. Frames need at least 7 pixels a side."""
    import cv2
    from skimage.metrics import structural_similarity

    pred, gt = check_pair(pred, gt, to_uint8)
    if min(pred.shape[1:3]) < 7:
        raise InputError(f"SSIM needs frames of at least 7x7 pixels, got {pred.shape[2]}x{pred.shape[1]}")
    values = [
        structural_similarity(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), cv2.cvtColor(b, cv2.COLOR_RGB2GRAY))
        for a, b in zip(pred, gt, strict=True)
    ]
    return reduce_values(np.asarray(values, dtype=np.float64), reduction)
