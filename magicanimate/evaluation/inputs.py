"""What ``--pred`` and ``--gt`` name, and which prediction goes with which ground truth.

Each side is one of:

- a video file (anything PyAV reads: mp4, gif, webm, mov, ...),
- a folder of frames (PNG, JPEG, WebP, BMP files, in natural order: ``2.png`` before ``10.png``), one video,
- a folder of videos and/or frame folders, matched with the other side by name (file stem or folder name),
- in the Python API, also an array of frames ``(F, H, W, 3)`` uint8.

Two single videos are paired whatever their names. Folders must hold the same names on both sides; a name on one
side only is an error that lists it, since a metric over a silent subset is a different number. Every video's
header is read while matching, so an unreadable file fails before any work.
"""

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

__all__ = ["IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "VideoSource", "find_videos", "match_videos"]

VIDEO_SUFFIXES = {".mp4", ".gif", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".mpg", ".mpeg", ".ts"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def natural_key(path: Path) -> list:
    """Sort key that orders ``frame2`` before ``frame10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def image_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    return sorted(files, key=natural_key)


@dataclass
class VideoSource:
    """One video to evaluate: a file, a folder of frames, or frames in memory."""

    name: str
    kind: str  # "video", "frames" or "array"
    path: Path | None = None
    array: np.ndarray | None = None
    fps: float | None = None

    @property
    def label(self) -> str:
        return os.fspath(self.path) if self.path is not None else self.name

    def check(self) -> int | None:
        """Read the header (videos) or list the frames (folders) now, so that a bad input fails before any work; the
        number of frames when it is known without decoding (for the progress bar)."""
        if self.kind == "video":
            from ..io import open_video
            from ..io.video import stream_fps

            container, stream = open_video(self.path)
            with container:
                self.fps = stream_fps(stream)
                return stream.frames or None
        if self.kind == "frames":
            count = len(image_files(self.path))
            if not count:
                raise InputError(f"no frames (PNG, JPEG, WebP) in {self.path}")
            return count
        return len(self.array)

    def frames(self, max_frames: int | None = None) -> Iterator[np.ndarray]:
        """RGB uint8 frames ``(H, W, 3)``, one at a time."""
        if self.kind == "array":
            yield from self.array[:max_frames]
        elif self.kind == "video":
            from ..io import iter_frames

            yield from iter_frames(self.path, max_frames)
        else:
            from ..io import load_image

            for path in image_files(self.path)[:max_frames]:
                yield np.asarray(load_image(path))


def _array_source(frames, name: str, fps: float | None = None) -> VideoSource:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise InputError(
            f"{name} frames must be a non-empty uint8 array (F, H, W, 3), got {frames.dtype} {frames.shape}"
        )
    return VideoSource(name=name, kind="array", array=frames, fps=fps)


def find_videos(source, role: str = "input") -> VideoSource | dict[str, VideoSource]:
    """One :class:`VideoSource` for a single video (file, frame folder, array), or ``{name: source}`` for a folder
    of videos. ``role`` names the side in messages (``--pred``, ``--gt``)."""
    if isinstance(source, VideoSource):
        return source
    if not isinstance(source, (str, os.PathLike)):
        return _array_source(source, role)
    path = Path(source).expanduser()
    if not os.path.lexists(path):
        raise InputError(f"{role} not found: {path}; check the path")
    if not path.is_dir():
        kind = "frames" if path.suffix.lower() in IMAGE_SUFFIXES else "video"
        if kind == "frames":  # a single image: a one-frame video
            return VideoSource(name=path.stem, kind="array", path=path, array=_load_one(path)[None], fps=None)
        return VideoSource(name=path.stem, kind="video", path=path)
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    videos = [p for p in entries if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES]
    frame_folders = [p for p in entries if p.is_dir() and image_files(p)]
    images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if images and (videos or frame_folders):
        raise InputError(
            f"{role} {path} holds both frames ({images[0].name}) and videos or frame folders "
            f"({(videos or frame_folders)[0].name}); give a folder of frames or a folder of videos"
        )
    if images:
        return VideoSource(name=path.name, kind="frames", path=path)
    found: dict[str, VideoSource] = {}
    for item in sorted(videos + frame_folders, key=natural_key):
        name = item.stem if item.is_file() else item.name
        if name in found:
            raise InputError(f"{role} {path} has two videos named {name!r} ({found[name].path.name}, {item.name})")
        found[name] = VideoSource(name=name, kind="video" if item.is_file() else "frames", path=item)
    if not found:
        raise InputError(f"{role} {path} holds no videos (mp4, gif, ...) and no frames (PNG, JPEG, ...)")
    return found


def _load_one(path: Path) -> np.ndarray:
    from ..io import load_image

    return np.asarray(load_image(path))


def _names(names) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def match_videos(
    pred, gt, pred_role: str = "--pred", gt_role: str = "--gt"
) -> list[tuple[str, VideoSource, VideoSource]]:
    """``[(name, prediction, ground truth), ...]`` in name order, every source checked readable.

    Raises:
        InputError: a side is missing or unreadable, or the two sides do not hold the same videos.
    """
    pred, gt = find_videos(pred, pred_role), find_videos(gt, gt_role)
    if isinstance(pred, VideoSource) and isinstance(gt, VideoSource):
        pairs = [(pred.name, pred, gt)]
    elif isinstance(pred, VideoSource) or isinstance(gt, VideoSource):
        single, folder = (pred_role, gt) if isinstance(pred, VideoSource) else (gt_role, pred)
        if len(folder) != 1:
            other = gt_role if single == pred_role else pred_role
            raise InputError(
                f"{single} is one video but {other} is a folder of {len(folder)} videos; give two videos or two "
                "folders whose videos have the same names"
            )
        ((name, only),) = folder.items()
        pairs = [(name, pred, only) if isinstance(pred, VideoSource) else (name, only, gt)]
    else:
        only_pred, only_gt = set(pred) - set(gt), set(gt) - set(pred)
        if only_pred or only_gt:
            side = (
                f"{len(only_gt)} ground-truth video(s) have no prediction: {_names(only_gt)}"
                if only_gt
                else f"{len(only_pred)} prediction(s) have no ground truth: {_names(only_pred)}"
            )
            raise InputError(f"{pred_role} and {gt_role} do not hold the same videos: {side}")
        pairs = [(name, pred[name], gt[name]) for name in sorted(pred, key=lambda n: natural_key(Path(n)))]
    for _, a, b in pairs:
        a.check()
        b.check()
    return pairs


def expected_frames(pairs, max_frames: int | None = None) -> int | None:
    """Frames the pairs will compare, when every count is known from headers (``None`` otherwise)."""
    total = 0
    for _, a, b in pairs:
        counts = (a.check(), b.check())
        if None in counts:
            return None
        total += min(*counts, max_frames or counts[0])
    return total
