"""Feature reuse across steps (``cache_interval``, DeepCache): every k-th step runs the whole video UNet and keeps
the input of its outermost up block per window and guidance branch; the steps between run only the outermost blocks
(of the UNet and of the ControlNet) on the kept features.

Off (1) it is the parity computation; on, the kept features must really be reused (call counts and the very tensors),
the split forward must equal the whole one, the work must drop by what the skipped blocks cost, and the frames must
stay near parity mode. Random weights cannot judge quality: the deviation test only bounds how far the lever moves the
frames (closer to parity mode than another seed's noise is).
"""

import numpy as np
import pytest
import torch
from conftest import TINY_SIZE, tiny_latents
from tiny_models import make_motion
from torch.utils.flop_counter import FlopCounterMode

from magicanimate.errors import InputError
from magicanimate.models.shallow_controlnet import shallow_controlnet_residuals
from magicanimate.pipelines.feature_cache import FeatureCache

STEPS = 4


@pytest.fixture(scope="module")
def motion32():
    return make_motion(32, TINY_SIZE, seed=5)  # 3 uniform windows of 16


def _run(pipe, reference, motion, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("latents", tiny_latents(len(motion), seed=2))
    return pipe(reference, motion, **kwargs).frames


def test_interval_one_is_the_parity_computation(tiny_pipe, reference_image, motion16):
    plain = _run(tiny_pipe, reference_image, motion16)
    np.testing.assert_array_equal(_run(tiny_pipe, reference_image, motion16, cache_interval=1), plain)


def test_bad_interval_is_refused(tiny_pipe, reference_image, motion16):
    with pytest.raises(InputError, match="cache_interval"):
        _run(tiny_pipe, reference_image, motion16, cache_interval=0)


class StepRecorder:
    """Per denoising step: how often the deep blocks ran (UNet mid block, ControlNet's last down block) and the
    inputs of the UNet's outermost up block."""

    def __init__(self, pipe):
        self.deep, self.control_deep, self.outer_inputs, self.steps = 0, 0, [], []
        self.hooks = [
            pipe.unet.mid_block.register_forward_hook(lambda *_: self._count("deep")),
            pipe.controlnet.down_blocks[-1].register_forward_hook(lambda *_: self._count("control_deep")),
            pipe.unet.up_blocks[-1].register_forward_pre_hook(self._outer, with_kwargs=True),
        ]

    def _count(self, name):
        setattr(self, name, getattr(self, name) + 1)

    def _outer(self, module, args, kwargs):
        self.outer_inputs.append(kwargs["hidden_states"])

    def end_of_step(self, pipe, step, timestep, tensors):
        self.steps.append((self.deep, self.control_deep, self.outer_inputs))
        self.deep, self.control_deep, self.outer_inputs = 0, 0, []
        return tensors

    def remove(self):
        for hook in self.hooks:
            hook.remove()


def test_cached_steps_reuse_the_kept_features(tiny_pipe, reference_image, motion32):
    """Interval 2, 4 steps, 3 windows: steps 0 and 2 run the deep blocks once per window (UNet and ControlNet:
    the ControlNet's 16-frame chunks are the windows' frames, 2 chunks); steps 1 and 3 run none, and their outermost
    up block gets exactly the tensors that the step before fed it."""
    recorder = StepRecorder(tiny_pipe)
    try:
        _run(tiny_pipe, reference_image, motion32, cache_interval=2, callback_on_step_end=recorder.end_of_step)
    finally:
        recorder.remove()
    deep = [(unet, control) for unet, control, _ in recorder.steps]
    assert deep == [(3, 2), (0, 0), (3, 2), (0, 0)]
    for full, cached in ((0, 1), (2, 3)):
        kept, reused = recorder.steps[full][2], recorder.steps[cached][2]
        assert len(kept) == len(reused) == 3
        for before, now in zip(kept, reused, strict=True):
            assert torch.equal(before, now)
    assert not torch.equal(recorder.steps[0][2][0], recorder.steps[2][2][0])  # a full step refreshes them


def test_a_step_whose_branch_is_not_kept_runs_in_full(tiny_pipe, reference_image, motion32):
    """Guidance from step 1 on: step 0 keeps the conditional branch only, so step 1 (which needs the unconditional
    one too) runs in full; steps 2 (full by the interval) and 3 (cached) as usual."""
    recorder = StepRecorder(tiny_pipe)
    try:
        _run(tiny_pipe, reference_image, motion32, cache_interval=2, guidance_start=0.25,
             callback_on_step_end=recorder.end_of_step)  # fmt: skip
    finally:
        recorder.remove()
    assert [unet for unet, _, _ in recorder.steps] == [3, 3, 3, 0]


def test_the_split_forward_equals_the_whole_one(tiny_pipe, reference_image, motion32):
    """A full UNet call that keeps the deep features, then the shallow call on them with the same inputs, gives the
    full call's output; the shallow ControlNet gives the full one's first residuals. Up to float32 rounding (the
    shallow call computes the same blocks in the same order: measured 0 here; 1e-5 allows other kernels)."""
    pipe = tiny_pipe
    t = torch.tensor(501)
    latents = tiny_latents(32, seed=4)
    windows = [list(range(16)), list(range(16, 32))]
    control = torch.from_numpy(motion32)
    with torch.no_grad():
        text = pipe.encode_prompt("")
        try:
            pipe.encode_appearance(pipe.encode_reference(reference_image), t, text)
            full_res = pipe.encode_motion(latents, t, text, control, slice(0, 32), 1.0)
            shallow_res = pipe.encode_motion(latents, t, text, control, slice(0, 32), 1.0, depth=1)
            assert len(shallow_res) == 1 + len(pipe.controlnet.down_blocks[0].resnets) + 1
            for full, shallow in zip(full_res, shallow_res, strict=False):
                torch.testing.assert_close(shallow, full, rtol=0, atol=1e-5)
            cache = FeatureCache(2)
            branches = [False, True]
            cache.start_full_step(branches)
            whole = pipe.denoise_windows(latents, t, text, windows, full_res, branches, cache=cache)
            split = pipe.denoise_windows(latents, t, text, windows, shallow_res, branches, cache=cache, reuse=True)
        finally:
            pipe.reference_control.clear()
    deviation = float((split - whole).abs().max())
    print(f"shallow call on the kept features vs the whole call: {deviation:.2e}")
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-5)


def test_shallow_controlnet_matches_a_bgr_controlnet(tiny_pipe, motion16):
    """The channel-order switch of diffusers' ControlNet is honoured."""
    net = tiny_pipe.controlnet
    sample = torch.randn(2, 4, 8, 8)
    cond = torch.from_numpy(motion16[:2]).permute(0, 3, 1, 2).float() / 255
    text = torch.randn(2, 77, net.config.cross_attention_dim)
    net.register_to_config(controlnet_conditioning_channel_order="bgr")
    try:
        with torch.no_grad():
            full, _ = net(sample, 10, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
            shallow = shallow_controlnet_residuals(net, sample, torch.tensor(10), text, cond, 1.0, 1)
    finally:
        net.register_to_config(controlnet_conditioning_channel_order="rgb")
    for a, b in zip(shallow, full, strict=False):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_work_drops_by_exactly_the_skipped_blocks(tiny_pipe, reference_image, motion32):
    """FLOPs (shapes only, exact). A run is the sum of its steps: with interval 3 over 4 steps (0 and 3 full) it costs
    2 full + 2 cached steps. A cached step is a full step minus exactly the blocks it skips, counted per module in a
    full step: the video UNet's down blocks 1.., mid block and up blocks ..-2, and the ControlNet's down blocks 1..,
    mid block and their zero convolutions. (On these tiny models the outermost level holds most of the work, so a
    cached step still costs ~0.76x; at SD 1.5's size see benchmarks/RESULTS.md.)"""

    def flops(steps, interval, per_module=False):
        with FlopCounterMode(display=False) as counter:
            _run(tiny_pipe, reference_image, motion32, num_inference_steps=steps, cache_interval=interval)
        if per_module:
            return {name: sum(counts.values()) for name, counts in counter.get_flop_counts().items()}
        return counter.get_total_flops()

    one = flops(1, 1, per_module=True)
    fixed = one["Global"] - (flops(2, 1) - one["Global"])  # the work outside the steps (VAE, text encoder)
    full_step = one["Global"] - fixed
    cached_step = flops(2, 2) - one["Global"]
    unet, control = len(tiny_pipe.unet.up_blocks), len(tiny_pipe.controlnet.down_blocks)
    first_residuals = 1 + len(tiny_pipe.controlnet.down_blocks[0].resnets) + 1
    skipped = [f"VideoUNet.down_blocks.{i}" for i in range(1, unet)] + ["VideoUNet.mid_block"]
    skipped += [f"VideoUNet.up_blocks.{i}" for i in range(unet - 1)]
    skipped += [f"ControlNetModel.down_blocks.{i}" for i in range(1, control)] + ["ControlNetModel.mid_block"]
    skipped += [
        f"ControlNetModel.controlnet_down_blocks.{i}"
        for i in range(first_residuals, len(tiny_pipe.controlnet.controlnet_down_blocks))
    ]
    skipped += ["ControlNetModel.controlnet_mid_block"]
    print(
        f"full step {full_step / 1e9:.3f} GFLOP, cached step {cached_step / 1e9:.3f} ({cached_step / full_step:.2f}x)"
    )
    assert full_step - cached_step == sum(one[name] for name in skipped)
    assert flops(4, 3) == fixed + 2 * full_step + 2 * cached_step
    assert cached_step < full_step


def test_frames_stay_near_parity_mode(tiny_pipe, reference_image, motion32):
    """Random weights: the lever's deviation from parity mode is printed and must be smaller than the change that
    another initial noise makes (what 'the same video' can mean for random models)."""
    parity = _run(tiny_pipe, reference_image, motion32)
    cached = _run(tiny_pipe, reference_image, motion32, cache_interval=2)
    other_noise = _run(tiny_pipe, reference_image, motion32, latents=tiny_latents(32, seed=3))
    deviation = float(np.abs(cached - parity).mean())
    noise_change = float(np.abs(other_noise - parity).mean())
    print(f"cache_interval 2 vs parity: mean |diff| {deviation:.4f} (max {np.abs(cached - parity).max():.4f}); "
          f"another noise: {noise_change:.4f}")  # fmt: skip
    assert 0 < deviation < 0.5 * noise_change


def test_cache_with_sliding_windows_batches_and_cpu_storage(tiny_pipe, reference_image, motion32):
    """Batched windows and keeping the features elsewhere change nothing but rounding."""
    one = _run(tiny_pipe, reference_image, motion32, cache_interval=2, context_schedule="sliding")
    batched = _run(tiny_pipe, reference_image, motion32, cache_interval=2, context_schedule="sliding",
                   context_batch_size=2, cache_device="cpu")  # fmt: skip
    np.testing.assert_allclose(batched, one, rtol=0, atol=3e-5)


def test_the_plan_counts_the_cached_steps():
    """The time in the plan line follows the work: cached steps count at their measured share."""
    from magicanimate.api import CACHED_STEP_WORK, UNGUIDED_STEP_WORK, step_work
    from magicanimate.settings import load_config

    assert step_work(load_config()) == 1.0
    assert step_work(load_config(cache_interval=2, steps=4)) == pytest.approx((1 + CACHED_STEP_WORK) / 2)
    assert step_work(load_config(guidance_end=0.5, steps=4)) == pytest.approx((1 + UNGUIDED_STEP_WORK) / 2)
    assert step_work(load_config(), keyframes=2) == 2.0
