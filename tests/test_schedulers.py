"""The ``scheduler`` setting: diffusers' schedulers on the original's noise schedule, chosen per ``animate`` call.

``ddim`` must be the original's sampler (same class and config, so the same code path and the same bits); the
others must run end to end, honour ``init_noise_sigma`` / ``scale_model_input`` and make no extra model calls (the
UNet denoises steps x windows x branches rows, the ControlNet every frame once per step); and a call's choice must
not stay on a pipeline that later calls share (batch jobs, the demo).
"""

import numpy as np
import pytest
import torch
from conftest import TINY_SIZE
from tiny_models import make_motion

from magicanimate import animate
from magicanimate.errors import InputError
from magicanimate.pipelines import magicanimate_scheduler
from magicanimate.pipelines.schedulers import SCHEDULERS, make_scheduler, original_schedule, scheduler_for_call

NAMES = sorted(SCHEDULERS)


def _animate(pipe, reference, motion, **settings):
    settings.setdefault("steps", 3)
    return animate(reference, motion, pipeline=pipe, size=TINY_SIZE, check_motion=False, **settings).frames


@pytest.fixture(scope="module")
def motion32():
    return make_motion(32, TINY_SIZE, seed=4)  # 3 uniform windows of 16 (0-15, 12-27, 24-31 + 0-7)


@pytest.fixture(scope="module")
def ddim_frames(tiny_pipe, reference_image, motion32):
    return _animate(tiny_pipe, reference_image, motion32, scheduler="ddim")


def test_ddim_is_the_original_sampler():
    ddim, original = make_scheduler("ddim"), magicanimate_scheduler()
    assert type(ddim) is type(original) and dict(ddim.config) == dict(original.config)


@pytest.mark.parametrize("name", NAMES)
def test_every_scheduler_has_the_original_noise_schedule(name):
    scheduler, original = make_scheduler(name), magicanimate_scheduler()
    assert {key: scheduler.config[key] for key in original_schedule()} == original_schedule()
    assert scheduler.config.beta_schedule == "linear" and scheduler.config.prediction_type == "epsilon"
    torch.testing.assert_close(scheduler.alphas_cumprod, original.alphas_cumprod, rtol=0, atol=0)


def test_unknown_scheduler_is_an_input_error():
    with pytest.raises(InputError, match="dpmpp_2m"):
        make_scheduler("heun")


def test_ddim_setting_gives_the_default_pipeline_bit_for_bit(tiny_pipe, reference_image, motion32, ddim_frames):
    """animate(scheduler="ddim") vs the pipeline called with the scheduler it was loaded with: the same frames."""
    direct = tiny_pipe(
        reference_image, motion32, num_inference_steps=3, generator=torch.Generator().manual_seed(1)
    ).frames
    np.testing.assert_array_equal(ddim_frames, (direct * 255).round().astype(np.uint8))


@pytest.mark.parametrize("name", NAMES)
def test_each_scheduler_runs_end_to_end_with_one_model_call_per_step(
    tiny_pipe, reference_image, motion32, ddim_frames, name
):
    """Rows through the UNet's output layer: steps x windows x branches x frames; ControlNet rows: steps x frames.
    Counted at the layers (not the UNet call), so the count holds however the branches share the down path."""
    unet_rows, controlnet_rows, used = [], [], []
    hooks = [
        tiny_pipe.unet.conv_out.register_forward_hook(lambda m, args, out: unet_rows.append(args[0].shape[0])),
        tiny_pipe.controlnet.register_forward_pre_hook(lambda m, args: controlnet_rows.append(args[0].shape[0])),
    ]
    own = tiny_pipe.scheduler
    try:
        frames = _animate(
            tiny_pipe,
            reference_image,
            motion32,
            scheduler=name,
            progress=lambda step, total: used.append(tiny_pipe.scheduler),
        )
    finally:
        for hook in hooks:
            hook.remove()
    assert len(used) == 3 and all(type(s) is type(make_scheduler(name)) for s in used)
    assert tiny_pipe.scheduler is own  # the call's scheduler did not stay behind
    steps, windows, branches, frames_per_window = 3, 3, 2, 16
    assert sum(unet_rows) == steps * windows * branches * frames_per_window
    assert sum(controlnet_rows) == steps * 32
    assert frames.shape == (32, TINY_SIZE, TINY_SIZE, 3) and frames.dtype == np.uint8
    assert frames.std() > 1  # not a constant image
    if name == "ddim":
        np.testing.assert_array_equal(frames, ddim_frames)
    else:
        assert np.abs(frames.astype(int) - ddim_frames).max() > 1  # another solver, other frames
    assert (used[0].init_noise_sigma > 2) == (name == "euler")  # Euler scales the initial noise by its sigma_max


def test_euler_latents_are_scaled_by_init_noise_sigma_and_the_models_inputs_rescaled(
    tiny_pipe, reference_image, motion32
):
    """With Euler the initial latents are ~25x the unit noise; the UNet and the ControlNet must still see inputs of
    unit scale (scale_model_input divides by sqrt(sigma^2 + 1)), as with DDIM."""
    seen = {"unet": [], "controlnet": []}
    hooks = [
        tiny_pipe.unet.register_forward_pre_hook(lambda m, args: seen["unet"].append(float(args[0].std()))),
        tiny_pipe.controlnet.register_forward_pre_hook(lambda m, args: seen["controlnet"].append(float(args[0].std()))),
    ]
    try:
        with scheduler_for_call(tiny_pipe, "euler") as scheduler:
            tiny_pipe(reference_image, motion32, num_inference_steps=1, generator=torch.Generator().manual_seed(2))
            sigma = float(scheduler.init_noise_sigma)
    finally:
        for hook in hooks:
            hook.remove()
    assert sigma > 10
    for stds in seen.values():
        assert stds and all(0.8 < std < 1.2 for std in stds), stds


def test_a_failing_call_restores_the_scheduler(tiny_pipe, reference_image, motion32):
    own = tiny_pipe.scheduler

    def stop(step, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _animate(tiny_pipe, reference_image, motion32, scheduler="unipc", progress=stop)
    assert tiny_pipe.scheduler is own
