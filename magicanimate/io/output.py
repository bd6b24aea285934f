"""Where results go: one check of an output location before any work, and one way to write it.

:func:`check_output` runs before any model loads, so a run that would end in "cannot write" (or worse, in
replacing one of its own inputs) fails at once. :func:`atomic_output` is the only way anything is written: to a
hidden temporary name next to the target, renamed into place when complete, so a crash, Ctrl-C or full disk never
leaves a half-written file that looks finished, and a full disk is a :class:`ResourceError` (exit 4).
"""

import errno
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError, ResourceError

VIDEO_SUFFIXES = (".mp4", ".gif", "")  # "" = a folder of PNG frames


def output_kind(path: str | os.PathLike, suffixes: Iterable[str] = VIDEO_SUFFIXES) -> str:
    """The output's suffix, once it is one we write."""
    suffix = Path(path).suffix.lower()
    suffixes = tuple(suffixes)
    if suffix not in suffixes:
        kinds = " or ".join(s for s in suffixes if s)
        kinds += " (or no suffix for a folder of PNG frames)" if "" in suffixes else ""
        raise InputError(f"output {Path(path).name} must end in {kinds}")
    return suffix


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (through links, ``..`` and case-insensitive file systems alike)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def check_output(
    path: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    suffixes: Iterable[str] | None = VIDEO_SUFFIXES,
    folder_ok: bool = False,
) -> Path:
    """Refuse, with one line, an output location that cannot or must not be written, before any work is done:
    a suffix we do not write, one of the run's ``inputs`` (never replaced, even with ``overwrite``), an existing
    output without ``overwrite``, a folder where a file goes, a path under a file, or a folder we may not write
    into (permissions, a read-only file system).

    ``folder_ok``: the output is itself a folder (PNG frames, a converted tree), which may exist when empty.
    """
    path = Path(path)
    if suffixes is not None:
        folder_ok = output_kind(path, suffixes) == "" or folder_ok
    for source in inputs:
        if source is not None and (same_file(path, source) or _inside(Path(source), path)):
            raise InputError(f"the output {path} is one of the inputs ({source}); choose another output")
    if os.path.lexists(path):
        if path.is_dir() and not folder_ok:
            raise InputError(f"the output {path} is a folder; give a file name such as {path / 'out.mp4'}")
        empty_folder = path.is_dir() and not any(path.iterdir())
        if not overwrite and not empty_folder:
            raise InputError(f"{path} already exists; pass overwrite (--overwrite) to replace it, or choose another")
    parent = _nearest_existing(path.parent)
    if not parent.is_dir():
        raise InputError(f"the output {path} lies under {parent}, which is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or _read_only(parent):
        raise InputError(f"cannot write to {parent} (no permission, or a read-only file system); choose another output")
    return path


def _inside(folder: Path, path: Path) -> bool:
    """Whether the output folder ``path`` would contain the input ``folder``'s files (replacing a parent)."""
    try:
        return folder.resolve().is_relative_to(path.resolve()) and path.resolve() != Path(path.anchor)
    except OSError:
        return False


def _nearest_existing(folder: Path) -> Path:
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def atomic_output(path: str | os.PathLike, *, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (a folder, created, when ``folder``); when the block completes it
    replaces ``path`` (an earlier file or folder there is removed first), otherwise it is deleted.

    Raises:
        ResourceError: the disk (or quota) is full; nothing is left behind.
        InputError: the location cannot be written (permissions, read-only file system).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _write_error(path, err) from None
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial{path.suffix}")
    try:
        if folder:
            temp.mkdir()
        yield temp
        if folder and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # a folder cannot be replaced in one rename; a file can
        os.replace(temp, path)
    except OSError as err:
        raise _write_error(path, err) from None
    finally:
        if temp.is_dir() and not temp.is_symlink():
            shutil.rmtree(temp, ignore_errors=True)
        elif os.path.lexists(temp):
            temp.unlink(missing_ok=True)


def _write_error(path: Path, err: OSError) -> Exception:
    if disk_full(err):
        return ResourceError(f"the disk is full while writing {path}; nothing was written: free some space and retry")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return InputError(f"cannot write {path}: {err.strerror}; choose another output")
    return InputError(f"cannot write {path}: {err.strerror or err}")


def remove_stale_partials(path: str | os.PathLike) -> None:
    """Delete temporary files a killed earlier run left for ``path`` (``.NAME.xxxxxxxx.partial...``)."""
    import glob

    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.????????.partial*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
