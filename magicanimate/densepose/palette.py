"""The exact colours of MagicAnimate's driving videos, and a measure of how DensePose-like a frame is.

The checkpoints were trained on detectron2's fine-segmentation "semantic map" rendering: part index I in 0..24
coloured with OpenCV's ``COLORMAP_VIRIDIS`` at ``uint8(I * 255 / 24)``, alpha 1, background I = 0 (purple). The
table is written out (and checked against OpenCV in the tests) so that reading and rendering motion needs no cv2.
"""

import numpy as np

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
    image on black; use it to reject a `--motion` video that is not in the expected format. `stride` subsamples
    pixels for speed.
    """
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an RGB frame (H, W, 3), got shape {frame.shape}")
    _, distance = nearest_labels(frame[::stride, ::stride])
    return float((distance <= tolerance).mean())
