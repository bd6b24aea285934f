"""Running one clip (or a batch of jobs) across processes with ``torch.distributed``.

Launch with ``torchrun --nproc_per_node=K -m magicanimate animate ...``; the process group is created from
torchrun's environment (NCCL on CUDA, gloo on CPU). Work is split so that every rank ends each denoising step
holding the same latents: ranks sum their window predictions with one ``all_reduce``; there is no rank-0 special
case until the video is written.
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import ResourceError


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def init_from_env(timeout_s: float = 600.0) -> torch.device:
    """Join the process group torchrun describes (if any) and return this rank's device.

    With ``WORLD_SIZE`` unset or 1 nothing is initialised and the command behaves exactly as without torchrun.
    ``timeout_s`` bounds every collective, so a rank that dies makes the others fail instead of hang.
    """
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return device


def share(items: list, parts: int, index: int) -> list:
    """The ``index``-th of ``parts`` contiguous, near-equal slices of ``items`` (neighbouring windows stay on one
    rank, so fewer ControlNet frames are computed twice)."""
    size, extra = divmod(len(items), parts)
    start = index * size + min(index, extra)
    return items[start : start + size + (index < extra)]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (float32 on the wire); a lost peer becomes a one-line error."""
    try:
        dist.all_reduce(tensor)
    except (RuntimeError, dist.DistBackendError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ResourceError(f"a distributed peer failed or timed out ({reason}); check the other ranks' logs") from err
    return tensor


def gather_frames(frames: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate every rank's contiguous share of decoded frames (see :func:`share`) into the whole clip."""
    _, world = rank_and_world()
    longest = -(-total // world)
    padded = torch.zeros((longest, *frames.shape[1:]), dtype=frames.dtype, device=frames.device)
    padded[: len(frames)] = frames
    gathered = [torch.empty_like(padded) for _ in range(world)]
    try:
        dist.all_gather(gathered, padded)
    except (RuntimeError, dist.DistBackendError) as err:
        raise ResourceError(f"a distributed peer failed while gathering frames ({err})") from err
    sizes = [len(share(range(total), world, r)) for r in range(world)]
    return torch.cat([part[:size] for part, size in zip(gathered, sizes, strict=True)])
