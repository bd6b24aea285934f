"""Keyframes: a clip that passes through given reference photos at given frames (bidirectional sampling).

Generative Inbetweening (Wang et al. 2024) fuses, at every denoising step, a forward estimate conditioned on the
first keyframe with a time-reversed estimate conditioned on the second. Our motion is explicit (DensePose), so the
reversed estimate is the same models on the time-reversed clip: windows that list their frames backwards (the motion
modules then see time run backwards, the latents and DensePose frames are read in that order, and the predictions land
back on their own frames). Between two neighbouring keyframes, the forward pass attends to the earlier keyframe's
appearance and the reversed pass to the later one's, and the two estimates are blended per frame, all of the earlier
one at its keyframe to all of the later one at the next (``keyframe_blend``). With several keyframes every frame still
gets exactly two estimates, so the cost does not grow with their number.

Both estimates are guided as usual; each direction runs its own unconditional branch (it sees no reference, but the
motion modules see the frames in that direction's order), which keeps the method exactly symmetric: swapping the two
photos and reversing the motion and the noise gives the time-reversed video. The ControlNet residuals of a frame do
not depend on the direction and are computed once.
"""

import bisect
from dataclasses import dataclass

import torch

from ..errors import InputError

Windows = list[list[int]]
BLENDS = ("linear", "smooth")


def reversed_windows(windows: Windows, num_frames: int) -> Windows:
    """The schedule's windows on the time-reversed clip, in the clip's own frame indices: window ``w`` of the
    reversed clip covers frames ``num_frames - 1 - k`` for ``k`` in ``w``, listed in reversed time."""
    return [[num_frames - 1 - k for k in window] for window in windows]


def blend_weight(position: float, blend: str) -> float:
    """The weight of the earlier keyframe's (forward) estimate at ``position`` in [0, 1] between two keyframes:
    ``linear``: ``1 - x``; ``smooth``: ``1 - smoothstep(x) = 1 - (3x^2 - 2x^3)``, flat at both keyframes. Both satisfy
    ``w(1 - x) = 1 - w(x)``, which the symmetry of the method needs."""
    if blend == "linear":
        return 1.0 - position
    return 1.0 - position * position * (3.0 - 2.0 * position)


@dataclass
class KeyframePlan:
    """Per frame of the (padded) clip: the reference each pass attends to and the forward estimate's weight."""

    frames: list[int]  # the keyframes' frame indices, increasing
    forward_banks: list[int]  # bank (keyframe index) of each frame in the forward pass: the last keyframe at or before
    reverse_banks: list[int]  # ... in the reversed pass: the first keyframe at or after
    forward_weight: list[float]

    @classmethod
    def plan(cls, frames: list[int], num_frames: int, blend: str = "linear") -> "KeyframePlan":
        """Between keyframes ``j`` and ``j + 1`` the forward pass attends to ``j``, the reversed one to ``j + 1``,
        and the forward weight goes from 1 to 0 (``blend_weight``). At a keyframe both attend to it, with the forward
        weight 1 at the first, 0 at the last and 1/2 at those between; before the first keyframe only the forward
        estimate counts, after the last only the reversed one. So mirroring the keyframes in time mirrors every weight
        (``w -> 1 - w``), which the symmetry of the method needs."""
        if blend not in BLENDS:
            raise InputError(f"keyframe_blend must be one of {', '.join(BLENDS)}, got {blend!r}")
        forward, reverse, weights = [], [], []
        last = len(frames) - 1
        for frame in range(num_frames):
            after = bisect.bisect_left(frames, frame)  # the first keyframe at or after this frame
            if after <= last and frames[after] == frame:  # on a keyframe
                forward.append(after)
                reverse.append(after)
                weights.append(1.0 if after == 0 else 0.0 if after == last else 0.5)
            elif after == 0 or after > last:  # before the first keyframe, after the last
                bank = min(after, last)
                forward.append(bank)
                reverse.append(bank)
                weights.append(1.0 if after == 0 else 0.0)
            else:
                forward.append(after - 1)
                reverse.append(after)
                position = (frame - frames[after - 1]) / (frames[after] - frames[after - 1])
                weights.append(blend_weight(position, blend))
        return cls(list(frames), forward, reverse, weights)

    def per_frame(self, references: torch.Tensor) -> torch.Tensor:
        """``(1, C, F, h, w)``: each frame's blend of its two keyframes' latents ``references`` (``(K, C, h, w)``),
        with the estimates' weights (the noise prior's mean along the clip)."""
        forward = references[self.forward_banks].transpose(0, 1)[None]
        reverse = references[self.reverse_banks].transpose(0, 1)[None]
        return self.fuse(forward, reverse)

    def fuse(self, forward: torch.Tensor, reverse: torch.Tensor) -> torch.Tensor:
        """``w * forward + (1 - w) * reverse`` per frame, for ``(1, C, F, h, w)`` noise predictions."""
        weight = torch.tensor(self.forward_weight, dtype=forward.dtype, device=forward.device)[
            None, None, :, None, None
        ]
        return weight * forward + (1 - weight) * reverse


def check_keyframes(keyframes, num_frames: int) -> list[tuple[int, object]]:
    """``[(frame, image), ...]`` sorted by frame, frames distinct integers in ``[0, num_frames - 1]``; or
    :class:`InputError` in one line."""
    checked = []
    for item in keyframes:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise InputError(f"keyframes must be (frame, image) pairs, got {item!r:.80}")
        frame, image = item
        if isinstance(frame, bool) or not isinstance(frame, int) or not 0 <= frame < num_frames:
            raise InputError(f"a keyframe's frame must be an integer from 0 to {num_frames - 1}, got {frame!r}")
        checked.append((frame, image))
    checked.sort(key=lambda pair: pair[0])
    frames = [frame for frame, _ in checked]
    if len(set(frames)) != len(frames):
        raise InputError(f"two keyframes at the same frame: {sorted(f for f in frames if frames.count(f) > 1)[0]}")
    if not checked:
        raise InputError("keyframes is empty: give at least one (frame, image) pair")
    return checked
