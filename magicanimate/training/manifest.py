"""The training data layout: one folder per clip and a ``manifest.jsonl`` that lists them.

::

    DATA/
      manifest.jsonl                  one JSON object per clip (see ManifestEntry), train and val split
      clips/NAME/frames.mp4           the person, framed square (H.264, 25 fps)
      clips/NAME/densepose.mp4        its DensePose, the same frames (viridis part map, as animate's motion)
      clips/NAME/meta.json            fps, frame count, person boxes, coverage, face and hand areas, source
      clips/NAME/image.png            a still image instead of the two videos (kind "image") ...
      clips/NAME/densepose.png        ... with its DensePose
      clips/NAME/latents.safetensors  optional (prepare-data --cache-latents): the frames' VAE latents, see .latents

``magicanimate prepare-data`` writes it; anything else that writes the same layout works as well (the manifest's
paths are relative to ``DATA/``).
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InputError

MANIFEST = "manifest.jsonl"
KINDS = ("video", "image")
SPLITS = ("train", "val")


@dataclass(frozen=True)
class ManifestEntry:
    """One clip (``kind="video"``: ``frames.mp4`` + ``densepose.mp4``) or still image (``kind="image"``:
    ``image.png`` + ``densepose.png``) under ``path`` (relative to the data folder)."""

    name: str
    path: str
    kind: str
    frames: int
    fps: float
    size: int
    split: str
    source: str = ""

    def files(self, root: Path) -> tuple[Path, Path]:
        """``(images, densepose)``: the two files of this entry under the data folder ``root``."""
        folder = Path(root) / self.path
        if self.kind == "image":
            return folder / "image.png", folder / "densepose.png"
        return folder / "frames.mp4", folder / "densepose.mp4"


def read_manifest(root: str | Path) -> list[ManifestEntry]:
    """The entries of ``root/manifest.jsonl``, each checked (one line naming the line that is wrong).

    Raises:
        InputError: no manifest, a line that is not a valid entry, or an entry whose files are missing.
    """
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise InputError(
            f"no {MANIFEST} in {root}; make the data folder with 'magicanimate prepare-data VIDEOS/ -o {root}'"
        )
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            entry = ManifestEntry(**data)
            if entry.kind not in KINDS or entry.split not in SPLITS or entry.frames < 1:
                raise ValueError(f"kind must be one of {KINDS}, split one of {SPLITS}, frames at least 1")
        except (ValueError, TypeError) as err:
            raise InputError(f"{path} line {number} is not a clip entry: {err}") from None
        for file in entry.files(root):
            if not file.is_file():
                raise InputError(f"{path} line {number}: {file} is missing; run prepare-data again on {root}")
        entries.append(entry)
    if not entries:
        raise InputError(f"{path} lists no clips")
    return entries


def write_manifest(root: str | Path, entries: list[ManifestEntry]) -> Path:
    """Write ``root/manifest.jsonl`` (whole, then renamed into place)."""
    from ..io.output import atomic_output

    path = Path(root) / MANIFEST
    with atomic_output(path) as temp:
        temp.write_text("".join(json.dumps(asdict(entry)) + "\n" for entry in entries), encoding="utf-8")
    return path
