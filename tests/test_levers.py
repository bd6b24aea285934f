"""The speed and memory levers (issue #6) compute what the reference path computes.

Each lever is compared with a straightforward computation on the tiny models: exact up to float rounding where the
lever only reorders work, and a stated behaviour where it changes the algorithm on purpose (sliding windows).
"""

import gc
import weakref
from functools import partial

import numpy as np
import pytest
import torch
from conftest import TINY_SIZE, assert_frames_close, load_tiny_pipeline, tiny_latents
from tiny_models import make_motion
from torch.utils.flop_counter import FlopCounterMode

from magicanimate.pipelines.context_windows import (
    CONTEXT_SCHEDULES,
    FUSION_WEIGHTS,
    context_windows,
    fusion_weights,
    register_context_schedule,
    sliding_windows,
)
from magicanimate.pipelines.control_residuals import ControlResiduals
from magicanimate.pipelines.pipeline_magicanimate import VAE_SCALING_FACTOR


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


# ------------------------------------------------------------------------------------------------ shared down path


class _BlockRows:
    """Rows (windows x branches x frames) seen by the video UNet's first down block and its last up block, per call
    (observation only)."""

    def __init__(self, unet):
        self.down, self.up = [], []
        self.handles = [
            unet.down_blocks[0].register_forward_pre_hook(partial(self._seen, self.down), with_kwargs=True),
            unet.up_blocks[-1].register_forward_pre_hook(partial(self._seen, self.up), with_kwargs=True),
        ]

    @staticmethod
    def _seen(rows, module, args, kwargs):
        rows.append((args[0] if args else kwargs["hidden_states"]).shape[0])

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _rows_and_frames(pipe, reference, motion, **kwargs):
    spy = _BlockRows(pipe.unet)
    try:
        frames = _run(pipe, reference, motion, **kwargs)
    finally:
        spy.remove()
    return spy, frames


@pytest.fixture(scope="module")
def motion32():
    return make_motion(32, TINY_SIZE, seed=5)


def test_shared_down_path_runs_the_down_blocks_once_per_window(tiny_pipe, reference_image, motion32):
    """3 windows, 2 per UNet call: the down blocks see each window once (16 rows), the up blocks once per guidance
    branch (32 rows), where the two-branch path runs both at 32 rows per window."""
    shared, _ = _rows_and_frames(tiny_pipe, reference_image, motion32, context_batch_size=2)
    plain, _ = _rows_and_frames(tiny_pipe, reference_image, motion32, context_batch_size=2, share_down_path=False)
    assert (shared.down, shared.up) == ([32, 16], [64, 32])
    assert (plain.down, plain.up) == ([64, 32], [64, 32])


def test_shared_down_path_stays_within_float32_rounding(tiny_tree, tiny_pipe, reference_image, motion32):
    """Sharing the down path only changes the UNet's batch in the down blocks, so the frames move by float32
    rounding: measured 6.9e-6 to 7.2e-6 on 32 frames, 2 steps, where the same two-branch run in float32 is 3.9e-6
    from the run in float64 (both printed); within the project's float32 rounding tolerance (conftest.FRAME_ATOL,
    3e-5)."""
    kwargs = {"num_inference_steps": 2, "latents": tiny_latents(32, seed=8)}
    shared = _run(tiny_pipe, reference_image, motion32, **kwargs)
    two_branch = _run(tiny_pipe, reference_image, motion32, share_down_path=False, **kwargs)
    pipe64 = load_tiny_pipeline(tiny_tree, dtype=torch.float64)
    two_branch64 = _run(pipe64, reference_image, motion32, share_down_path=False, **kwargs)
    deviation = float(np.abs(shared - two_branch).max())
    rounding = float(np.abs(two_branch - two_branch64).max())
    print(f"shared vs two-branch down path: {deviation:.2e}; two-branch float32 vs float64: {rounding:.2e}")
    assert_frames_close(shared, two_branch)
    assert rounding > 0  # the float64 run is a different computation, so the comparison means something


def test_shared_down_path_saves_exactly_one_down_path_of_work(tiny_pipe, reference_image, motion32):
    """FLOPs of a 2-window UNet call with both guidance branches: the two-branch path minus the shared one is the
    down path of the 2 windows, counted on its own (FLOP counts depend on shapes only: exact)."""
    pipe = tiny_pipe
    t = torch.tensor(501)
    with torch.no_grad():
        text = pipe.encode_prompt("")
    latents = tiny_latents(32, seed=4)
    windows = context_windows(32)[:2]
    encode = partial(pipe.encode_motion, latents, t, text, torch.from_numpy(motion32), scale=1.0)

    def flops(fn):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        return counter.get_total_flops()

    try:
        with torch.no_grad():
            pipe.encode_appearance(pipe.encode_reference(reference_image), t, text)
            residuals = ControlResiduals(encode, 16, windows).take(windows)
            call = partial(pipe.denoise_windows, latents, t, text, windows, residuals, [False, True])
            call(share_down_path=False)  # projects the reference keys/values once, so no counted call does
        two_branch = flops(lambda: call(share_down_path=False))
        shared = flops(lambda: call(share_down_path=True))
        sample = latents[0][:, torch.tensor(windows)].transpose(0, 1)
        down = flops(lambda: pipe.unet.forward_down(sample, t, text.expand(32, -1, -1), residuals[:-1]))
    finally:
        pipe.reference_control.clear()
    print(f"UNet call: {two_branch / 1e9:.3f} -> {shared / 1e9:.3f} GFLOP ({shared / two_branch:.3f}x)")
    assert two_branch - shared == down
    assert shared < 0.9 * two_branch


def test_shared_down_path_falls_back_with_full_fusion(tiny_tree, reference_image, motion16):
    """With "full" fusion the down blocks attend to the reference too, so each branch runs its own down path: the
    shared setting changes nothing (same bits)."""
    pipe = load_tiny_pipeline(tiny_tree, fusion_blocks="full")
    shared, on = _rows_and_frames(pipe, reference_image, motion16)
    plain, off = _rows_and_frames(pipe, reference_image, motion16, share_down_path=False)
    assert shared.down == shared.up == plain.down == [32]
    np.testing.assert_array_equal(on, off)


def test_shared_down_path_falls_back_with_one_branch(tiny_pipe, reference_image, motion16):
    """Without guidance there is one branch: nothing to share (same bits either way)."""
    shared, on = _rows_and_frames(tiny_pipe, reference_image, motion16, guidance_scale=1.0)
    plain, off = _rows_and_frames(tiny_pipe, reference_image, motion16, guidance_scale=1.0, share_down_path=False)
    assert shared.down == shared.up == plain.down == [16]
    np.testing.assert_array_equal(on, off)


def test_shares_down_path_needs_two_branches_one_text_and_no_fused_down_blocks(tiny_tree, tiny_pipe):
    text = tiny_pipe.encode_prompt("")
    negative = tiny_pipe.encode_prompt("blurry")
    assert tiny_pipe.shares_down_path([False, True], [text, text])
    assert not tiny_pipe.shares_down_path([False, True], [negative, text])  # a negative prompt that differs
    assert not tiny_pipe.shares_down_path([True], [text])  # guidance off, or one cfg_parallel rank's branch
    full = load_tiny_pipeline(tiny_tree, fusion_blocks="full")
    assert not full.shares_down_path([False, True], [text, text])


def test_parity_fixture_with_the_shared_down_path(parity):
    """The reference-parity fixture (the original's frames, 1e-4) with the down path shared, and the path really
    taken: its down blocks see half the rows of its up blocks."""
    from magicanimate import MagicAnimatePipeline

    pipe = MagicAnimatePipeline.from_pretrained(parity / "pretrained")
    pipe.set_progress_bar_config(disable=True)
    expected = np.load(parity / "expected" / "frames.npy")
    frames = {}
    for share in (True, False):
        spy = _BlockRows(pipe.unet)
        try:
            frames[share] = pipe(
                parity / "inputs" / "reference.png",
                np.load(parity / "inputs" / "motion.npy"),
                num_inference_steps=4,
                guidance_scale=7.5,
                latents=torch.from_numpy(np.load(parity / "inputs" / "latents.npy")),
                share_down_path=share,
            ).frames
        finally:
            spy.remove()
        assert [(2 if share else 1) * rows for rows in spy.down] == spy.up
    deviations = {share: float(np.abs(f - expected).max()) for share, f in frames.items()}
    print(f"parity frames vs the original's: shared {deviations[True]:.2e}, two-branch {deviations[False]:.2e}")
    assert deviations[True] <= 1e-4


# ------------------------------------------------------------------------------------------------ decode


def test_decode_equals_vae_image_processor_postprocess(tiny_pipe):
    """The clip decoded chunk by chunk into one tensor is what decoding, concatenating and
    ``VaeImageProcessor.postprocess`` give (the same float32 operations: same bits), in a C-contiguous array."""
    latents = tiny_latents(20, seed=6)
    with torch.no_grad():
        frames = tiny_pipe.decode_latents(latents, decode_chunk_size=8)
        chunks = (latents[0].transpose(0, 1) / VAE_SCALING_FACTOR).split(8)
        decoded = torch.cat([tiny_pipe.vae.decode(chunk).sample.float() for chunk in chunks])
    expected = tiny_pipe.image_processor.postprocess(decoded, output_type="np")
    array = tiny_pipe.output_frames(frames, "np")
    np.testing.assert_array_equal(array, expected)
    assert array.flags["C_CONTIGUOUS"] and np.shares_memory(array, frames.numpy())  # no conversion copy


@torch.no_grad()
def test_output_types_are_views_of_the_same_frames(tiny_pipe):
    frames = tiny_pipe.decode_latents(tiny_latents(4, seed=6), decode_chunk_size=16)
    array = tiny_pipe.output_frames(frames, "np")
    tensor = tiny_pipe.output_frames(frames, "pt")
    images = tiny_pipe.output_frames(frames, "pil")
    assert tensor.shape == (4, 3, TINY_SIZE, TINY_SIZE)
    np.testing.assert_array_equal(tensor.permute(0, 2, 3, 1).numpy(), array)
    assert len(images) == 4
    np.testing.assert_array_equal(np.asarray(images[2]), (array[2] * 255).round().astype(np.uint8))
