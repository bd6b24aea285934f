"""``magicanimate prepare-data VIDEOS/ -o DATA/``: raw videos of people -> training clips (see :mod:`.manifest`).

For each video: split at scene cuts (:mod:`.scenes`); per scene, find the person with our DensePose backends and
keep the tracked one (:func:`~magicanimate.densepose.framing.select_persons`), frame them with the same steady
square window as ``magicanimate densepose`` (:func:`~magicanimate.densepose.framing.crop_windows`), resample to 25
fps and write the photo frames and the DensePose frames through that window: exactly the motion format ``animate``
is driven by, and the matching real frames. Still images (``.png``, ``.jpg``, ``.webp``) become one-frame entries.

With ``--cache-latents --pretrained TREE`` each clip also gets ``latents.safetensors``: the VAE latent
distribution of every frame (:mod:`.latents`), for training with ``cached_latents`` (no VAE encoder per sample).

Every clip folder is written whole or not at all, so a rerun after a crash skips the finished clips and redoes the
rest (with ``--cache-latents``, a clip is finished when it has latents of that VAE too: a clip prepared earlier
without them, or with another VAE's, gets them added, its other files untouched). A video that cannot be read (or
has no person) is reported and skipped; the others go on. The manifest is rebuilt at the end from every finished
clip, with a held-out validation split that stays put across reruns.
"""

import argparse
import hashlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..settings import Setting, SettingError

log = logging.getLogger("magicanimate")

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif", ".m4v")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CLIPS = "clips"

OPTIONS = {
    "size": Setting("size", int, 512, "side of the square clips", "prepare", low=64, high=4096),
    "fps": Setting("fps", float, 25.0, "frame rate of the clips", "prepare", above=0, high=1000),
    "min_frames": Setting("min_frames", int, 16, "shortest clip kept, in frames", "prepare", low=1, high=100000),
    "scene_threshold": Setting(
        "scene_threshold", float, 0.5, "histogram distance that starts a new scene", "prepare", above=0, high=1
    ),
    "min_coverage": Setting(
        "min_coverage", float, 0.5, "share of a scene's frames with the person detected", "prepare", low=0, high=1
    ),
    "smooth": Setting("smooth", int, 3, "frames of the DensePose temporal majority", "prepare", low=1, high=255),
    "val_clips": Setting("val_clips", int, 1, "clips held out for validation", "prepare", low=0, high=100000),
    "crf": Setting("crf", int, 18, "H.264 quality of the clips", "prepare", low=0, high=51),
}


def add_parser(commands) -> argparse.ArgumentParser:
    """Register ``prepare-data`` on the ``magicanimate`` subcommands."""
    parser = commands.add_parser(
        "prepare-data",
        help="turn a folder of raw videos into training clips (DensePose, framing, 25 fps, manifest)",
        description="Turn a folder of raw videos of people (and still images) into a training data folder: scene "
        "split, one tracked person framed square, DensePose in animate's motion format, 25 fps, a manifest with a "
        "validation split. Rerun after a crash to finish: finished clips are skipped.",
    )
    parser.add_argument("videos", metavar="VIDEOS", help="folder of videos (mp4, mov, webm, ...) and images")
    parser.add_argument("-o", "--output", required=True, help="the data folder to write (DATA/)")
    parser.add_argument(
        "--model",
        default=None,
        help="DensePose TorchScript file (default: $MAGICANIMATE_DENSEPOSE_MODEL, else fetched from the hub), or "
        "detectron2 weights with --detectron2-config",
    )
    parser.add_argument("--detectron2-config", default=None, help="use detectron2 + DensePose with this config")
    parser.add_argument("--channel-order", choices=("BGR", "RGB"), default="BGR", help="fed to the TorchScript model")
    parser.add_argument("--device", default="auto", help="DensePose (and VAE) device: auto, cpu, cuda, cuda:1")
    parser.add_argument("--person", choices=("largest", "score"), default="largest", help="which tracked person")
    for name, option in OPTIONS.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=_number,
            default=option.default,
            help=f"{option.help} (default: {option.default})",
        )
    parser.add_argument(
        "--cache-latents",
        action="store_true",
        help="also write each clip's VAE latents (latents.safetensors, float16 mean and std of every frame) for "
        "`train --cached-latents`; needs --pretrained. On a rerun, clips without them get them added",
    )
    parser.add_argument(
        "--pretrained",
        default=None,
        help="with --cache-latents: the tree whose VAE encodes the frames (the release tree, a converted folder, or "
        "a VAE folder such as sd-vae-ft-mse/); the one you train from",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.set_defaults(run=_run_and_report)
    return parser


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def check_options(args) -> None:
    """The numeric flags as their types, within their bounds (one ``error:`` line otherwise)."""
    for name, option in OPTIONS.items():
        value = getattr(args, name, option.default)
        try:
            setattr(args, name, option.check(value))
        except SettingError:
            raise InputError(f"--{name.replace('_', '-')} must be {option.allowed()}, got {value!r}") from None


def _run_and_report(args) -> int:
    check_options(args)
    report = prepare_data(
        args.videos,
        args.output,
        model=args.model,
        detectron2_config=args.detectron2_config,
        channel_order=args.channel_order,
        device=args.device,
        person=args.person,
        cache_latents=args.cache_latents,
        pretrained=args.pretrained,
        progress=args.progress,
        debug=args.debug,
        **{name: getattr(args, name) for name in OPTIONS},
    )
    print(report.summary())
    return 0


@dataclass
class PrepareReport:
    """What a run did: clips written and skipped (finished earlier), earlier clips given latents, scenes left out,
    and the failed inputs."""

    manifest: Path
    written: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    latents_added: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    train: int = 0
    val: int = 0

    def summary(self) -> str:
        text = (
            f"prepare-data: {len(self.written)} clips written, {len(self.finished)} already finished, "
            + (f"{len(self.latents_added)} earlier clips given cached latents, " if self.latents_added else "")
            + f"{len(self.left_out)} scenes left out; manifest {self.manifest} ({self.train} train, {self.val} val)"
        )
        if self.failed:
            text += f"; warning: {len(self.failed)} inputs failed and were skipped: {', '.join(sorted(self.failed))}"
        return text


@dataclass
class Scene:
    """Frames ``start .. end - 1`` of a video, written as the clip ``name``."""

    name: str
    start: int
    end: int
    persons: list = field(default_factory=list)  # per source frame, filled by the DensePose pass


def prepare_data(
    videos,
    output,
    *,
    model=None,
    detectron2_config=None,
    channel_order: str = "BGR",
    device: str = "auto",
    person: str = "largest",
    size: int = 512,
    fps: float = 25.0,
    min_frames: int = 16,
    scene_threshold: float = 0.5,
    min_coverage: float = 0.5,
    smooth: int = 3,
    val_clips: int = 1,
    crf: int = 18,
    cache_latents: bool = False,
    pretrained=None,
    progress: bool = True,
    debug: bool = False,
) -> PrepareReport:
    """Prepare every video and image in ``videos`` into ``output`` (see the module docstring); ``model`` is a
    DensePose file or an extractor object (tests pass a stand-in). ``cache_latents``: also write each clip's VAE
    latents, with the VAE of the tree ``pretrained``.

    Raises:
        InputError: ``videos`` is not a folder or holds nothing to prepare; ``output`` is a file or inside
            ``videos``; ``cache_latents`` without ``pretrained`` (or the reverse). CheckpointError: no DensePose
            model, or no usable VAE in ``pretrained``. (A bad input video is reported, not raised.)
    """
    from tqdm.auto import tqdm

    from ..densepose.extractor import load_extractor

    videos, output = Path(videos), Path(output)
    if not videos.is_dir():
        raise InputError(f"VIDEOS must be a folder of videos, got {videos}")
    inputs = sorted(p for p in videos.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES)
    if not inputs:
        raise InputError(f"{videos} holds no videos or images ({', '.join(VIDEO_SUFFIXES + IMAGE_SUFFIXES)})")
    if output.exists() and not output.is_dir():
        raise InputError(f"the data folder {output} is a file; choose another -o")
    if output.resolve().is_relative_to(videos.resolve()):
        raise InputError(f"the data folder {output} is inside {videos}; choose a folder outside it")
    if cache_latents and pretrained is None:
        raise InputError("--cache-latents needs --pretrained TREE: the tree whose VAE encodes the frames")
    if pretrained is not None and not cache_latents:
        raise InputError("--pretrained is only read with --cache-latents; add --cache-latents, or leave it out")
    if cache_latents and size % 8:
        raise InputError(f"--cache-latents needs --size a multiple of 8 (the VAE's factor, as training), got {size}")
    encoder = None
    if cache_latents:
        from .latents import LatentEncoder

        encoder = LatentEncoder.load(pretrained, device=device, progress=progress)
    extractor = load_extractor(
        model, device=device, channel_order=channel_order, label_cap=size, detectron2_config=detectron2_config
    )
    (output / CLIPS).mkdir(parents=True, exist_ok=True)
    report = PrepareReport(manifest=output / "manifest.jsonl")
    options = dict(
        size=size,
        fps=fps,
        min_frames=min_frames,
        scene_threshold=scene_threshold,
        min_coverage=min_coverage,
        smooth=smooth,
        crf=crf,
        person=person,
        progress=progress,
        encoder=encoder,
    )
    for path in tqdm(inputs, desc="prepare-data", unit="input", disable=not progress):
        try:
            if path.suffix.lower() in IMAGE_SUFFIXES:
                prepare_image(path, output, extractor, report, size=size, encoder=encoder)
            else:
                prepare_video(path, output, extractor, report, **options)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 - one bad input is reported and skipped, never fatal
            if debug:
                import traceback

                traceback.print_exc()
            report.failed[path.name] = _reason(err)
            tqdm.write(f"warning: skipped {path.name}: {report.failed[path.name]}", file=sys.stderr)
    entries = write_split_manifest(output, val_clips)
    report.train = sum(entry.split == "train" for entry in entries)
    report.val = len(entries) - report.train
    return report


def _reason(err: BaseException) -> str:
    from ..errors import MagicAnimateError

    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if isinstance(err, MagicAnimateError) else f"{type(err).__name__}: {text}"


def clip_name(source: Path, index: int) -> str:
    """The clip folder of scene ``index`` of ``source`` (its name, made safe; the suffix keeps a.mp4 and a.mov
    apart)."""
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in source.stem)
    return f"{stem}-{source.suffix.lstrip('.').lower()}-{index:03d}"


def prepare_video(
    path: Path,
    output: Path,
    extractor,
    report: PrepareReport,
    *,
    size,
    fps,
    min_frames,
    scene_threshold,
    min_coverage,
    smooth,
    crf,
    person,
    progress,
    encoder=None,
) -> None:
    """Split one video into scenes and write the scenes that are not finished yet (with ``encoder``, a
    :class:`~.latents.LatentEncoder`, with their latents; finished clips without them get them)."""
    from tqdm.auto import tqdm

    from ..densepose.resample import resample_indices
    from ..io import iter_frames, probe_fps
    from .scenes import scene_ranges

    fps_in = probe_fps(path)
    scenes = []
    for index, (start, end) in enumerate(scene_ranges(iter_frames(path), scene_threshold)):
        name = clip_name(path, index)
        count = len(resample_indices(end - start, fps_in, fps))
        if finish_clip(output / CLIPS / name, encoder, report):  # finished earlier (latents added if missing)
            continue
        if count < min_frames:
            report.left_out.append(f"{name} (only {count} frames)")
        else:
            scenes.append(Scene(name, start, end))
    if not scenes:
        return
    wanted = {i: scene for scene in scenes for i in range(scene.start, scene.end)}
    frames = (frame for i, frame in enumerate(iter_frames(path)) if i in wanted)
    bar = tqdm(total=len(wanted), desc=f"DensePose {path.name}", unit="frame", disable=not progress, leave=False)
    for i, persons in zip(sorted(wanted), extractor.extract(frames), strict=True):  # results come in frame order
        wanted[i].persons.append(persons)
        bar.update()
    bar.close()
    decoded = enumerate(iter_frames(path))
    for scene in scenes:
        detected = sum(bool(p) for p in scene.persons) / max(len(scene.persons), 1)
        if detected < min_coverage:
            report.left_out.append(f"{scene.name} (person in {detected:.0%} of frames)")
            continue
        write_clip(
            scene,
            decoded,
            path,
            output,
            detected,
            size=size,
            fps_in=fps_in,
            fps=fps,
            smooth=smooth,
            crf=crf,
            person=person,
            encoder=encoder,
        )
        report.written.append(scene.name)


def write_clip(
    scene: Scene,
    decoded,
    source: Path,
    output: Path,
    detected: float,
    *,
    size,
    fps_in,
    fps,
    smooth,
    crf,
    person,
    encoder=None,
) -> None:
    """Frame the scene's person and write its clip folder (``frames.mp4``, ``densepose.mp4``, ``meta.json``, with
    ``encoder`` also ``latents.safetensors`` of the written ``frames.mp4``), whole or not at all; ``decoded`` is the
    video's ``(index, frame)`` iterator, read up to the scene's end."""
    import numpy as np

    from ..densepose.framing import crop_windows, frame_labels, select_persons, window_boxes
    from ..densepose.person import union_box
    from ..densepose.render import labels_to_rgb
    from ..densepose.resample import resample_indices
    from ..densepose.smoothing import hold_last, majority_filter
    from ..io import VideoWriter
    from ..io.output import atomic_output
    from .augment import FACE_PARTS, HAND_PARTS

    chosen = hold_last(select_persons(scene.persons, person, max_gap=max(round(fps_in), 1)))
    boxes = np.stack([union_box(persons) for persons in chosen])
    windows = crop_windows(boxes, fps_in)
    index = resample_indices(len(chosen), fps_in, fps)
    labels = majority_filter((frame_labels(chosen[i], windows[i], size) for i in index), smooth)
    stats = {"foreground": [], "face": [], "hand": []}
    with atomic_output(output / CLIPS / scene.name, folder=True) as temp:
        with (
            VideoWriter(temp / "frames.mp4", fps=fps, crf=crf) as images,
            VideoWriter(temp / "densepose.mp4", fps=fps, crf=crf) as motion,
        ):
            for image, label in zip(_framed(decoded, scene, index, windows, size), labels, strict=True):
                images.write(image)
                motion.write(labels_to_rgb(label))
                stats["foreground"].append(float((label > 0).mean()))
                stats["face"].append(float(np.isin(label, FACE_PARTS).mean()))
                stats["hand"].append(float(np.isin(label, HAND_PARTS).mean()))
        meta = {
            "kind": "video",
            "source": source.name,
            "source_frames": [scene.start, scene.end],
            "source_fps": fps_in,
            "fps": fps,
            "frames": len(index),
            "size": size,
            "boxes": np.round(window_boxes(boxes, windows, size)[index], 1).tolist(),
            "coverage": round(detected, 4),
            "foreground": round(float(np.mean(stats["foreground"])), 4),
            "face_area": round(float(np.mean(stats["face"])), 4),
            "hand_area": round(float(np.mean(stats["hand"])), 4),
        }
        if encoder is not None:
            encoder.write(temp, len(index), size, name=scene.name)
            meta["latents"] = encoder.record()
        (temp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def _framed(decoded, scene: Scene, index, windows, size: int):
    """The scene's output frames: source frame ``scene.start + index[k]`` seen through its window, ``size``
    square (outside the video: black), read from the shared ``decoded`` iterator."""
    current, frame = -1, None
    for k in index:
        wanted = scene.start + int(k)
        while current < wanted:
            current, frame = next(decoded)
        yield crop_square(frame, windows[int(k)], size)


def crop_square(frame, window, size: int):
    """The square ``window`` ``(cx, cy, side)`` of an RGB frame, resized to ``size`` (area averaging down, cubic
    up), padded with black where it leaves the frame: the same geometry as the DensePose labels through it."""
    import cv2
    import numpy as np

    cx, cy, side = window
    side = max(int(round(side)), 1)
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    height, width = frame.shape[:2]
    canvas = np.zeros((side, side, 3), np.uint8)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + side, width), min(y0 + side, height)
    if sx0 < sx1 and sy0 < sy1:
        canvas[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = frame[sy0:sy1, sx0:sx1]
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return cv2.resize(canvas, (size, size), interpolation=interpolation) if side != size else canvas


def prepare_image(path: Path, output: Path, extractor, report: PrepareReport, *, size: int, encoder=None) -> None:
    """One still image -> ``image.png`` + ``densepose.png`` framed around its largest person."""
    import numpy as np
    from PIL import Image

    from ..densepose.framing import crop_windows, frame_labels, select_persons
    from ..densepose.person import union_box
    from ..densepose.render import labels_to_rgb
    from ..io import load_image
    from ..io.output import atomic_output
    from .augment import FACE_PARTS, HAND_PARTS

    name = clip_name(path, 0)
    if finish_clip(output / CLIPS / name, encoder, report):
        return
    frame = np.asarray(load_image(path))
    persons = select_persons([next(iter(extractor.extract([frame])))], "largest")[0]
    if not persons:
        report.left_out.append(f"{name} (no person)")
        return
    window = crop_windows(union_box(persons)[None], 1.0)[0]
    labels = frame_labels(persons, window, size)
    with atomic_output(output / CLIPS / name, folder=True) as temp:
        Image.fromarray(crop_square(frame, window, size)).save(temp / "image.png")
        Image.fromarray(labels_to_rgb(labels)).save(temp / "densepose.png")
        meta = {
            "kind": "image",
            "source": path.name,
            "fps": 0.0,
            "frames": 1,
            "size": size,
            "coverage": 1.0,
            "foreground": round(float((labels > 0).mean()), 4),
            "face_area": round(float(np.isin(labels, FACE_PARTS).mean()), 4),
            "hand_area": round(float(np.isin(labels, HAND_PARTS).mean()), 4),
        }
        if encoder is not None:
            encoder.write(temp, 1, size, name=name)
            meta["latents"] = encoder.record()
        (temp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    report.written.append(name)


def finish_clip(folder: Path, encoder, report: PrepareReport) -> bool:
    """Whether an earlier run finished the clip ``folder`` (its ``meta.json`` is written last). With ``encoder``, a
    clip whose latents are missing or of another VAE gets them now (``latents.safetensors``, then ``meta.json``,
    each replaced whole), its other files untouched."""
    from ..io.output import atomic_output
    from .latents import LATENTS_FILE, latents_info

    if not (folder / "meta.json").is_file():
        return False
    if encoder is None:
        report.finished.append(folder.name)
        return True
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    info = latents_info(folder / LATENTS_FILE)
    if (
        meta.get("latents", {}).get("vae_fingerprint") == encoder.fingerprint
        and info is not None
        and info.get("vae_fingerprint") == encoder.fingerprint
        and info["shape"][0] == int(meta["frames"])
    ):
        report.finished.append(folder.name)
        return True
    encoder.write(folder, int(meta["frames"]), int(meta["size"]), name=folder.name)
    meta["latents"] = encoder.record()
    with atomic_output(folder / "meta.json") as temp:
        temp.write_text(json.dumps(meta), encoding="utf-8")
    report.latents_added.append(folder.name)
    return True


def write_split_manifest(output: Path, val_clips: int):
    """Rebuild ``manifest.jsonl`` from every finished clip folder. The validation split keeps the clips an
    earlier manifest held out (when still there); others are added in a fixed order (by a hash of the name) up to
    ``val_clips`` video clips, always leaving one clip to train on."""
    from .manifest import MANIFEST, ManifestEntry, write_manifest

    metas = {}
    for folder in sorted((output / CLIPS).iterdir()):
        if folder.is_dir() and (folder / "meta.json").is_file():
            metas[folder.name] = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    earlier = set()
    if (output / MANIFEST).is_file():
        for line in (output / MANIFEST).read_text(encoding="utf-8").splitlines():
            if line.strip():
                entry = json.loads(line)
                if entry.get("split") == "val":
                    earlier.add(entry.get("name"))
    videos = [name for name, meta in metas.items() if meta["kind"] == "video"]
    ranked = sorted(videos, key=lambda name: (name not in earlier, hashlib.sha1(name.encode()).hexdigest()))
    val = set(ranked[: min(val_clips, max(len(metas) - 1, 0))])
    entries = [
        ManifestEntry(
            name=name,
            path=f"{CLIPS}/{name}",
            kind=meta["kind"],
            frames=int(meta["frames"]),
            fps=float(meta["fps"]),
            size=int(meta["size"]),
            split="val" if name in val else "train",
            source=meta.get("source", ""),
        )
        for name, meta in metas.items()
    ]
    if entries:
        write_manifest(output, entries)
    return entries
