"""Evaluation: the metrics papers in this field report (L1, PSNR, SSIM, LPIPS, FID, FID-VID, FVD), under DisCo's
TikTok protocol or in their textbook form, as a Python API and as ``magicanimate evaluate``.

```py
>>> from magicanimate import evaluation
>>> evaluation.psnr(pred_frames, gt_frames)            # (F, H, W, 3) uint8 or float in [0, 1]; textbook PSNR
>>> report = evaluation.evaluate_videos("pred/", "gt/", protocol="disco", weights_dir="eval-weights/")
>>> report.summary                                     # {"l1": ..., "psnr": ..., ..., "fvd": ...}
>>> evaluation.compare_videos("parity.mp4", ["fast.mp4", "cache2.mp4"]).table()
```

The pieces: :mod:`.metrics` (weight-free frame metrics), :mod:`.perceptual` (LPIPS), :mod:`.networks` (Inception,
3D-ResNet-50, I3D and their weight files), :mod:`.frechet` (the Fréchet distance with an injectable network),
:mod:`.protocol` (preprocessing rules), :mod:`.inputs` (matching videos), :mod:`.report` and :mod:`.command` (the
CLI). Nothing heavy is imported until a name is used, so registering the CLI command costs nothing.
"""

import importlib

_LAZY = {
    "l1": "metrics",
    "psnr": "metrics",
    "ssim": "metrics",
    "disco_l1": "metrics",
    "disco_psnr": "metrics",
    "disco_ssim": "metrics",
    "mean_psnr": "metrics",
    "LPIPS": "perceptual",
    "lpips": "perceptual",
    "load_lpips": "perceptual",
    "FeatureStats": "frechet",
    "FrechetDistance": "frechet",
    "frechet_distance": "frechet",
    "I3D": "networks",
    "InceptionFeatures": "networks",
    "ResNet3D50": "networks",
    "WEIGHT_FILES": "networks",
    "load_i3d": "networks",
    "load_inception": "networks",
    "load_resnet3d": "networks",
    "resolve_weight": "networks",
    "PROTOCOLS": "protocol",
    "Protocol": "protocol",
    "get_protocol": "protocol",
    "match_videos": "inputs",
    "EvaluationReport": "report",
    "ComparisonReport": "report",
    "METRICS": "report",
    "evaluate_videos": "evaluate",
    "compare_videos": "evaluate",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
