"""The pretrained networks of FID, FID-VID, FVD and LPIPS: where their weight files are, and the two 3D networks
written out so that the published checkpoints load without torchvision or the authors' repositories.

========== ======================================== ======================== ==========================================
metric     network                                  file                     input (see :mod:`.protocol`)
========== ======================================== ======================== ==========================================
FID        Inception-v3 (TorchScript, clean-fid)    inception-2015-12-05.pt  (N, 3, 299, 299), 0-255
FID-VID    3D-ResNet-50, Kinetics-400 (Hara et al.) resnet-50-kinetics.pth   (N, 3, 16, 112, 112), 0-255 minus mean
FVD        I3D, Kinetics-400 (Carreira & Zisserman) i3d_pretrained_400.pt    (N, 3, 16, 224, 224), [-1, 1]
LPIPS      AlexNet / VGG-16 ImageNet (torchvision)  alexnet-owt-7be5be79.pth (N, 3, H, W), [-1, 1]
========== ======================================== ======================== ==========================================

A weight file is taken from, in order: the path given for it (a flag, or a keyword of the API), the weights folder
(``--weights-dir``, else ``$MAGICANIMATE_EVAL_WEIGHTS``, else ``~/.cache/magicanimate/eval``), torch's hub cache
(``$TORCH_HOME/hub/checkpoints``, where torchvision keeps its backbones), and, when online, its usual URL (fetched
into the weights folder). A file that is nowhere is one :class:`~magicanimate.errors.CheckpointError` line that
says which file, where to get it and where to put it.

Every network takes a batch and returns one feature row per item, ``(N, D)``; :data:`FEATURE_NETWORKS` says which
is which. Tests inject small modules of the same shape instead.
"""

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError

__all__ = [
    "I3D",
    "WEIGHT_FILES",
    "InceptionFeatures",
    "ResNet3D50",
    "WeightFile",
    "default_weights_dir",
    "load_checkpoint",
    "load_i3d",
    "load_inception",
    "load_resnet3d",
    "resolve_weight",
]

WEIGHTS_ENV = "MAGICANIMATE_EVAL_WEIGHTS"


@dataclass(frozen=True)
class WeightFile:
    """One pretrained file a metric needs: its name on disk, the flag that passes it, and where it comes from
    (``url`` is fetched automatically when online; ``None``: the user downloads it, see ``source``)."""

    key: str
    filename: str
    metric: str
    flag: str
    url: str | None
    source: str


WEIGHT_FILES = {
    weight.key: weight
    for weight in (
        WeightFile(
            "inception",
            "inception-2015-12-05.pt",
            "FID",
            "--inception",
            "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
            "the Inception-v3 TorchScript of StyleGAN2-ADA, which clean-fid uses",
        ),
        WeightFile(
            "i3d",
            "i3d_pretrained_400.pt",
            "FVD",
            "--i3d",
            "https://github.com/songweige/TATS/raw/main/tats/fvd/i3d_pretrained_400.pt",
            "the Kinetics-400 I3D that DisCo loads as eval_fvd/i3d_pretrained_400.pt",
        ),
        WeightFile(
            "resnet3d",
            "resnet-50-kinetics.pth",
            "FID-VID",
            "--resnet3d",
            None,
            "the Kinetics-400 3D-ResNet-50 of kenshohara/3D-ResNets-PyTorch (its README links the file), which DisCo "
            "loads as eval_fvd/resnet-50-kinetics.pth",
        ),
        WeightFile(
            "lpips_alex",
            "alexnet-owt-7be5be79.pth",
            "LPIPS",
            "--lpips-backbone",
            "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
            "torchvision's ImageNet AlexNet",
        ),
        WeightFile(
            "lpips_vgg",
            "vgg16-397923af.pth",
            "LPIPS",
            "--lpips-backbone",
            "https://download.pytorch.org/models/vgg16-397923af.pth",
            "torchvision's ImageNet VGG-16",
        ),
    )
}


def default_weights_dir(weights_dir: str | os.PathLike | None = None) -> Path:
    """``weights_dir``, else ``$MAGICANIMATE_EVAL_WEIGHTS``, else ``~/.cache/magicanimate/eval``."""
    chosen = weights_dir or os.environ.get(WEIGHTS_ENV)
    return Path(chosen).expanduser() if chosen else Path.home() / ".cache" / "magicanimate" / "eval"


def _torch_hub_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weight(
    key: str,
    path: str | os.PathLike | None = None,
    *,
    weights_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> Path:
    """The file for :data:`WEIGHT_FILES` ``[key]``: ``path`` if given, else found or (online, ``download``) fetched.

    Raises:
        CheckpointError: the file is missing, unreadable or cannot be fetched (one line: which file, from where,
            into which folder, or which flag passes it).
    """
    from ..io.files import check_readable

    weight = WEIGHT_FILES[key]
    if path is not None:
        return check_readable(Path(path).expanduser(), f"{weight.metric} weights ({weight.filename})", CheckpointError)
    folder = default_weights_dir(weights_dir)
    for candidate in (folder / weight.filename, _torch_hub_dir() / weight.filename):
        if candidate.is_file():
            return check_readable(candidate, f"{weight.metric} weights", CheckpointError)
    howto = f"put {weight.filename} ({weight.source}) into {folder}, or pass {weight.flag} FILE"
    if weight.url is None or not download:
        raise CheckpointError(f"{weight.metric} needs {weight.filename}, which is not in {folder}; {howto}")
    from ..weights import is_offline

    if is_offline():
        raise CheckpointError(
            f"{weight.metric} needs {weight.filename} and this run is offline; download {weight.url} and {howto}"
        )
    print(f"magicanimate: fetching {weight.filename} from {weight.url}", file=sys.stderr, flush=True)
    target = folder / weight.filename
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weight.url, os.fspath(target), progress=True)  # via a temporary file
    except Exception as err:  # noqa: BLE001 - URLError, HTTPError, timeouts, OSError: all mean "could not fetch"
        reason = getattr(err, "reason", None) or err
        raise CheckpointError(f"cannot fetch {weight.url} ({reason}); {howto}") from None
    return target


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (a torch pickle read with ``weights_only``, so it cannot run code), unwrapped from
    a ``{"state_dict": ...}`` training checkpoint and without the ``module.`` prefix of ``DataParallel``."""
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file, whatever torch raises for it
        raise CheckpointError(f"cannot read checkpoint {os.fspath(path)}: {str(err).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {os.fspath(path)} holds no state dict")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_into(model: nn.Module, state: dict, name: str) -> nn.Module:
    """``model`` with ``state`` loaded strictly, in eval mode without gradients; a mismatch is one line."""
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    wrong = [key for key in own if key in state and tuple(state[key].shape) != tuple(own[key].shape)]
    if missing or unexpected or wrong:
        first = (
            f"missing {missing[0]}"
            if missing
            else f"unexpected {unexpected[0]}"
            if unexpected
            else f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}"
        )
        counts = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of another shape"
        raise CheckpointError(f"{name} does not fit {type(model).__name__} ({counts}; {first})")
    model.load_state_dict(state, strict=True)
    return model.requires_grad_(False).eval()


# ----------------------------------------------------------------------------------------------------- Inception


class InceptionFeatures(nn.Module):
    """The 2048-d pool features of the TorchScript Inception-v3 (``inception-2015-12-05.pt``), for batches
    ``(N, 3, 299, 299)`` of RGB values in 0-255 (the file's own convention; it rescales to [-1, 1] inside)."""

    num_features = 2048

    def __init__(self, scripted: torch.jit.ScriptModule):
        super().__init__()
        self.model = scripted

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, return_features=True).reshape(len(images), -1)


def load_inception(path: str | os.PathLike | None = None, **resolve) -> InceptionFeatures:
    """:class:`InceptionFeatures` from ``path`` (or the file :func:`resolve_weight` finds)."""
    path = resolve_weight("inception", path, **resolve)
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13, but this file is one
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.load(os.fspath(path), map_location="cpu")
    except Exception as err:  # noqa: BLE001 - not a TorchScript archive, or a damaged one
        raise CheckpointError(
            f"cannot read {os.fspath(path)} as the TorchScript Inception: {str(err).splitlines()[0]}; pass "
            f"{WEIGHT_FILES['inception'].filename} from {WEIGHT_FILES['inception'].url}"
        ) from None
    return InceptionFeatures(scripted).eval()


# ------------------------------------------------------------------------------------------------------------ I3D


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding of one axis, ``(before, after)``: the output has ``ceil(size / stride)``
    positions and any odd padding goes after. The I3D weights come from a TensorFlow model and expect it."""
    total = max(kernel - (stride if size % stride == 0 else size % stride), 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int], value: float = 0.0):
    """``x`` ``(N, C, T, H, W)`` padded for a "SAME" 3D convolution or pooling."""
    pads = []
    for axis in (2, 1, 0):  # F.pad takes the last axis first: W, H, T
        pads += same_padding(x.shape[2 + axis], kernel[axis], stride[axis])
    return F.pad(x, pads, value=value)


class Unit3D(nn.Module):
    """Conv3d with "SAME" padding, then batch norm and ReLU (the logits layer: bias, neither of the two)."""

    def __init__(self, in_channels: int, out_channels: int, kernel=(1, 1, 1), stride=(1, 1, 1), head: bool = False):
        super().__init__()
        self.kernel, self.stride, self.head = tuple(kernel), tuple(stride), head
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, padding=0, bias=head)
        if not head:
            self.bn = nn.BatchNorm3d(out_channels, eps=0.001, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(pad_same(x, self.kernel, self.stride))
        return x if self.head else F.relu(self.bn(x))


class MaxPool3dSame(nn.Module):
    """Max pooling with "SAME" zero padding (as the TensorFlow original, and the PyTorch port the weights fit)."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionBlock3D(nn.Module):
    """Four branches (1x1; 1x1 then 3x3x3; 1x1 then 3x3x3; 3x3x3 max pool then 1x1), concatenated."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(in_channels, widths[0])
        self.b1a = Unit3D(in_channels, widths[1])
        self.b1b = Unit3D(widths[1], widths[2], kernel=(3, 3, 3))
        self.b2a = Unit3D(in_channels, widths[3])
        self.b2b = Unit3D(widths[3], widths[4], kernel=(3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, widths[5])
        self.out_channels = widths[0] + widths[2] + widths[4] + widths[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class I3D(nn.Module):
    """Inflated Inception-v1 (I3D) for Kinetics-400, laid out and named as the PyTorch port whose
    ``i3d_pretrained_400.pt`` DisCo (and TATS, StyleGAN-V's predecessors) use.

    ``forward`` returns the 400 class logits averaged over the remaining time steps, ``(N, 400)``: DisCo's FVD
    statistics are taken on these logits (``InceptionI3d.forward``). Input: ``(N, 3, T, H, W)`` in [-1, 1]; at
    224x224 the spatial average below is exactly the original's ``AvgPool3d((1, 7, 7))``, and it also takes the small
    frames of the tests.
    """

    num_features = 400
    BLOCKS = (  # name, input channels, branch widths
        ("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)),
        ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
        ("MaxPool3d_4a_3x3", (3, 3, 3), (2, 2, 2)),
        ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)),
        ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
        ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)),
        ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
        ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)),
        ("MaxPool3d_5a_2x2", (2, 2, 2), (2, 2, 2)),
        ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
        ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)),
    )

    def __init__(self, num_classes: int = 400):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, kernel=(7, 7, 7), stride=(2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, kernel=(3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.order = ["Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3"]
        for name, first, second in self.BLOCKS:
            block = MaxPool3dSame(first, second) if name.startswith("MaxPool") else InceptionBlock3D(first, second)
            self.add_module(name, block)
            self.order.append(name)
        self.logits = Unit3D(1024, num_classes, head=True)
        self.num_features = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.order:
            x = getattr(self, name)(x)
        x = x.mean(dim=(3, 4), keepdim=True)  # (N, 1024, T', 1, 1); dropout before the logits is off in eval
        return self.logits(x).flatten(2).mean(2)


def load_i3d(path: str | os.PathLike | None = None, **resolve) -> I3D:
    """:class:`I3D` with the Kinetics-400 weights from ``path`` (or the file :func:`resolve_weight` finds)."""
    path = resolve_weight("i3d", path, **resolve)
    return load_into(I3D(), load_checkpoint(path), os.fspath(path))


# ---------------------------------------------------------------------------------------------------- 3D ResNet


class Bottleneck3D(nn.Module):
    """1x1x1, 3x3x3 (carrying the stride), 1x1x1 convolutions with batch norm; a projection shortcut ("B") where
    the shape changes."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.downsample = None
        if stride != 1 or in_channels != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_channels, planes * 4, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm3d(planes * 4),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet3D50(nn.Module):
    """The 3D-ResNet-50 of Hara et al. ("Can Spatiotemporal 3D CNNs Retrace the History of 2D CNNs and ImageNet?"),
    shortcut type B, named as ``resnet-50-kinetics.pth``. ``forward`` returns the 2048-d average-pooled features
    before the classifier (DisCo's ``last_fc=False``), ``(N, 2048)``, for ``(N, 3, 16, 112, 112)`` clips of 0-255
    values minus the Kinetics mean. At that size the global average is exactly the original's
    ``AvgPool3d((1, 4, 4))``."""

    num_features = 2048

    def __init__(self, layers=(3, 4, 6, 3), num_classes: int = 400):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 64, kernel_size=7, stride=(1, 2, 2), padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        channels = 64
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if index == 0 else 2
            stage = []
            for block in range(blocks):
                stage.append(Bottleneck3D(channels, planes, stride if block == 0 else 1))
                channels = planes * 4
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
        self.fc = nn.Linear(channels, num_classes)  # in the checkpoint; not used for the features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool3d(x, kernel_size=3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3, 4))


def load_resnet3d(path: str | os.PathLike | None = None, **resolve) -> ResNet3D50:
    """:class:`ResNet3D50` with the Kinetics-400 weights from ``path`` (or the file :func:`resolve_weight` finds)."""
    path = resolve_weight("resnet3d", path, **resolve)
    return load_into(ResNet3D50(), load_checkpoint(path), os.fspath(path))
