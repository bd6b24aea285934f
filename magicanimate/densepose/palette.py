"""The exact colours of MagicAnimate's driving videos, and a measure of how DensePose-like a frame is.

The checkpoints were trained on detectron2's fine-segmentation "semantic map" rendering: part index I in 0..24
coloured with OpenCV's ``COLORMAP_VIRIDIS`` at ``uint8(I * 255 / 24)``, alpha 1, background I = 0 (purple). The
table is written out (and checked against OpenCV in the tests) so that reading and rendering motion needs no cv2.
"""

import numpy as np

from ..errors import InputError

NUM_LABELS = 25  # background + 24 DensePose parts

# RGB of cv2.applyColorMap(uint8(arange(25) * 255 / 24), COLORMAP_VIRIDIS); row I is part I, row 0 the background.
LUT = np.array(
    [
        (68, 1, 84), (71, 16, 99), (72, 31, 112), (71, 44, 122), (68, 57, 131), (64, 70, 136), (59, 81, 139),
        (54, 93, 141), (49, 104, 142), (44, 113, 142), (40, 124, 142), (37, 133, 142), (33, 144, 141),
        (31, 154, 138), (32, 163, 134), (39, 173, 129), (53, 183, 121), (70, 192, 111), (92, 200, 99),
        (115, 208, 86), (142, 214, 69), (170, 220, 50), (197, 224, 33), (226, 228, 24), (253, 231, 37),
    ],
    dtype=np.uint8,
)  # fmt: skip
LUT.flags.writeable = False

# Decoded H.264 (yuv420p) moves colours a few units; part borders, where chroma is subsampled, move further. On the
# original sample videos 93-97% of all pixels lie within 12 units of an entry; on photos only a small share does.
DEFAULT_TOLERANCE = 12.0


def nearest_labels(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest palette entry of every pixel of an RGB frame `(H, W, 3)`: ``(labels uint8 (H, W), distance (H, W))``.

    The distance is Euclidean in RGB units. Reading a DensePose video back into part labels is this function.
    """
    frame = np.asarray(frame)
    r, g, b = (frame[..., c].astype(np.int32) for c in range(3))
    best = np.full(frame.shape[:2], np.iinfo(np.int32).max, np.int32)
    labels = np.zeros(frame.shape[:2], np.uint8)
    for label, (cr, cg, cb) in enumerate(LUT.astype(np.int32)):  # 25 passes over three planes: no (H, W, 25) array
        squared = (r - cr) ** 2 + (g - cg) ** 2 + (b - cb) ** 2
        closer = squared < best
        best[closer], labels[closer] = squared[closer], label
    return labels, np.sqrt(best)


def palette_share(frame: np.ndarray, tolerance: float = DEFAULT_TOLERANCE, stride: int = 1) -> float:
    """Share of the pixels of an RGB frame that lie within `tolerance` RGB units of a palette colour.

    About 0.9 or more for a MagicAnimate DensePose frame (even after H.264), low for a photo or a skeleton pose
    image on black; :func:`densepose_share` averages it over a clip. `stride` subsamples
    pixels for speed.
    """
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an RGB frame (H, W, 3), got shape {frame.shape}")
    _, distance = nearest_labels(frame[::stride, ::stride])
    return float((distance <= tolerance).mean())


# ---------------------------------------------------------------------------------------------------- the check

# Below this share of pixels near the palette a clip is not a DensePose rendering. Renderings score 0.93-0.97 at
# 512 px even after H.264, and small ones less (at 64 px chroma-blurred part borders are a larger part of the
# frame); photos and ordinary videos score under 0.3. One threshold for everything that asks (``animate``'s
# ``check_motion``, ``batch``'s raw-or-DensePose decision, the demo), so no two of them disagree about a clip.
MOTION_PALETTE_SHARE = 0.5
SAMPLE_FRAMES = 8  # frames spread over the clip that the check looks at
NOT_DENSEPOSE_HINT = (
    "for a video of a person use --driving instead of --motion (or `magicanimate densepose` first); "
    "--no-check-motion skips this check"
)


def sample_indices(count: int) -> range:
    """Indices of the frames the check looks at in a clip of ``count``: up to :data:`SAMPLE_FRAMES` spread over it
    (every ``count // 8``-th from the first), so a title card at the start does not decide alone. Picking from the
    picked frames again gives them all back, so callers may pass either the clip or :func:`sample_video`'s frames."""
    return range(0, count, max(1, count // SAMPLE_FRAMES))[:SAMPLE_FRAMES]


def densepose_share(frames) -> float:
    """Mean :func:`palette_share` of the sampled frames of a clip ``(F, H, W, 3)`` (or one frame ``(H, W, 3)``).

    Pixels are subsampled to about 128 per side: the share is a property of the whole frame, and this keeps the
    check to milliseconds for 4K clips.
    """
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected RGB frames (F, H, W, 3), got shape {frames.shape}")
    stride = max(1, min(frames.shape[1:3]) // 128)
    return float(np.mean([palette_share(frames[i], stride=stride) for i in sample_indices(len(frames))]))


def looks_like_densepose(frames) -> bool:
    """Whether a clip is a DensePose rendering (at least :data:`MOTION_PALETTE_SHARE` of its pixels on the palette)
    rather than a raw video of a person. The same verdict as :func:`check_motion`."""
    return densepose_share(frames) >= MOTION_PALETTE_SHARE


def check_motion(frames, name: str = "the motion", hint: str = NOT_DENSEPOSE_HINT) -> None:
    """Refuse motion frames that are not a DensePose rendering (a raw video of a person passed as motion), before
    the models spend minutes animating noise. ``hint`` is the front end's way out (a flag, a form field).

    Raises:
        InputError: fewer than :data:`MOTION_PALETTE_SHARE` of the sampled pixels have DensePose colours.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        return  # not frames at all: the pipeline's own check names that problem
    share = densepose_share(frames)
    if share < MOTION_PALETTE_SHARE:
        raise InputError(
            f"{name} is not a DensePose video (only {share:.0%} of its pixels have DensePose colours, renderings have "
            f"over 90%); {hint}"
        )


def sample_video(path, max_frames: int | None = None) -> np.ndarray:
    """The frames of a video file that :func:`check_motion` would look at in its first ``max_frames`` frames,
    decoded one at a time and dropped unless sampled, so checking a long clip costs no memory (``batch`` checks
    every job's clip before the models load). The frame count comes from the header, else from counting packets.

    Raises:
        InputError: the file is missing, is not a video or has no decodable frame.
    """
    from ..io.video import iter_frames, open_video

    container, stream = open_video(path)
    with container:
        count = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    if max_frames is not None:
        count = min(count, max_frames)
    wanted = set(sample_indices(max(count, 1)))
    frames = [frame for index, frame in enumerate(iter_frames(path, max(wanted) + 1)) if index in wanted]
    return np.stack(frames)
