"""The Fréchet distance behind FID, FID-VID and FVD, with the feature network injected.

All three metrics fit a Gaussian to the features of the generated set and one to the features of the real set and
report ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Heusel et al. 2017). They differ only in the network and
in what one item is: a frame (FID: Inception-v3), a 16-frame clip (FID-VID: 3D-ResNet-50, FVD: I3D). The matrix
square root is scipy's ``sqrtm``, as in DisCo's ``frechet_distance`` and pytorch-fid, with the same fallback (a
small ``eps`` on the diagonals when the product is singular).

:class:`FeatureStats` accumulates float64 sums, so features of any number of videos stream through without being
kept; :class:`FrechetDistance` pairs two of them with a network and a preprocessing function.
"""

from collections.abc import Callable

import numpy as np
import torch

from ..errors import InputError

__all__ = ["FeatureStats", "FrechetDistance", "frechet_distance"]


class FeatureStats:
    """Running mean and (unbiased, ``N - 1``) covariance of feature rows, in float64."""

    def __init__(self):
        self.count = 0
        self.total: np.ndarray | None = None
        self.outer: np.ndarray | None = None

    def add(self, features) -> None:
        """Add rows ``(N, D)`` (numpy or torch)."""
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().double().numpy()
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {features.shape}")
        if self.total is None:
            self.total = np.zeros(features.shape[1])
            self.outer = np.zeros((features.shape[1], features.shape[1]))
        self.count += len(features)
        self.total += features.sum(axis=0)
        self.outer += features.T @ features

    def mean(self) -> np.ndarray:
        return self.total / self.count

    def covariance(self) -> np.ndarray:
        if self.count < 2:
            raise InputError(f"a Fréchet distance needs at least 2 items per set, got {self.count}")
        mean = self.mean()
        return (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """``|mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))`` of two Gaussians."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"the two sets have features of different sizes: {mu1.shape} and {mu2.shape}")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # a singular product (fewer items than features): nudge the diagonals
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)  # rounding leaves an imaginary part of the order of the rounding
    difference = mu1 - mu2
    return float(difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


class FrechetDistance:
    """A Fréchet distance over a network's features: ``update(pred, gt)`` adds a batch of items of each set (after
    ``preprocess``), ``compute()`` gives the distance. ``network`` maps a float batch to ``(N, D)``."""

    def __init__(self, network: torch.nn.Module, preprocess: Callable, device: str | torch.device = "cpu"):
        self.network, self.preprocess, self.device = network, preprocess, torch.device(device)
        self.pred, self.gt = FeatureStats(), FeatureStats()

    @torch.no_grad()
    def features(self, items) -> torch.Tensor:
        batch = self.preprocess(items).to(self.device)
        dtype = next(self.network.parameters(), torch.empty(0)).dtype
        return self.network(batch.to(dtype)).reshape(len(batch), -1).float()

    def update(self, pred, gt) -> None:
        if len(pred):
            self.pred.add(self.features(pred))
        if len(gt):
            self.gt.add(self.features(gt))

    @property
    def count(self) -> int:
        return min(self.pred.count, self.gt.count)

    def compute(self) -> float:
        return frechet_distance(self.pred.mean(), self.pred.covariance(), self.gt.mean(), self.gt.covariance())
