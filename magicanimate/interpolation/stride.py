"""Animate every k-th frame, interpolate the rest: which frames are animated, and filling in the others."""

from collections.abc import Callable

import numpy as np

from ..errors import InputError
from .protocol import interpolator_name


def stride_indices(num_frames: int, stride: int) -> list[int]:
    """The frames animated at ``stride``: ``0, k, 2k, ...`` and always the last one, so that every frame to fill
    lies between two animated ones (nothing is extrapolated)."""
    if num_frames < 1 or stride < 1:
        raise ValueError(f"need num_frames >= 1 and stride >= 1, got {num_frames} and {stride}")
    indices = list(range(0, num_frames, stride))
    if indices[-1] != num_frames - 1:
        indices.append(num_frames - 1)
    return indices


def fill_frames(
    animated: np.ndarray,
    indices: list[int],
    num_frames: int,
    interpolator,
    motion: np.ndarray | None = None,
    progress: bool | Callable[[int, int], None] = True,
) -> np.ndarray:
    """All ``num_frames`` frames: ``animated[i]`` (uint8 ``(H, W, 3)``) at ``indices[i]``, unchanged, and the
    frames between two animated ones made by ``interpolator`` (see :mod:`~magicanimate.interpolation.protocol`).

    ``motion``, the DensePose of all ``num_frames`` frames, guides interpolators that take it (their batch form's
    ``motion``); it is resized to the frames' size nearest-neighbour (palette colours are never blended).
    ``progress``: a terminal bar (``True``), none (``False``), or ``progress(done, total)`` after every frame.

    Raises:
        InputError: the interpolator returned something that is not a frame of the animated frames' size.
    """
    from tqdm.auto import tqdm

    animated = np.asarray(animated)
    if animated.ndim != 4 or animated.shape[-1] != 3 or animated.dtype != np.uint8:
        raise ValueError(f"animated frames must be uint8 (F, H, W, 3), got {animated.dtype} {animated.shape}")
    if len(indices) != len(animated) or list(indices) != sorted(set(indices)) or indices[0] != 0:
        raise ValueError(f"indices must be increasing from 0, one per animated frame, got {list(indices)}")
    if indices[-1] != num_frames - 1:
        raise ValueError(f"the last frame ({num_frames - 1}) must be animated, got indices up to {indices[-1]}")
    if motion is not None:
        motion = _resized_nearest(np.asarray(motion), *animated.shape[1:3])
        if len(motion) != num_frames:
            raise ValueError(f"motion has {len(motion)} frames for {num_frames}")
    frames = np.empty((num_frames, *animated.shape[1:]), np.uint8)
    frames[indices] = animated
    total = num_frames - len(indices)
    batch = getattr(interpolator, "interpolate", None)
    name = interpolator_name(interpolator)
    bar = tqdm(total=total, desc="interpolating", unit="frame", disable=progress is not True or total == 0)
    done = 0
    try:
        for start, end in zip(indices[:-1], indices[1:], strict=True):
            if end - start < 2:
                continue
            times = [(j - start) / (end - start) for j in range(start + 1, end)]
            if callable(batch):
                gap = motion[start : end + 1] if motion is not None else None
                made = list(batch(animated_at(frames, start), animated_at(frames, end), times, motion=gap))
            else:
                made = [interpolator(animated_at(frames, start), animated_at(frames, end), t) for t in times]
            if len(made) != len(times):
                raise InputError(f"interpolator {name} returned {len(made)} frames for {len(times)} times")
            for j, frame in enumerate(made, start=start + 1):
                frames[j] = _checked(frame, animated.shape[1:], name)
            done += len(times)
            bar.update(len(times))
            if callable(progress):
                progress(done, total)
    finally:
        bar.close()
    return frames


def animated_at(frames: np.ndarray, index: int) -> np.ndarray:
    """A read-only view of an animated frame, so an interpolator that writes into its inputs fails loudly instead
    of changing the result."""
    view = frames[index].view()
    view.flags.writeable = False
    return view


def _checked(frame, shape: tuple, name: str) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.shape != tuple(shape) or frame.dtype != np.uint8:
        raise InputError(
            f"interpolator {name} returned a {frame.dtype} array of shape {frame.shape}; it must return uint8 RGB "
            f"frames of the input frames' shape {tuple(shape)}"
        )
    return frame


def _resized_nearest(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    from ..densepose.render import resize_labels  # pixel-centre nearest, works on (H, W, 3) frames too

    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack([resize_labels(frame, height, width) for frame in frames])
