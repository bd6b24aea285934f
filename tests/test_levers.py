"""The speed and memory levers (issue #6) compute what the reference path computes.

Each lever is compared with a straightforward computation on the tiny models: exact up to float rounding where the
lever only reorders work, and a stated behaviour where it changes the algorithm on purpose (sliding windows).
"""

import gc
import weakref

import numpy as np
import pytest
import torch
from conftest import TINY_SIZE, tiny_latents
from tiny_models import make_motion

from magicanimate.pipelines.context_windows import (
    CONTEXT_SCHEDULES,
    FUSION_WEIGHTS,
    context_windows,
    fusion_weights,
    register_context_schedule,
    sliding_windows,
)


def _run(pipe, reference, motion, **kwargs):
    kwargs.setdefault("num_inference_steps", 1)
    kwargs.setdefault("latents", tiny_latents(len(motion), seed=3))
    return pipe(reference, motion, **kwargs).frames


@pytest.fixture(scope="module")
def motion64():
    return make_motion(64, TINY_SIZE, seed=7)


def test_controlnet_runs_once_per_chunk_and_frees_residuals(tiny_pipe, reference_image, motion64):
    """ControlNet work per step is one call per 16-frame chunk (no frame encoded twice), and the residuals of a
    chunk are released once no later window needs them: at most the chunks of one window batch (+ the wrap-around
    chunk) are alive, however long the clip."""
    calls, alive_at_call, outputs = [], [], []

    def on_forward(module, args, output):
        gc.collect()
        alive_at_call.append(sum(ref() is not None for ref in outputs))
        outputs.append(weakref.ref(output[1]))  # the mid-block residual of this chunk
        calls.append(args[0].shape[0])

    handle = tiny_pipe.controlnet.register_forward_hook(on_forward)
    try:
        _run(tiny_pipe, reference_image, motion64, context_schedule="sliding")
    finally:
        handle.remove()
    assert calls == [16, 16, 16, 16]
    assert max(alive_at_call) <= 1  # with one window per call, one earlier chunk at most is still needed


def test_controlnet_residuals_are_independent_of_window_batching(tiny_pipe, reference_image, motion64):
    one = _run(tiny_pipe, reference_image, motion64, context_batch_size=1)
    three = _run(tiny_pipe, reference_image, motion64, context_batch_size=3)
    np.testing.assert_allclose(one, three, rtol=0, atol=1e-5)  # UNet batch of 3 windows: rounding only


def test_decode_chunking_does_not_change_frames(tiny_pipe, reference_image, motion16):
    whole = _run(tiny_pipe, reference_image, motion16, decode_chunk_size=16)
    single = _run(tiny_pipe, reference_image, motion16, decode_chunk_size=1)
    np.testing.assert_allclose(whole, single, rtol=0, atol=1e-5)


def test_appearance_encoder_batch_one_gives_the_original_batch_two_bank(tiny_pipe):
    """The original runs the appearance encoder on two identical rows and reads row 1; we run one row."""
    control = tiny_pipe.reference_control
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = tiny_pipe.encode_prompt("")
    with torch.no_grad():
        tiny_pipe.appearance_encoder(latent, 501, encoder_hidden_states=text, return_dict=False)
        single = {name: writer.bank.clone() for name, writer in control.writers.items()}
        tiny_pipe.appearance_encoder(latent.repeat(2, 1, 1, 1), 501, encoder_hidden_states=text.repeat(2, 1, 1))
    for name, writer in control.writers.items():
        torch.testing.assert_close(single[name][0], writer.bank[1], rtol=0, atol=1e-5)
    control.clear()


def test_channels_last_gives_the_same_frames(tiny_tree, reference_image, motion16):
    from conftest import load_tiny_pipeline

    pipe = load_tiny_pipeline(tiny_tree)
    before = _run(pipe, reference_image, motion16)
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.controlnet.to(memory_format=torch.channels_last)
    after = _run(pipe, reference_image, motion16)
    np.testing.assert_allclose(before, after, rtol=0, atol=1e-5)


def test_sliding_windows_never_wrap_and_weight_window_centres():
    windows = context_windows(64, 16, 4, "sliding")
    assert all(w == list(range(w[0], w[0] + 16)) for w in windows)
    assert sorted({f for w in windows for f in w}) == list(range(64))
    weights = fusion_weights(16, "sliding")
    assert weights[0] < weights[7] and weights == weights[::-1]
    assert fusion_weights(16, "uniform") == [1.0] * 16


def test_sliding_equals_uniform_when_one_window_covers_the_clip(tiny_pipe, reference_image, motion16):
    uniform = _run(tiny_pipe, reference_image, motion16, context_schedule="uniform")
    sliding = _run(tiny_pipe, reference_image, motion16, context_schedule="sliding")
    np.testing.assert_allclose(uniform, sliding, rtol=0, atol=1e-5)  # weights cancel: (w * p) / w, rounding only


def test_motion_attention_bmm_gives_the_same_frames(tiny_tree, reference_image, motion16):
    from conftest import load_tiny_pipeline

    from magicanimate.loading import apply_speed_settings
    from magicanimate.settings import load_config

    pipe = load_tiny_pipeline(tiny_tree)
    sdpa = _run(pipe, reference_image, motion16)
    apply_speed_settings(pipe, load_config(motion_attention="bmm"))
    kinds = {type(p).__name__ for name, p in pipe.unet.attn_processors.items() if "motion_modules" in name}
    assert kinds == {"AttnProcessor"}
    np.testing.assert_allclose(_run(pipe, reference_image, motion16), sdpa, rtol=0, atol=1e-5)


def test_a_registered_schedule_drives_the_pipeline(tiny_pipe, reference_image, motion64):
    """The pipeline looks schedules up by name: "sliding" registered again under another name (windows and weights)
    gives the same computation, so the same bits; the same windows with equal weights give other frames."""
    register_context_schedule("test-sliding", sliding_windows, FUSION_WEIGHTS["sliding"])
    register_context_schedule("test-sliding-mean", sliding_windows)
    try:
        sliding = _run(tiny_pipe, reference_image, motion64, context_schedule="sliding")
        renamed = _run(tiny_pipe, reference_image, motion64, context_schedule="test-sliding")
        mean = _run(tiny_pipe, reference_image, motion64, context_schedule="test-sliding-mean")
    finally:
        for name in ("test-sliding", "test-sliding-mean"):
            CONTEXT_SCHEDULES.pop(name)
            FUSION_WEIGHTS.pop(name)
    np.testing.assert_array_equal(renamed, sliding)
    assert np.abs(mean - sliding).max() > 1e-3  # the ramp weights matter where windows overlap
