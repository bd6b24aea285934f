"""The built-in interpolator: dense optical flow (OpenCV's DIS), both neighbours warped to time ``t``, blended where
each one can be trusted.

Two sources of motion, one per kind of picture:

* The DensePose motion, known for every frame (also the ones not animated), says how the *body* moves: the flow
  from the in-between frame's DensePose to each neighbour's is measured directly, so the warp needs no guess about
  the motion between the two neighbours (no constant-speed assumption, which fails on the hands and feet of a
  dancer). It is measured on the DensePose and applied to the animated frames, which are pictures of a person
  posed like the DensePose, not DensePose.
* Away from the body (the background, hair and clothes outside the DensePose silhouette) the DensePose is empty:
  there the flow between the two animated frames themselves is used, carried to time ``t`` at constant speed.

The blend is occlusion-aware: a neighbour's pixel counts only where it is the same point as at time ``t``. With the
DensePose, the neighbour's DensePose warped by the same flow must match the in-between DensePose (a body part that
moved away, or came into view, fails that); without it, the forward and backward flows must agree (the classic
forward-backward consistency check). Where neither neighbour can be trusted, both count as in a plain blend.
"""

import functools
from collections.abc import Sequence

import cv2
import numpy as np

from ..errors import InputError

# DensePose's background (part 0) in the viridis palette the motion is drawn with; anything far from it is body.
BACKGROUND_RGB = (68, 1, 84)
PRESETS = ("ultrafast", "fast", "medium")


class FlowInterpolator:
    """Optical-flow frame interpolation on OpenCV, guided by the DensePose motion when it is given.

    Args:
        preset: DIS optical flow's speed/accuracy preset (``ultrafast``, ``fast``, ``medium``).
        guide_tolerance: how far (RGB units) a neighbour's warped DensePose may be from the in-between one before
            the neighbour stops counting there (a soft Gaussian falloff, not a cut).
        consistency_tolerance: the same for the forward-backward flow mismatch (pixels), without DensePose.
        body_margin: pixels around the DensePose silhouette that still move with the body's flow (a person's
            outline is a little larger than their DensePose); the flow of the frames takes over beyond it.
    """

    def __init__(
        self,
        preset: str = "medium",
        guide_tolerance: float = 24.0,
        consistency_tolerance: float = 2.0,
        body_margin: int = 8,
    ):
        if preset not in PRESETS:
            raise InputError(f"flow interpolator preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        self.preset = preset
        self.guide_tolerance = float(guide_tolerance)
        self.consistency_tolerance = float(consistency_tolerance)
        self.body_margin = int(body_margin)

    def __repr__(self) -> str:
        return f"FlowInterpolator(preset={self.preset!r})"

    def __call__(self, frame0: np.ndarray, frame1: np.ndarray, t: float) -> np.ndarray:
        return self.interpolate(frame0, frame1, [t])[0]

    def interpolate(
        self, frame0: np.ndarray, frame1: np.ndarray, times: Sequence[float], motion: np.ndarray | None = None
    ) -> np.ndarray:
        """The frames at ``times`` (each in (0, 1)) between ``frame0`` and ``frame1``; ``motion`` is ``None`` or the
        DensePose of the gap, ``frame0``'s to ``frame1``'s inclusive, at the frames' size."""
        frame0, frame1 = _rgb(frame0, "frame0"), _rgb(frame1, "frame1")
        if frame0.shape != frame1.shape:
            raise InputError(f"frames to interpolate differ in size: {frame0.shape} and {frame1.shape}")
        times = [float(t) for t in times]
        if any(not 0 < t < 1 for t in times):
            raise InputError(f"interpolation times must lie in (0, 1), got {times}")
        if motion is not None:
            motion = np.asarray(motion)
            if motion.shape != (len(times) + 2, *frame0.shape):
                raise InputError(
                    f"the DensePose of a gap must be {len(times) + 2} frames of {frame0.shape}, got {motion.shape}"
                )
        dis = cv2.DISOpticalFlow_create(getattr(cv2, f"DISOPTICAL_FLOW_PRESET_{self.preset.upper()}"))

        def flow(source: np.ndarray, target: np.ndarray) -> np.ndarray:
            """``(H, W, 2)`` such that ``source[y] ~ target[y + flow[y]]``."""
            return dis.calc(_gray(source), _gray(target), None)

        image0, image1 = frame0.astype(np.float32), frame1.astype(np.float32)
        results = []
        if motion is None:
            f01, f10 = flow(frame0, frame1), flow(frame1, frame0)
            # A point of frame 0 that frame 1 does not show (the flows there disagree) is seen from frame 0 only.
            hidden_in1 = np.linalg.norm(f01 + _warp(f10, f01), axis=-1)
            hidden_in0 = np.linalg.norm(f10 + _warp(f01, f10), axis=-1)
            for t in times:
                to0, to1 = _towards(f01, t), _towards(f10, 1 - t)
                trust1 = np.exp(-((_warp(hidden_in1, to0) / self.consistency_tolerance) ** 2))
                trust0 = np.exp(-((_warp(hidden_in0, to1) / self.consistency_tolerance) ** 2))
                results.append(_blend(image0, image1, to0, to1, trust0, trust1, t))
            return np.stack(results)
        # Away from the body the frames' own flow moves things; there half the resolution does (a quarter of the
        # work), so it is measured, and carried to time t, at half size.
        small = (max(8, frame0.shape[1] // 2), max(8, frame0.shape[0] // 2))
        half0, half1 = (cv2.resize(frame, small, interpolation=cv2.INTER_AREA) for frame in (frame0, frame1))
        s01, s10 = flow(half0, half1), flow(half1, half0)
        poses = motion.astype(np.float32)
        for index, t in enumerate(times, start=1):
            pose_t = motion[index]
            body = self._body_weight(pose_t)[..., None]
            to0 = body * flow(pose_t, motion[0]) + (1 - body) * _upscaled(_towards(s01, t), frame0.shape)
            to1 = body * flow(pose_t, motion[-1]) + (1 - body) * _upscaled(_towards(s10, 1 - t), frame0.shape)
            trust0 = self._agreement(_warp(poses[0], to0) - poses[index])
            trust1 = self._agreement(_warp(poses[-1], to1) - poses[index])
            results.append(_blend(image0, image1, to0, to1, trust0, trust1, t))
        return np.stack(results)

    def _body_weight(self, pose: np.ndarray) -> np.ndarray:
        """1 on the DensePose silhouette and ``body_margin`` pixels around it, falling to 0 over as many again."""
        low, high = np.subtract(BACKGROUND_RGB, 8).clip(0, 255), np.add(BACKGROUND_RGB, 8).clip(0, 255)
        body = (cv2.inRange(pose, low.astype(np.uint8), high.astype(np.uint8)) == 0).astype(np.uint8)
        if self.body_margin <= 0:
            return body.astype(np.float32)
        size = 2 * self.body_margin + 1
        body = cv2.dilate(body, cv2.getStructuringElement(cv2.MORPH_RECT, (size, size)))
        return cv2.blur(body.astype(np.float32), (size, size))

    def _agreement(self, difference: np.ndarray) -> np.ndarray:
        """Gaussian trust in a warp from how far the warped DensePose is from the target one, smoothed a little so
        that the chroma noise of H.264 at part borders does not flip it pixel by pixel."""
        squared = cv2.blur(np.einsum("...c,...c->...", difference, difference), (3, 3))
        return np.exp(-squared / self.guide_tolerance**2)


def _towards(flow: np.ndarray, t: float, steps: int = 3) -> np.ndarray:
    """The offset from time ``t`` back to the flow's source frame at constant speed: the point at ``y`` at time
    ``t`` was at ``x`` with ``x + t * flow(x) = y``, a fixed point found in a few steps (the plain ``-t * flow(y)``
    is off by how much the flow changes along the way)."""
    offset = -t * flow
    for _ in range(steps):
        offset = -t * _warp(flow, offset)
    return offset


def _warp(image: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``image`` sampled at ``y + offset[y]`` (bilinear; outside the frame, the nearest edge pixel)."""
    return cv2.remap(image, _grid(*offset.shape[:2]) + offset, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


@functools.lru_cache(maxsize=4)
def _grid(height: int, width: int) -> np.ndarray:
    """Pixel coordinates ``(H, W, 2)`` (x, y), read-only: shared by every warp at this size."""
    grid = np.stack(np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)), -1)
    grid.flags.writeable = False
    return grid


def _upscaled(offset: np.ndarray, shape: tuple) -> np.ndarray:
    """An offset field measured at a smaller size, at ``shape``'s size and in its pixels."""
    height, width = shape[:2]
    factor = np.array([width / offset.shape[1], height / offset.shape[0]], np.float32)
    return cv2.resize(offset, (width, height), interpolation=cv2.INTER_LINEAR) * factor


def _blend(image0, image1, to0, to1, trust0, trust1, t: float) -> np.ndarray:
    """Both neighbours warped to time ``t`` and weighted by how near they are in time and how far each can be
    trusted per pixel; where neither can (both trusts near 0), the small floor leaves the time-weighted blend."""
    weight0, weight1 = (1 - t) * (trust0 + 1e-3), t * (trust1 + 1e-3)
    blended = _warp(image0, to0) * weight0[..., None] + _warp(image1, to1) * weight1[..., None]
    return np.clip(blended / (weight0 + weight1)[..., None] + 0.5, 0, 255).astype(np.uint8)


def _gray(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)


def _rgb(frame, name: str) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise InputError(f"{name} must be a uint8 RGB array (H, W, 3), got {frame.dtype} {frame.shape}")
    return frame
