"""The refine pass: the first pass's video again, at a larger size, denoised part-way (MagicVideo-V2's V2V stage).

SDEdit: the first pass's frames are upscaled to the refine size, encoded by the VAE, noised to the timestep the
strength gives, and denoised from there by the same models: the appearance encoder re-encodes the reference photo at
the refine size (the pipeline resizes it from the photo itself, not from the first pass), and the DensePose
ControlNet gets the motion resized nearest-neighbour to that size, so its palette colours stay the part labels the
ControlNet was trained on (a blend of two labels' colours is a third label, or none). The call is the pipeline's own,
so the window schedule and every speed and memory setting hold at the refine size as in the first pass: windows per
UNet call, the ControlNet streamed in chunks, the VAE encode and decode in ``decode_chunk_size`` chunks (memory flat
in the clip length), several processes.

Of a schedule of ``steps`` steps the pass runs the last ``min(int(steps * strength), steps)`` (diffusers' img2img
rule): strength 0 runs none and gives the upscaled first pass back through the VAE; 1 starts from pure noise.
"""

from collections.abc import Callable

import numpy as np
import PIL.Image
import torch

from ..errors import InputError

# Frames per interpolation call: bounds the float copies the upscale makes, whatever the clip length.
UPSCALE_CHUNK = 16


def refine_steps_run(steps: int, strength: float) -> int:
    """The denoising steps a refine pass runs: the last ``min(int(steps * strength), steps)`` of ``steps``."""
    return min(int(steps * strength), steps)


def upscale_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(F, h, w, 3)`` float frames in [0, 1] resized to ``(F, height, width, 3)`` float32 (bicubic, antialiased
    when shrinking, clamped to [0, 1]), :data:`UPSCALE_CHUNK` frames at a time into one output array."""
    frames = np.asarray(frames)
    if frames.shape[1:3] == (height, width):
        return frames.astype(np.float32, copy=False)
    out = np.empty((len(frames), height, width, 3), np.float32)
    for start in range(0, len(frames), UPSCALE_CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(frames[start : start + UPSCALE_CHUNK], np.float32))
        resized = torch.nn.functional.interpolate(
            chunk.permute(0, 3, 1, 2), size=(height, width), mode="bicubic", align_corners=False, antialias=True
        )
        out[start : start + len(chunk)] = resized.clamp_(0, 1).permute(0, 2, 3, 1).numpy()
    return out


def resize_motion_nearest(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """DensePose frames ``(F, h, w, 3)`` uint8 at ``height x width``, nearest-neighbour: every output pixel is one
    of the input's colours (never a blend of two part labels)."""
    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack([np.asarray(PIL.Image.fromarray(f).resize((width, height), PIL.Image.NEAREST)) for f in frames])


def refine_video(
    pipe,
    frames: np.ndarray,
    reference: PIL.Image.Image,
    motion: np.ndarray,
    *,
    height: int,
    width: int,
    strength: float,
    steps: int,
    generator: torch.Generator | None = None,
    callback_on_step_end: Callable | None = None,
    **call,
) -> np.ndarray:
    """The refine pass over ``frames`` (the first pass's ``(F, h, w, 3)`` float32 frames in [0, 1]) at
    ``height x width``: ``(F, height, width, 3)`` float32 in [0, 1].

    ``reference`` is the photo (at any size: the pipeline resizes it to the refine size), ``motion`` the DensePose
    frames the first pass followed (at any size). ``strength`` and ``steps`` set the SDEdit start (see the module
    docstring); ``call`` are the pipeline's other arguments (guidance, windows, ``decode_chunk_size``,
    ``distributed``, ...), as in the first pass.
    """
    if len(frames) != len(motion):
        raise InputError(f"{len(frames)} frames to refine but {len(motion)} motion frames; give one per frame")
    call.pop("noise_prior", None)  # the start is the first pass's video, not noise
    call.update(
        height=height,
        width=width,
        num_inference_steps=steps,  # over the first pass's, when ``call`` holds all of its arguments
        init_video=upscale_frames(frames, height, width),
        strength=strength,
        generator=generator,
        callback_on_step_end=callback_on_step_end,
        output_type="np",
    )
    # The pipeline's own resize of the motion (bicubic, as the original) is then a no-op.
    return pipe(reference, resize_motion_nearest(motion, height, width), **call).frames
