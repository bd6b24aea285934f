"""Locate, check and fetch the pretrained weights (the original MagicAnimate "pretrained tree").

Users already have that tree (``stable-diffusion-v1-5/``, ``sd-vae-ft-mse/``, ``MagicAnimate/``), often in the
``.bin`` format of the original repo, so we read it as is instead of inventing a new layout. Fetching only names
exact files: the SD1.5 repo alone holds ~40 GB of variants (fp16, non-EMA, full ``.ckpt``) we never load.
The tree and the sizes are described in the repository's pretrained/README.md; messages describe the layout inline
(:data:`EXPECTED_TREE`), since that file is not installed with the package.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from magicanimate.errors import CheckpointError, ResourceError


class HubSource(NamedTuple):
    """One subfolder of the tree: the hub repo it mirrors and the exact files we need from it."""

    repo_id: str
    allow_patterns: tuple[str, ...]


# fnmatch patterns as huggingface_hub applies them (``*`` also crosses ``/``). Exact names where a folder holds
# variants, so ``*.fp16.safetensors`` / ``*.non_ema.bin`` / ``*.bin`` duplicates are never fetched.
HUB_SOURCES: dict[str, HubSource] = {
    "stable-diffusion-v1-5": HubSource(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        (
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "tokenizer/merges.txt",
            "tokenizer/special_tokens_map.json",
            "tokenizer/tokenizer_config.json",
            "tokenizer/vocab.json",
        ),
    ),
    "sd-vae-ft-mse": HubSource(
        "stabilityai/sd-vae-ft-mse",
        (
            "config.json",
            "diffusion_pytorch_model.safetensors",
        ),
    ),
    "MagicAnimate": HubSource(
        "zcxu-eric/MagicAnimate",
        (
            "appearance_encoder/*",
            "densepose_controlnet/*",
            "temporal_attention/temporal_attention.ckpt",
        ),
    ),
}

# What must be on disk: (subfolder, files), where each file is a tuple of accepted alternatives (safetensors first,
# the ``.bin`` the original repo / older snapshots shipped second). special_tokens_map.json is fetched but not
# required: CLIPTokenizer's defaults match SD1.5's, and some hand-copied trees lack it.
_REQUIRED: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...] = (
    (
        "stable-diffusion-v1-5/unet",
        (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
    ),
    ("stable-diffusion-v1-5/text_encoder", (("config.json",), ("model.safetensors", "pytorch_model.bin"))),
    ("stable-diffusion-v1-5/tokenizer", (("vocab.json",), ("merges.txt",), ("tokenizer_config.json",))),
    ("sd-vae-ft-mse", (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"))),
    (
        "MagicAnimate/appearance_encoder",
        (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
    ),
    (
        "MagicAnimate/densepose_controlnet",
        (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
    ),
    # A temporal_attention.safetensors beside (or instead of) the release's pickle is preferred by the loader.
    ("MagicAnimate/temporal_attention", (("temporal_attention.safetensors", "temporal_attention.ckpt"),)),
)
PIECES: tuple[str, ...] = tuple(sub for sub, _ in _REQUIRED)

# The layout in one line, for error messages (``.format(root=...)``).
EXPECTED_TREE = (
    "expected {root}/{{stable-diffusion-v1-5/{{unet,text_encoder,tokenizer}},sd-vae-ft-mse,"
    "MagicAnimate/{{appearance_encoder,densepose_controlnet,temporal_attention/temporal_attention.ckpt}}}} "
    "or a folder written by `magicanimate convert`"
)


def _howto(root: Path) -> str:
    """What to do about missing weights under ``root``: fetch them, or (in offline mode) copy them in."""
    layout = EXPECTED_TREE.format(root=root)
    if is_offline():
        return (
            f"offline mode is set (HF_HUB_OFFLINE): copy the files into {root} ({layout}), or unset it and run "
            f"'magicanimate download --to {root}'"
        )
    return f"run 'magicanimate download --to {root}', or copy the files into {root} ({layout})"


def incomplete_tree_error(root: str | os.PathLike, missing: Iterable[str]) -> CheckpointError:
    """The one message for a checkpoint tree that lacks pieces (``missing`` as :func:`missing_weights` names them,
    or as paths for pieces given on their own), with what to do about it."""
    root = Path(root)
    return CheckpointError(f"incomplete checkpoint tree {root} (missing: {', '.join(missing)}); {_howto(root)}")


def select_files(repo_key_or_id: str, filenames: Iterable[str]) -> list[str]:
    """The files of a repo listing that ``download_weights`` fetches, in listing order.

    Uses huggingface_hub's own filter so this is exactly what ``snapshot_download(allow_patterns=...)`` keeps.
    """
    from huggingface_hub.utils import filter_repo_objects

    source = HUB_SOURCES.get(repo_key_or_id) or next(
        (s for s in HUB_SOURCES.values() if s.repo_id == repo_key_or_id), None
    )
    if source is None:
        raise KeyError(f"unknown weight source {repo_key_or_id!r}; known: {', '.join(HUB_SOURCES)}")
    return list(filter_repo_objects(list(filenames), allow_patterns=list(source.allow_patterns)))


def default_pretrained_dir() -> Path:
    """``$MAGICANIMATE_PRETRAINED`` if set, else ``~/.cache/magicanimate/pretrained`` (a per-user cache, ~14 GB)."""
    env = os.environ.get("MAGICANIMATE_PRETRAINED")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "magicanimate" / "pretrained"


def missing_weights(root: str | os.PathLike, locations: dict[str, str | os.PathLike] | None = None) -> list[str]:
    """Human-readable names of the required pieces absent from ``root`` ([] when the tree is complete).

    A wholly absent piece is named by its folder (``stable-diffusion-v1-5/unet``); a partial one by its missing
    files (``MagicAnimate/appearance_encoder/config.json``), ``a|b`` where either format will do. ``locations``
    maps a piece (a name of :data:`PIECES`) to the folder it is read from instead of ``root / piece`` (a piece
    given on its own); such a piece is named by that folder's path.
    """
    root = Path(root)
    locations = {key: Path(value) for key, value in (locations or {}).items()}
    missing: list[str] = []
    for sub, files in _REQUIRED:
        folder = locations.get(sub, root / sub)
        name = str(folder) if sub in locations else sub
        # Present (even as a folder, a broken link or an LFS pointer) is not missing: the loaders name such a file.
        absent = [alts for alts in files if not any(os.path.lexists(folder / a) for a in alts)]
        if len(absent) == len(files):
            missing.append(name)
        else:
            missing.extend(f"{name}/{'|'.join(alts)}" for alts in absent)
    return missing


def is_offline() -> bool:
    """Offline per huggingface_hub (which reads HF_HUB_OFFLINE at import) or per the environment right now."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def fetch_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "could not fetch" (network, offline, hub HTTP, disk) rather than a bug of ours."""
    errors: list[type[BaseException]] = [OSError, TimeoutError]  # incl. hub HTTP/offline/LocalEntryNotFound errors
    for mod in ("httpx2", "httpx"):  # raw transport errors escape snapshot_download during file transfers
        try:
            errors.append(__import__(mod).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def download_weights(to: str | os.PathLike | None = None, *, token: str | None = None) -> Path:
    """Fetch the missing subfolders of the tree into ``to`` (default: :func:`default_pretrained_dir`).

    Subfolders already complete are skipped, so a partly copied tree only fetches the rest. Any failure to reach
    the hub becomes a one-line :class:`CheckpointError` naming the piece; each subfolder is re-checked afterwards
    because huggingface_hub returns an existing (possibly partial) ``local_dir`` as is when it cannot reach the hub.
    """
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    root = Path(to).expanduser() if to is not None else default_pretrained_dir()
    howto = _howto(root)
    for key, source in HUB_SOURCES.items():
        if not _missing_in(root, key):
            continue
        what = f"{key} ({source.repo_id})"
        if is_offline():
            raise CheckpointError(f"cannot fetch {what}: {howto}")
        print(f"magicanimate: fetching {what} into {root / key}", file=sys.stderr, flush=True)
        try:
            huggingface_hub.snapshot_download(
                source.repo_id,
                allow_patterns=list(source.allow_patterns),
                local_dir=root / key,
                token=token,
                endpoint=os.environ.get("HF_ENDPOINT") or None,
            )  # honour HF_ENDPOINT set after import too
        except fetch_errors() as err:
            if getattr(err, "errno", None) == 28:  # ENOSPC
                raise ResourceError(
                    f"disk full while fetching {what} into {root / key}; free space and retry"
                ) from None
            denied = isinstance(err, HfHubHTTPError) and not isinstance(err, LocalEntryNotFoundError)
            hint = f"check your access/token (HF_TOKEN), or {howto}" if denied else howto
            reason = (str(err).strip().splitlines() or [""])[0][:160]
            raise CheckpointError(f"cannot fetch {what}: {type(err).__name__}: {reason}; {hint}") from None
        still = _missing_in(root, key)
        if still:  # hub unreachable but local_dir non-empty: snapshot_download hands the partial folder back
            raise CheckpointError(f"cannot fetch {what}: still missing {', '.join(still)} in {root}; {howto}")
    return root


def _missing_in(root: Path, key: str) -> list[str]:
    return [m for m in missing_weights(root) if m == key or m.startswith(key + "/")]


def ensure_weights(root: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """Return ``root`` (default: :func:`default_pretrained_dir`) once it holds every required piece.

    With ``download`` the missing pieces are fetched (failing cleanly offline); without it the error lists them.
    """
    root = Path(root).expanduser() if root is not None else default_pretrained_dir()
    missing = missing_weights(root)
    if not missing:
        return root
    if download:
        return download_weights(root)
    raise incomplete_tree_error(root, missing)
