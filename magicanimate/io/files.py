"""Why a file cannot be read, in one place: every reader (images, videos, checkpoints, configs, manifests) asks
:func:`check_readable` first, so a missing file, a folder, a file without read permission, an empty file and a Git
LFS pointer (a checkpoint that was never downloaded) are each named as what they are, never as "corrupt"."""

import os
from pathlib import Path

from ..errors import CheckpointError, InputError

# The first line of every Git LFS pointer file (https://github.com/git-lfs/git-lfs/blob/main/docs/spec.md).
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"


def is_lfs_pointer(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a small Git LFS pointer text instead of the file it stands for."""
    try:
        if os.path.getsize(path) > 1024:
            return False
        with open(path, "rb") as handle:
            return handle.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX
    except OSError:
        return False


def check_readable(path: str | os.PathLike, what: str = "file", error: type[InputError] | type = InputError) -> Path:
    """``path`` as a :class:`Path` once it is a non-empty regular file we may read; else ``error`` (an
    :class:`InputError` by default, :class:`CheckpointError` for weights) with one line saying which of the known
    problems it is and what to do."""
    path = Path(path)
    name = os.fspath(path)
    if not os.path.lexists(path):
        raise error(f"{what} not found: {name}; check the path")
    if path.is_dir():
        raise error(f"{what} {name} is a folder, not a file")
    if not path.exists():
        raise error(f"{what} {name} is a broken link; point it at the real file")
    if not os.access(path, os.R_OK):
        raise permission_denied(path, what, error)
    if path.stat().st_size == 0:
        raise error(f"{what} {name} is empty (0 bytes); the download or copy did not finish")
    if is_lfs_pointer(path):
        raise error(
            f"{what} {name} is a Git LFS pointer, not the file itself (it was cloned without Git LFS); run "
            "'git lfs pull' in its repository, or download the file"
        )
    return path


def permission_denied(path: str | os.PathLike, what: str = "file", error: type[InputError] | type = InputError):
    """The error for a file we may not read. Readers raise it from a ``PermissionError`` at open too, since
    :func:`os.access` can say yes where the open then fails (ACLs, network file systems, a changed mode)."""
    return error(f"{what} {os.fspath(path)} cannot be read: permission denied (check its permissions, e.g. chmod a+r)")


def check_checkpoint_file(path: str | os.PathLike) -> Path:
    """:func:`check_readable` for model weights (exit code 3)."""
    return check_readable(path, "checkpoint file", CheckpointError)
