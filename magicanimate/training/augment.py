"""Augmentations shared by a sample's photos and its DensePose: one random square crop and one horizontal flip.

The crop and the flip are drawn once per sample and applied to the reference, every target frame and every DensePose
frame, so image and motion stay aligned. A mirrored person's left arm is where the right arm was, so a flip also
swaps DensePose's left/right part labels (:data:`HFLIP_PARTS`); DensePose stays in label space throughout (resized
nearest-neighbour, coloured only at the end), so no label is ever blended.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..densepose.render import labels_to_rgb, resize_labels

# The fine-segmentation part index (0 = background, 1..24 = parts, as our renderings and the checkpoints use) of
# each part's mirror image. Pairs: 3/4 hands, 5/6 feet, 7/8 and 9/10 upper legs, 11/12 and 13/14 lower legs,
# 15/16 and 17/18 upper arms, 19/20 and 21/22 lower arms, 23/24 head; 1 and 2 (torso back and front) are their own
# mirror images. Source: detectron2, projects/DensePose/densepose/structures/transform_data.py,
# DensePoseTransformData.POINT_LABEL_SYMMETRIES (the table its horizontal-flip test-time augmentation applies to
# the 25 fine-segmentation channels).
HFLIP_PARTS = np.array(
    [0, 1, 2, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15, 18, 17, 20, 19, 22, 21, 24, 23], dtype=np.uint8
)
HFLIP_PARTS.flags.writeable = False

# Part labels of the face and the hands (the optional loss weight): 23/24 head, 3/4 hands (same source; DensePose
# has no separate face part, the head parts are the face and hair).
FACE_PARTS = (23, 24)
HAND_PARTS = (3, 4)


def flip_labels(labels: np.ndarray) -> np.ndarray:
    """Mirror label maps ``(..., H, W)`` left-right, swapping left and right parts."""
    return HFLIP_PARTS[np.asarray(labels, dtype=np.uint8)[..., ::-1]]


@dataclass(frozen=True)
class CropFlip:
    """A square crop ``(top, left, side)`` in source pixels, resized to ``size``, then an optional mirror."""

    top: int
    left: int
    side: int
    size: int
    flip: bool

    @classmethod
    def draw(cls, rng: np.random.Generator, height: int, width: int, size: int, scale: float, flip_p: float):
        """A random square crop of side in ``[scale, 1]`` times the shorter side, anywhere in the frame, and a flip
        with probability ``flip_p``."""
        short = min(height, width)
        side = max(1, int(round(short * rng.uniform(scale, 1.0))))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        return cls(top, left, side, size, bool(rng.random() < flip_p))

    def images(self, frames: np.ndarray) -> np.ndarray:
        """RGB frames ``(F, H, W, 3)`` (or one ``(H, W, 3)``) cropped, resized (PIL bicubic, as the pipeline resizes
        its inputs) and mirrored."""
        single = frames.ndim == 3
        out = []
        for frame in frames[None] if single else frames:
            crop = frame[self.top : self.top + self.side, self.left : self.left + self.side]
            if self.side != self.size:
                crop = np.asarray(Image.fromarray(crop).resize((self.size, self.size), Image.BICUBIC))
            out.append(crop[:, ::-1] if self.flip else crop)
        out = np.ascontiguousarray(np.stack(out))
        return out[0] if single else out

    def labels(self, labels: np.ndarray) -> np.ndarray:
        """Label maps ``(F, H, W)`` cropped, resized nearest-neighbour and mirrored with left/right swapped."""
        crop = labels[:, self.top : self.top + self.side, self.left : self.left + self.side]
        if self.side != self.size:
            crop = np.stack([resize_labels(frame, self.size, self.size) for frame in crop])
        return np.ascontiguousarray(flip_labels(crop) if self.flip else crop)


def render_control(labels: np.ndarray) -> np.ndarray:
    """The ControlNet input of label maps ``(F, H, W)``: the viridis rendering, as the motion videos show them."""
    return labels_to_rgb(labels)


def region_mask(labels: np.ndarray, parts=FACE_PARTS + HAND_PARTS) -> np.ndarray:
    """Boolean mask of the pixels whose label is one of ``parts`` (default: face and hands)."""
    return np.isin(labels, parts)
