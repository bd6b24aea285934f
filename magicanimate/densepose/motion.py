"""From a raw video of a person to MagicAnimate's driving sequence, streamed.

One pass decodes the video frame by frame and keeps only what DensePose found (boxes and small uint8 label maps,
never the decoded frames); the decisions that need the whole clip (which person, where the window goes, the
reference alignment) are then made, and the output frames are produced one at a time: resampled to the target
frame rate, framed, smoothed over time and coloured.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io import VideoWriter
from ..io.video import iter_frames, open_video, stream_fps
from . import align
from .extractor import Extractor, load_extractor
from .framing import PERSON_MODES, crop_windows, frame_labels, select_persons, window_boxes
from .person import union_box
from .render import labels_to_rgb
from .resample import resample_indices
from .smoothing import FlipCounter, hold_last, majority_filter

DEFAULT_SMOOTH = 3  # frames of the per-pixel majority: removes one-frame flips, keeps fast limbs


def _probe(path) -> tuple[float, int | None]:
    """Frame rate and (when the header knows it) frame count, without decoding."""
    container, stream = open_video(path)
    with container:
        return stream_fps(stream), stream.frames or None


@dataclass
class MotionLabels:
    """The planned output: `frames` yields ``(size, size)`` uint8 label maps, `count` of them at `fps`.

    `stats` holds ``detected`` (share of source frames with a person) and ``source_frames``; once `frames` is
    exhausted also ``flip_rate_raw`` and ``flip_rate``: label flips per pixel per second before and after the
    temporal smoothing.
    """

    frames: Iterator[np.ndarray]
    fps: float
    count: int
    stats: dict = field(default_factory=dict)


def motion_labels(
    video_path,
    extractor: Extractor,
    *,
    size: int = 512,
    fps: float | None = 25.0,
    person: str = "largest",
    smooth: int = DEFAULT_SMOOTH,
    align_to=None,
    reference_box_xyxy=None,
    max_frames: int | None = None,
    progress: bool = True,
) -> MotionLabels:
    """Run `extractor` over the video and plan the output sequence (see :func:`extract_motion`)."""
    from tqdm.auto import tqdm

    if size < 8:
        raise InputError(f"size must be at least 8, got {size}")
    if max_frames is not None and max_frames < 1:
        raise InputError(f"max_frames must be at least 1, got {max_frames}")
    if person not in PERSON_MODES:
        raise InputError(f"person must be one of {', '.join(PERSON_MODES)}, got {person!r}")
    target = None  # the reference person's box, measured first so a bad reference fails before the long pass
    if align_to is not None:
        target = align.reference_box(align_to, extractor, size, reference_box_xyxy)
    elif reference_box_xyxy is not None:
        raise InputError("a reference box needs the reference image it was measured on (--align-to-reference)")
    fps_in, total = _probe(video_path)
    fps_out = fps or fps_in
    limit = None if max_frames is None else math.ceil(max_frames * fps_in / fps_out) + 1
    total = min(total, limit) if total and limit else total or limit
    found = []
    with tqdm(total=total, desc="DensePose", unit="frame", disable=not progress) as bar:
        for persons in extractor.extract(iter_frames(video_path, limit)):
            found.append(persons)
            bar.update()
    chosen = hold_last(select_persons(found, person, max_gap=max(round(fps_in), 1)))  # tracks survive 1 s gaps
    boxes = np.stack([union_box(persons) for persons in chosen])
    windows = crop_windows(boxes, fps_in)
    index = resample_indices(len(chosen), fps_in, fps_out)[:max_frames]
    transform = (1.0, 0.0, 0.0)
    if target is not None:
        driving = np.median(window_boxes(boxes, windows, size)[index], axis=0)
        transform = align.box_alignment(driving, target)

    stats = {"detected": sum(bool(p) for p in found) / len(found), "source_frames": len(found)}
    raw, smoothed = FlipCounter(), FlipCounter()

    def generate():
        labels = (raw.update(frame_labels(chosen[i], windows[i], size, transform)) for i in index)
        for frame in majority_filter(labels, smooth):
            yield smoothed.update(frame)
        stats["flip_rate_raw"], stats["flip_rate"] = raw.rate(fps_out), smoothed.rate(fps_out)

    return MotionLabels(generate(), fps_out, len(index), stats)


def plan_motion(
    video_path,
    *,
    model=None,
    size: int = 512,
    fps: float | None = 25.0,
    person: str = "largest",
    smooth: int = DEFAULT_SMOOTH,
    align_to=None,
    reference_box=None,
    channel_order: str = "BGR",
    device: str = "auto",
    detectron2_config=None,
    max_frames: int | None = None,
    progress: bool = True,
) -> MotionLabels:
    """Load the extractor for `model` and plan the driving sequence of `video_path` (label maps, streamed).

    Args:
        video_path: any video PyAV reads (phone rotation is applied).
        model: TorchScript file (default: ``$MAGICANIMATE_DENSEPOSE_MODEL``, else fetched from the hub when
            online), detectron2 weights together with `detectron2_config`, or an extractor object.
        size: side of the square output (512, as the checkpoints were trained).
        fps: output frame rate (25, as trained); None keeps the source's.
        person: ``largest`` / ``score`` (one tracked person) or ``all``.
        smooth: frames of the per-pixel temporal majority (1 = off).
        align_to: reference image; scales and centres the motion onto the person in it. `reference_box`
            (xyxy in its pixels) replaces detecting that person.
        channel_order: channel order the TorchScript model gets (BGR, see :class:`TorchScriptExtractor`).
        max_frames: stop after this many output frames.

    Raises:
        InputError: unreadable video or reference, or no person in it. CheckpointError: no usable model.
    """
    _probe(video_path)  # a missing or unreadable video fails before the model loads
    extractor = load_extractor(
        model, device=device, channel_order=channel_order, label_cap=size, detectron2_config=detectron2_config
    )
    return motion_labels(
        video_path,
        extractor,
        size=size,
        fps=fps,
        person=person,
        smooth=smooth,
        align_to=align_to,
        reference_box_xyxy=reference_box,
        max_frames=max_frames,
        progress=progress,
    )


def extract_motion(
    video_path,
    *,
    model=None,
    size: int = 512,
    fps: float | None = 25.0,
    person: str = "largest",
    smooth: int = DEFAULT_SMOOTH,
    align_to=None,
    reference_box=None,
    channel_order: str = "BGR",
    device: str = "auto",
    detectron2_config=None,
    max_frames: int | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, float]:
    """A raw video of a person -> MagicAnimate's driving frames ``(F, size, size, 3)`` uint8 RGB and their fps.

    What ``magicanimate animate --driving`` runs; the arguments are :func:`plan_motion`'s. The label maps of the
    whole clip are small, the returned RGB frames are the clip at output size (what the animation needs anyway).
    """
    plan = plan_motion(
        video_path,
        model=model,
        size=size,
        fps=fps,
        person=person,
        smooth=smooth,
        align_to=align_to,
        reference_box=reference_box,
        channel_order=channel_order,
        device=device,
        detectron2_config=detectron2_config,
        max_frames=max_frames,
        progress=progress,
    )
    return np.stack([labels_to_rgb(labels) for labels in plan.frames]), plan.fps


def write_motion(video_path, output, *, crf: int = 18, **options) -> tuple[Path, MotionLabels]:
    """:func:`plan_motion` streamed into an H.264 mp4 at `output` (written atomically, one frame in memory at a
    time); returns the path and the plan, whose ``stats`` then hold the flicker before and after smoothing."""
    plan = plan_motion(video_path, **options)
    with VideoWriter(output, fps=plan.fps, crf=crf) as writer:
        for labels in plan.frames:
            writer.write(labels_to_rgb(labels))
    return Path(output), plan
