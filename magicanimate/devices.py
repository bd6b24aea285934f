"""Which device and precision a run uses: the one place that reads the ``device`` and ``dtype`` settings.

It is asked before any model loads, so ``device: cuda`` on a machine without a usable GPU is one clear line at
once instead of a traceback after minutes of loading.
"""

import os

from .errors import InputError

DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def resolve_device(device: str = "auto", dtype: str = "auto", local_rank: int | None = None):
    """``(torch.device, torch.dtype)`` for the settings. ``auto`` is CUDA when usable (``cuda:LOCAL_RANK`` under
    torchrun or ``local_rank``), else the CPU; ``dtype: auto`` is float16 on CUDA and float32 elsewhere.

    Raises:
        InputError: the device is not available in this torch build or machine.
    """
    import torch

    if local_rank is None and "LOCAL_RANK" in os.environ:
        local_rank = int(os.environ["LOCAL_RANK"]) if os.environ["LOCAL_RANK"].isdigit() else None
    cuda = torch.cuda.is_available()
    if device == "auto":
        device = f"cuda:{(local_rank or 0) % torch.cuda.device_count()}" if cuda else "cpu"
    kind, _, index = device.partition(":")
    if kind == "cuda":
        if not cuda:
            raise InputError(
                f"device {device} was asked for, but torch finds no usable CUDA GPU (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'no'}); use device cpu, or install the CUDA build of torch"
            )
        if index and int(index) >= torch.cuda.device_count():
            raise InputError(f"device {device} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    elif kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InputError(f"device {device} was asked for, but MPS is not available here; use device cpu")
    elif kind not in ("cpu", "cuda", "mps"):
        backend = getattr(torch, kind, None)
        if backend is None or not backend.is_available():
            raise InputError(f"device {device} is not available in this torch build; use device cpu or cuda")
    if dtype == "auto":
        chosen = torch.float16 if kind == "cuda" else torch.float32
    elif dtype in DTYPES:
        chosen = getattr(torch, DTYPES[dtype])
    else:
        raise InputError(f"dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    return torch.device(device), chosen
