"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric") without
torchvision.

LPIPS compares the unit-normalised activations of five layers of an ImageNet classifier, weights their squared
differences per channel with small learned linear layers, averages over space and sums over layers. The two parts
come from different places:

- the linear layers ship inside the torchmetrics wheel (``torchmetrics/functional/image/lpips_models/alex.pth``,
  ``vgg.pth``; the same v0.1 weights as the ``lpips`` package), so they are read from there;
- the backbone is torchvision's AlexNet or VGG-16 ImageNet checkpoint (``alexnet-owt-7be5be79.pth``,
  ``vgg16-397923af.pth``). torchvision itself is not needed: :class:`AlexNetFeatures` and :class:`VGG16Features`
  are the same layer stacks under the same parameter names, so the checkpoint loads into them as it is.

Input: ``(N, 3, H, W)`` RGB in [-1, 1], as the original. (DisCo's evaluation passes [0, 1] images to
``lpips.LPIPS(net="vgg")`` unchanged; :mod:`.protocol` reproduces that by what it feeds in, not here.)
"""

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from .metrics import check_pair, reduce_values, to_unit_tensor

__all__ = ["LPIPS", "AlexNetFeatures", "VGG16Features", "linear_weights_path", "load_lpips", "lpips"]

# Per-channel shift and scale of the original's ScalingLayer: inputs in [-1, 1] are brought to the ImageNet
# statistics the backbone was trained on ((x + 1) / 2 - mean) / std, written in the [-1, 1] range.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class SlicedFeatures(nn.Module):
    """A torchvision ``features`` stack whose activations are read at the exclusive ends ``slices``."""

    channels: tuple[int, ...] = ()
    slices: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs, start = [], 0
        for end in self.slices:
            for layer in self.features[start:end]:
                x = layer(x)
            outputs.append(x)
            start = end
        return outputs


class AlexNetFeatures(SlicedFeatures):
    """torchvision's ``alexnet().features`` (parameter names ``features.N.weight``), split after each ReLU that
    LPIPS reads (relu1 ... relu5: 64, 192, 384, 256, 256 channels)."""

    channels = (64, 192, 384, 256, 256)
    slices = (2, 5, 8, 10, 12)

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
        )


class VGG16Features(SlicedFeatures):
    """torchvision's ``vgg16().features`` (configuration D, no batch norm; parameter names ``features.N.weight``),
    split after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 (64, 128, 256, 512, 512 channels)."""

    channels = (64, 128, 256, 512, 512)
    slices = (4, 9, 16, 23, 30)
    layout = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)

    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for item in self.layout:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                channels = item
        self.features = nn.Sequential(*layers)


BACKBONES = {"alex": AlexNetFeatures, "vgg": VGG16Features}


def linear_weights_path(net: str) -> Path:
    """The v0.1 linear-layer weights for ``net`` packaged in the torchmetrics wheel."""
    try:
        import torchmetrics
    except ImportError:
        raise CheckpointError(
            "LPIPS needs torchmetrics (its wheel carries the LPIPS linear layers): pip install 'magicanimate[eval]'"
        ) from None
    path = Path(torchmetrics.__file__).parent / "functional" / "image" / "lpips_models" / f"{net}.pth"
    if not path.is_file():
        raise CheckpointError(f"the LPIPS linear layers {path} are missing from this torchmetrics installation")
    return path


class LPIPS(nn.Module):
    """LPIPS distance between image batches in [-1, 1]; ``forward(x, y)`` returns one value per image ``(N,)``.

    ``backbone_state``: a torchvision-format state dict of the backbone (``features.*``; other keys such as the
    classifier are ignored), or ``None`` for random weights (tests only: the distance then means nothing).
    """

    def __init__(self, net: str = "alex", backbone_state: dict | None = None, linear_state: dict | None = None):
        super().__init__()
        if net not in BACKBONES:
            raise ValueError(f"LPIPS net must be one of {sorted(BACKBONES)}, got {net!r}")
        self.net = net
        self.backbone = BACKBONES[net]()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        # The original's NetLinLayer is Sequential(Dropout, Conv2d 1x1 without bias); dropout is inactive in eval.
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in self.backbone.channels)
        if backbone_state is not None:
            self.load_backbone(backbone_state)
        if linear_state is None:
            linear_state = torch.load(linear_weights_path(net), map_location="cpu", weights_only=True)
        self.load_linear(linear_state)
        self.requires_grad_(False).eval()

    def load_backbone(self, state: dict, name: str = "the LPIPS backbone") -> None:
        features = {k: v for k, v in state.items() if k.startswith("features.")}
        try:
            self.backbone.load_state_dict(features, strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
            raise CheckpointError(
                f"{name} does not fit the {self.net} backbone ({first}); pass torchvision's "
                f"{'alexnet-owt-7be5be79.pth' if self.net == 'alex' else 'vgg16-397923af.pth'}"
            ) from None

    def load_linear(self, state: dict) -> None:
        try:
            for index, lin in enumerate(self.lins):
                lin.weight.data.copy_(state[f"lin{index}.model.1.weight"])
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(f"the LPIPS linear layers do not fit the {self.net} backbone: {err}") from None

    @staticmethod
    def normalize(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
        """Unit length along the channels (the original's ``normalize_tensor``)."""
        return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        features_x = self.backbone((x - self.shift) / self.scale)
        features_y = self.backbone((y - self.shift) / self.scale)
        total = 0
        for lin, fx, fy in zip(self.lins, features_x, features_y, strict=True):
            difference = (self.normalize(fx) - self.normalize(fy)) ** 2
            total = total + lin(difference).mean(dim=(2, 3))
        return total.view(-1)


def load_lpips(net: str = "alex", backbone: str | os.PathLike | None = None, **resolve) -> LPIPS:
    """LPIPS with torchvision's ImageNet backbone from the file ``backbone`` (or, when ``None``, found or fetched by
    :func:`~magicanimate.evaluation.networks.resolve_weight`)."""
    from .networks import load_checkpoint, resolve_weight

    path = resolve_weight(f"lpips_{net}", backbone, **resolve)
    model = LPIPS(net)
    model.load_backbone(load_checkpoint(path), name=os.fspath(path))
    return model


@torch.no_grad()
def lpips(pred, gt, model: LPIPS, reduction: str = "mean", zero_one_inputs: bool = False, batch_size: int = 16):
    """LPIPS of frames (as the other metrics take them: ``(F, H, W, 3)`` uint8 or floats in [0, 1]) under ``model``,
    per frame or their mean. The frames go in scaled to [-1, 1], as LPIPS expects; ``zero_one_inputs`` passes them
    in [0, 1] instead, as DisCo's evaluation does (see :mod:`.protocol`)."""
    pred, gt = check_pair(pred, gt, to_unit_tensor)
    device = next(model.parameters()).device
    values = []
    for start in range(0, len(pred), batch_size):
        x, y = pred[start : start + batch_size].to(device), gt[start : start + batch_size].to(device)
        if not zero_one_inputs:
            x, y = x * 2 - 1, y * 2 - 1
        values.append(model(x, y).double().cpu())
    return reduce_values(torch.cat(values).numpy(), reduction)
