"""The MagicAnimate pipeline: parity with the original (../shared fixture) and behaviour on the tiny tree."""

import numpy as np
import pytest
import torch
from conftest import TINY_FRAMES, TINY_SIZE, TINY_STEPS, load_tiny_pipeline, tiny_latents
from tiny_models import make_motion

# ------------------------------------------------------------------------------------------------ parity (shared)


@pytest.fixture(scope="session")
def parity_pipe(parity):
    from magicanimate import MagicAnimatePipeline

    pipe = MagicAnimatePipeline.from_pretrained(parity / "pretrained")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _parity_call(pipe, fixture, motion, callback=None):
    return pipe(
        fixture / "inputs" / "reference.png",
        motion,
        num_inference_steps=4,
        guidance_scale=7.5,
        latents=torch.from_numpy(np.load(fixture / "inputs" / "latents.npy")),
        output_type="np",
        callback_on_step_end=callback,
    ).frames


@pytest.fixture(scope="module")
def parity_run(parity_pipe, parity):
    per_step = []

    def keep(pipe, step, timestep, kwargs):
        per_step.append((int(timestep), kwargs["latents"].detach().clone()))
        return kwargs

    frames = _parity_call(parity_pipe, parity, np.load(parity / "inputs" / "motion.npy"), keep)
    return frames, per_step


def test_parity_frames(parity_run, parity):
    frames, _ = parity_run
    expected = np.load(parity / "expected" / "frames.npy")
    assert frames.shape == expected.shape and frames.dtype == np.float32
    diff = float(np.abs(frames - expected).max())
    assert diff <= 1e-4, f"frames differ from the original's by {diff:.3g}"


def test_parity_latents_per_step(parity_run, parity):
    _, per_step = parity_run
    expected = np.load(parity / "expected" / "latents_per_step.npy")
    assert [t for t, _ in per_step] == [751, 501, 251, 1]
    assert len(per_step) == len(expected)
    for step, (_, latents) in enumerate(per_step):
        diff = float(np.abs(latents.numpy() - expected[step]).max())
        assert diff <= 1e-3, f"step {step}: latents differ from the original's by {diff:.3g}"


class _StopAfterStepZero(Exception):
    pass


def test_parity_motion_from_mp4_equals_npy(parity_pipe, parity_run, parity):
    """The lossless motion.mp4 decodes to motion.npy, so the path input must give the same latents after the first
    step as the array input (stopped there to keep it cheap; identical latents decode to identical frames)."""
    _, per_step = parity_run
    seen = []

    def stop(pipe, step, timestep, kwargs):
        seen.append(kwargs["latents"].detach().clone())
        raise _StopAfterStepZero

    with pytest.raises(_StopAfterStepZero):
        _parity_call(parity_pipe, parity, str(parity / "inputs" / "motion.mp4"), stop)
    parity_pipe.reference_control.clear()
    torch.testing.assert_close(seen[0], per_step[0][1], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ tiny tree


def _run(pipe, reference, motion, steps=TINY_STEPS, **kwargs):
    kwargs.setdefault("output_type", "np")
    return pipe(reference, motion, num_inference_steps=steps, **kwargs).frames


class _UNetBatches:
    """Records the batch size of every video-UNet call, both guidance branches counted also when they share the
    down path (``mid_up_repeats``) (observation only; returns nothing)."""

    def __init__(self, unet):
        self.batches = []
        self.handle = unet.register_forward_pre_hook(
            lambda module, args, kwargs: self.batches.append(args[0].shape[0] * kwargs.get("mid_up_repeats", 1)),
            with_kwargs=True,
        )


def test_output_is_float_frames_in_unit_range(tiny_baseline):
    assert tiny_baseline.shape == (TINY_FRAMES, TINY_SIZE, TINY_SIZE, 3)
    assert tiny_baseline.dtype == np.float32
    assert tiny_baseline.min() >= 0 and tiny_baseline.max() <= 1
    assert tiny_baseline.std() > 0.01  # not a constant image


def test_guidance_one_is_a_single_pass_and_differs(tiny_pipe, tiny_baseline, reference_image, motion16):
    spy = _UNetBatches(tiny_pipe.unet)
    try:
        frames = _run(tiny_pipe, reference_image, motion16, guidance_scale=1.0, latents=tiny_latents(TINY_FRAMES))
    finally:
        spy.handle.remove()
    assert spy.batches == [1] * TINY_STEPS, "guidance 1.0 must run one (conditional) pass per window"
    assert frames.shape == tiny_baseline.shape and frames.dtype == np.float32
    assert np.isfinite(frames).all() and frames.min() >= 0 and frames.max() <= 1
    assert np.abs(frames - tiny_baseline).max() > 1e-3


@pytest.fixture(scope="module")
def padded32(tiny_pipe, reference_image):
    """20 motion frames explicitly padded to 32 by repeating the last one, run with 32-frame latents."""
    motion20 = make_motion(20, TINY_SIZE, seed=4)
    padded = np.concatenate([motion20, np.repeat(motion20[-1:], 12, axis=0)])
    latents = tiny_latents(32, seed=2)
    frames = _run(tiny_pipe, reference_image, padded, steps=1, latents=latents)
    return motion20, padded, latents, frames


def test_frame_count_not_multiple_of_16_pads_with_last_frame(tiny_pipe, reference_image, padded32):
    motion20, _, latents, frames32 = padded32
    frames20 = _run(tiny_pipe, reference_image, motion20, steps=1, latents=latents)
    assert frames20.shape == (20, TINY_SIZE, TINY_SIZE, 3)
    # same computation up to the VAE decode batch (16 + 4 frames vs 16 + 16): float rounding only
    np.testing.assert_allclose(frames20, frames32[:20], rtol=0, atol=1e-5)


def test_context_batch_size_does_not_change_frames(tiny_pipe, reference_image, padded32):
    _, padded, latents, frames32 = padded32
    spy = _UNetBatches(tiny_pipe.unet)
    try:
        frames = _run(tiny_pipe, reference_image, padded, steps=1, latents=latents, context_batch_size=2)
    finally:
        spy.handle.remove()
    assert spy.batches == [4, 2]  # 3 windows: 2 + 1, each with both CFG halves
    np.testing.assert_allclose(frames, frames32, rtol=0, atol=1e-5)


def test_default_noise_is_one_16_frame_block_tiled(tiny_pipe, reference_image):
    """The UNet calls of step 0 see the initial latents (DDIM's scale_model_input is the identity): every frame f of
    the (20 -> 32 padded) clip must hold frame f % 16 of one 16-frame block drawn from the generator."""
    from magicanimate.pipelines.context_windows import context_windows

    windows = context_windows(32)
    seen = []

    def grab(module, args):
        seen.append(args[0].detach().clone())
        if len(seen) == len(windows):
            raise _StopAfterStepZero

    handle = tiny_pipe.unet.register_forward_pre_hook(grab)
    try:
        with pytest.raises(_StopAfterStepZero):
            _run(
                tiny_pipe,
                reference_image,
                make_motion(20, TINY_SIZE),
                steps=1,
                generator=torch.Generator().manual_seed(11),
                share_down_path=False,  # both guidance halves as UNet input rows
            )
    finally:
        handle.remove()
        tiny_pipe.reference_control.clear()
    block = torch.randn((1, 4, 16, TINY_SIZE // 8, TINY_SIZE // 8), generator=torch.Generator().manual_seed(11))
    block = block * tiny_pipe.scheduler.init_noise_sigma
    for window, sample in zip(windows, seen, strict=True):
        assert sample.shape == (2, 4, 16, TINY_SIZE // 8, TINY_SIZE // 8)
        expected = block[:, :, [frame % 16 for frame in window]]
        torch.testing.assert_close(sample[0:1], expected)  # unconditional half
        torch.testing.assert_close(sample[1:2], expected)  # conditional half: same latents


def test_explicit_latents_are_scaled_like_generated_noise_for_any_scheduler(tiny_pipe, reference_image, motion16):
    """diffusers (and the original's prepare_latents) multiply given latents by scheduler.init_noise_sigma too, so
    passing the noise a generator would draw must give the generator's result. Euler's init_noise_sigma is ~14.6."""
    from diffusers import EulerDiscreteScheduler

    original = tiny_pipe.scheduler
    tiny_pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)
    try:
        assert tiny_pipe.scheduler.init_noise_sigma > 2
        from_generator = _run(tiny_pipe, reference_image, motion16, steps=1, generator=torch.Generator().manual_seed(5))
        noise = torch.randn((1, 4, 16, 8, 8), generator=torch.Generator().manual_seed(5))
        from_latents = _run(tiny_pipe, reference_image, motion16, steps=1, latents=noise)
    finally:
        tiny_pipe.scheduler = original
    np.testing.assert_allclose(from_latents, from_generator, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheduler_name", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
def test_scheduler_swap(tiny_pipe, tiny_baseline, reference_image, motion16, scheduler_name):
    import diffusers

    original = tiny_pipe.scheduler
    tiny_pipe.scheduler = getattr(diffusers, scheduler_name).from_config(original.config)
    try:
        frames = _run(tiny_pipe, reference_image, motion16, generator=torch.Generator().manual_seed(1))
    finally:
        tiny_pipe.scheduler = original
    assert frames.shape == tiny_baseline.shape
    assert np.isfinite(frames).all() and frames.min() >= 0 and frames.max() <= 1
    assert frames.std() > 0.01


def test_bfloat16_runs_on_cpu_close_to_float32(tiny_tree, tiny_baseline, reference_image, motion16):
    pipe = load_tiny_pipeline(tiny_tree).to(torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    dtypes = []

    def keep(p, step, timestep, kwargs):
        dtypes.append(kwargs["latents"].dtype)
        return kwargs

    frames = _run(
        pipe,
        reference_image,
        motion16,
        guidance_scale=7.5,
        latents=tiny_latents(TINY_FRAMES),
        callback_on_step_end=keep,
    )
    assert dtypes == [torch.float32] * TINY_STEPS, "latents (the running sum) must stay float32"
    assert frames.dtype == np.float32 and frames.shape == tiny_baseline.shape
    assert np.isfinite(frames).all()
    diff = np.abs(frames - tiny_baseline)
    # measured: mean 3.5e-3, max 6.2e-2; unrelated frames of this tree differ by ~0.1 on average
    assert diff.mean() < 0.015 and diff.max() < 0.25, (diff.mean(), diff.max())


def test_sliding_schedule_differs_from_uniform_only_where_windows_differ(tiny_pipe, reference_image):
    """40 frames -> padded to 48. Uniform windows: 0-15, 12-27, 24-39, 36-47+0-3; sliding: 0-15, 12-27, 24-39,
    32-47. After one step, frames 4..11 (only in window 0-15 in both) are identical; frames 0..3 (also in the
    wrap-around window for uniform) differ."""
    motion = make_motion(40, TINY_SIZE, seed=6)
    latents = tiny_latents(48, seed=3)
    uniform = _run(tiny_pipe, reference_image, motion, steps=1, latents=latents, context_schedule="uniform")
    sliding = _run(tiny_pipe, reference_image, motion, steps=1, latents=latents, context_schedule="sliding")
    assert uniform.shape == sliding.shape == (40, TINY_SIZE, TINY_SIZE, 3)
    # sliding may weight window positions (pred * w / w): float rounding only
    np.testing.assert_allclose(sliding[4:12], uniform[4:12], rtol=0, atol=1e-5)
    assert np.abs(sliding[:4] - uniform[:4]).max() > 1e-3
    assert np.abs(sliding[32:] - uniform[32:]).max() > 1e-3


def test_height_width_override_resizes(tiny_pipe, reference_image, motion16):
    frames = _run(
        tiny_pipe, reference_image, motion16, steps=1, height=32, width=48, generator=torch.Generator().manual_seed(0)
    )
    assert frames.shape == (TINY_FRAMES, 32, 48, 3)
    assert np.isfinite(frames).all()


def test_second_pipeline_on_shared_components_leaves_the_first_working(
    tiny_tree, tiny_baseline, reference_image, motion16
):
    """Building another pipeline from the same components (diffusers' from_pipe / **pipe.components idiom) must
    not disconnect the first pipeline's reference attention."""
    from magicanimate import MagicAnimatePipeline

    first = load_tiny_pipeline(tiny_tree)
    MagicAnimatePipeline(**first.components)
    frames = _run(first, reference_image, motion16, guidance_scale=7.5, latents=tiny_latents(TINY_FRAMES))
    np.testing.assert_allclose(frames, tiny_baseline, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ checks, offload, stop


class _ModelCalls:
    """Counts forward calls of every model of a pipeline (observation only)."""

    def __init__(self, pipe):
        self.count = 0
        models = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
        self.handles = [m.register_forward_pre_hook(self._seen) for m in models]
        self.handles.append(pipe.vae.encoder.register_forward_pre_hook(self._seen))  # vae.encode skips forward

    def _seen(self, module, args):
        self.count += 1

    def remove(self):
        for handle in self.handles:
            handle.remove()


BAD_ARGUMENTS = {
    "output_type": ({"output_type": "jpg"}, "output_type must be one of np, pt, pil, latent"),
    "steps": ({"num_inference_steps": 0}, "num_inference_steps"),
    "guidance": ({"guidance_scale": float("nan")}, "guidance_scale"),
    "height": ({"height": 0}, "height"),
    "too-small": ({"width": 4}, "too small"),
    "context-frames": ({"context_frames": 0}, "context_frames"),
    "context-too-long": ({"context_frames": 32}, "at most 24"),
    "overlap": ({"context_overlap": 16}, "context_overlap"),
    "context-batch": ({"context_batch_size": 0}, "context_batch_size"),
    "schedule": ({"context_schedule": "random"}, "one of sliding, uniform"),
    "decode-chunk": ({"decode_chunk_size": 0}, "decode_chunk_size"),
    "latents-shape": ({"latents": torch.zeros(1, 4, 16, 4, 4)}, r"latents must be .* \(1, 4, F, 8, 8\)"),
    "latents-array": ({"latents": np.zeros((1, 4, 16, 8, 8))}, "latents must be a float tensor"),
    "cfg-parallel": ({"cfg_parallel": True}, "distributed=True"),
    "motion-dtype": ({"motion": np.zeros((4, 64, 64, 3), np.float32)}, "uint8"),
    "motion-shape": ({"motion": np.zeros((4, 64, 64), np.uint8)}, "F x H x W x 3"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_arguments_fail_in_one_line_before_any_model_runs(tiny_pipe, reference_image, motion16, case):
    from magicanimate.errors import InputError

    kwargs, message = BAD_ARGUMENTS[case]
    kwargs = {"motion": motion16, **kwargs}
    calls = _ModelCalls(tiny_pipe)
    try:
        with pytest.raises(InputError, match=message) as error:
            tiny_pipe(reference_image, num_inference_steps=kwargs.pop("num_inference_steps", 1), **kwargs)
    finally:
        calls.remove()
    assert calls.count == 0
    assert "\n" not in str(error.value)


def test_interrupt_stops_after_the_current_step_and_returns_its_latents(tiny_pipe, reference_image, motion16):
    seen = []

    def stop(pipe, step, timestep, tensors):
        seen.append(tensors["latents"].clone())
        pipe._interrupt = True
        return tensors

    spy = _UNetBatches(tiny_pipe.unet)
    try:
        latents = _run(
            tiny_pipe,
            reference_image,
            motion16,
            steps=3,
            latents=tiny_latents(TINY_FRAMES),
            output_type="latent",
            callback_on_step_end=stop,
        )
        assert tiny_pipe.interrupt
        _run(tiny_pipe, reference_image, motion16, steps=2, latents=tiny_latents(TINY_FRAMES), output_type="latent")
    finally:
        spy.handle.remove()
    assert len(seen) == 1
    torch.testing.assert_close(latents, seen[0], rtol=0, atol=0)  # the very tensor the callback saw
    assert len(spy.batches) == 1 + 2  # one step, then a full 2-step call: the flag is reset per call
    assert not tiny_pipe.interrupt


@pytest.fixture(scope="module")
def offloaded_pipe(tiny_tree):
    pipe = load_tiny_pipeline(tiny_tree)
    pipe.enable_model_cpu_offload(device="cpu")  # diffusers 0.42 accepts "cpu" (cpu:0) as the execution device
    return pipe


def test_model_cpu_offload_gives_the_plain_frames(offloaded_pipe, tiny_baseline, reference_image, motion16):
    frames = _run(offloaded_pipe, reference_image, motion16, guidance_scale=7.5, latents=tiny_latents(TINY_FRAMES))
    # Bit-identical by construction on a CPU: the accelerate hooks only move weights between "cpu" and "cpu:0", so
    # every kernel runs on the same tensors as in the plain run (measured: 0).
    np.testing.assert_array_equal(frames, tiny_baseline)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failing_step_clears_the_reference_and_frees_offloaded_models(
    offloaded_pipe, tiny_baseline, reference_image, motion16, monkeypatch, error
):
    freed = []
    free = offloaded_pipe.maybe_free_model_hooks  # diffusers' method, observed and still run
    monkeypatch.setattr(offloaded_pipe, "maybe_free_model_hooks", lambda: (freed.append(True), free())[1])

    def fail(pipe, step, timestep, tensors):
        raise error("stopped")

    with pytest.raises(error):
        _run(offloaded_pipe, reference_image, motion16, latents=tiny_latents(TINY_FRAMES), callback_on_step_end=fail)
    assert freed == [True]
    control = offloaded_pipe.reference_control
    assert all(writer.bank is None for writer in control.writers.values())
    assert all(r.reference is None and r.conditional is None for r in control.readers.values())
    monkeypatch.undo()
    frames = _run(offloaded_pipe, reference_image, motion16, guidance_scale=7.5, latents=tiny_latents(TINY_FRAMES))
    np.testing.assert_array_equal(frames, tiny_baseline)  # nothing left over: the same run as above, same bits
