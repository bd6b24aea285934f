"""Running one clip (or a batch of jobs) across processes with ``torch.distributed``.

Launch with ``torchrun --nproc_per_node=K -m magicanimate animate ...``; the process group is created from
torchrun's environment (NCCL on CUDA, gloo on CPU). Work is split so that every rank ends each denoising step
holding the same latents: ranks sum their window predictions with one ``all_reduce``; there is no rank-0 special
case until the video is written.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import InputError, ResourceError


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


@dataclass(frozen=True)
class WorkShare:
    """The part of every denoising step one process computes."""

    windows: list[list[int]]  # the context windows it runs
    branches: list[bool]  # the guidance branches it runs (False: unconditional, True: conditional)
    split: bool  # other ranks share the work: predictions are summed across ranks, the decode is shared


def share_work(
    windows: list[list[int]], branches: list[bool], distributed: bool = False, cfg_parallel: bool = False
) -> WorkShare:
    """This rank's windows and branches. Outside a process group (or with one rank) that is everything.

    Ranks take contiguous shares of the windows. With ``cfg_parallel`` and two branches, even ranks run the
    unconditional branch and odd ranks the conditional one, each pair sharing the windows.
    """
    rank, world = rank_and_world() if distributed else (0, 1)
    my_branches, groups, group = branches, world, rank
    if cfg_parallel and world > 1 and len(branches) == 2:
        if world % 2:
            raise InputError(f"cfg_parallel needs an even number of processes, got {world}")
        my_branches, groups, group = [branches[rank % 2]], world // 2, rank // 2
    return WorkShare(share(windows, groups, group), my_branches, world > 1)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (float32 on the wire); a lost peer becomes a one-line error."""
    try:
        dist.all_reduce(tensor)
    except (RuntimeError, dist.DistBackendError) as err:
        raise ResourceError(
            f"a distributed peer failed or timed out ({_reason(err)}); check the other ranks' logs"
        ) from err
    return tensor


def map_shared(fn: Callable[[torch.Tensor], torch.Tensor], chunks: list[torch.Tensor], empty: torch.Tensor):
    """``torch.cat([fn(chunk) for chunk in chunks])`` with the chunks shared across the ranks of the process group;
    every rank returns the whole result.

    Each chunk goes through ``fn`` exactly as in one process, only on another rank, so the result is the same bits
    as one process computes. ``empty`` is a zero-row tensor shaped and typed like ``fn``'s rows, for a rank that
    gets no chunk. Results travel on the backend's device (CUDA for NCCL) and come back on the CPU.
    """
    rank, world = rank_and_world()
    if world == 1:
        return torch.cat([fn(chunk) for chunk in chunks]) if chunks else empty
    shares = [share(list(range(len(chunks))), world, r) for r in range(world)]
    mine = torch.cat([empty, *(fn(chunks[k]).to(empty.dtype) for k in shares[rank])])
    sizes = [sum(len(chunks[k]) for k in part) for part in shares]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros((max(sizes), *empty.shape[1:]), dtype=empty.dtype, device=device)
    padded[: len(mine)] = mine
    gathered = [torch.empty_like(padded) for _ in range(world)]
    try:
        dist.all_gather(gathered, padded)
    except (RuntimeError, dist.DistBackendError) as err:
        raise ResourceError(f"a distributed peer failed while gathering results ({_reason(err)})") from err
    return torch.cat([part[:size].cpu() for part, size in zip(gathered, sizes, strict=True)])


def _reason(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
