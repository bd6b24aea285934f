"""The refine pass (SDEdit at a larger size: the first pass upscaled, noised part-way and denoised again by the same
models) on the tiny tree built in code.

Strength 0 is the upscaled first pass through the VAE; the steps run are the ones the strength implies; non-square
sizes; the ControlNet gets the motion nearest-neighbour resized; the VAE never sees more than ``decode_chunk_size``
frames per call (memory flat in clip length); the sliding schedule and two gloo processes.
"""

import socket
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import FRAME_ATOL, assert_frames_close, load_tiny_pipeline
from tiny_models import make_motion, make_reference

from magicanimate import animate
from magicanimate.api import denoising_steps
from magicanimate.pipelines import context_windows, magicanimate_scheduler
from magicanimate.settings import load_config
from magicanimate.stages.refine import refine_steps_run, refine_video, resize_motion_nearest, upscale_frames

# The first pass: 64 high, 48 wide; refined with the shorter side 64: 88 x 64 (a non-square size, a latent of 11 x 8).
HEIGHT, WIDTH = 88, 64
WINDOWS = {"context_frames": 8, "context_overlap": 2}


def tall_motion(frames: int, seed: int = 0) -> np.ndarray:
    return np.ascontiguousarray(make_motion(frames, 64, seed=seed)[:, :, 8:56])


@pytest.fixture(scope="module")
def first_pass(tiny_pipe):
    """``(reference, motion, frames)``: 8 frames of the first pass at 64 x 48, one step."""
    reference, motion = make_reference(64), tall_motion(8)
    frames = tiny_pipe(reference, motion, num_inference_steps=1, **WINDOWS).frames
    assert frames.shape == (8, 64, 48, 3)
    return reference, motion, frames


def vae_round_trip(vae, frames: np.ndarray) -> np.ndarray:
    """``frames`` encoded (the latent mean) and decoded by the VAE in one call each: another path than the pipeline's
    (which encodes and decodes in chunks and scales the latents)."""
    with torch.no_grad():
        pixels = torch.from_numpy(frames).permute(0, 3, 1, 2) * 2 - 1
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    return (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_strength_zero_is_the_upscaled_first_pass_through_the_vae(tiny_pipe, first_pass):
    reference, motion, frames = first_pass
    steps = []
    refined = refine_video(tiny_pipe, frames, reference, motion, height=HEIGHT, width=WIDTH, strength=0.0, steps=4,
                           callback_on_step_end=lambda *args: steps.append(args[1]), **WINDOWS)  # fmt: skip
    assert steps == [] and refined.shape == (8, HEIGHT, WIDTH, 3)
    upscaled = upscale_frames(frames, HEIGHT, WIDTH)
    # Nothing but the VAE round trip: measured 4.2e-6 from the one-call round trip (chunks of 4, latents scaled by
    # 0.18215 and back), float32 rounding within conftest's FRAME_ATOL.
    assert_frames_close(refined, vae_round_trip(tiny_pipe.vae, upscaled))
    # So the only loss is the round trip's: what sd-vae-ft-mse's reconstruction loses at the refine size. The tiny
    # random VAE is no autoencoder (it moves values by 0.10 on average), so its error says nothing of the real one's.
    loss = np.abs(vae_round_trip(tiny_pipe.vae, upscaled) - upscaled).mean()
    assert np.abs(refined - upscaled).mean() == pytest.approx(loss, abs=FRAME_ATOL)


def test_the_upscale_and_the_motion_resize():
    frames = np.random.default_rng(0).uniform(0, 1, (3, 16, 12, 3)).astype(np.float32)
    up = upscale_frames(frames, 32, 24)
    assert up.shape == (3, 32, 24, 3) and up.dtype == np.float32 and 0 <= up.min() and up.max() <= 1
    # Bicubic upscaling by 2 and averaging back down by 2 keeps the picture: far closer than another picture.
    down = up.reshape(3, 16, 2, 12, 2, 3).mean(axis=(2, 4))
    assert np.abs(down - frames).mean() < 0.3 * np.abs(frames - frames[::-1]).mean()
    assert upscale_frames(frames, 16, 12) is frames  # the size already: no copy
    motion = tall_motion(2)
    resized = resize_motion_nearest(motion, HEIGHT, WIDTH)
    assert resized.shape == (2, HEIGHT, WIDTH, 3)
    colours = {tuple(colour) for colour in motion.reshape(-1, 3)}
    assert {tuple(colour) for colour in resized.reshape(-1, 3)} <= colours  # never a blend of two part labels


@pytest.mark.parametrize(("steps", "strength"), [(4, 0.5), (4, 0.8), (3, 0.5), (2, 1.0)])
def test_the_steps_run_are_the_ones_the_strength_implies(tiny_pipe, first_pass, steps, strength):
    reference, motion, frames = first_pass
    seen = []

    def record(pipe, step, timestep, tensors):
        seen.append(int(timestep))
        return tensors

    refine_video(tiny_pipe, frames, reference, motion, height=HEIGHT, width=WIDTH, strength=strength, steps=steps,
                 callback_on_step_end=record, **WINDOWS)  # fmt: skip
    run = min(int(steps * strength), steps)
    assert refine_steps_run(steps, strength) == run and len(seen) == run
    schedule = magicanimate_scheduler()
    schedule.set_timesteps(steps)
    assert seen == [int(t) for t in schedule.timesteps[steps - run :]]  # the last ones of the schedule (SDEdit)


def test_the_models_see_the_refine_size_in_chunks_whatever_the_clip_length(tiny_tree):
    """Counting hooks on the real models: the ControlNet gets the motion at the refine size with only its palette
    colours; the VAE encodes the reference once at that size, then the video (and decodes it) in chunks of at most
    ``decode_chunk_size`` frames however long the clip is; the UNet runs the sliding schedule's window batches."""
    pipe = load_tiny_pipeline(tiny_tree)  # its own: hooks are added to its models
    seen = {"encoder": [], "decoder": [], "controlnet": [], "colours": set(), "unet": 0}

    def on_encoder(module, args):
        seen["encoder"].append(tuple(args[0].shape))

    def on_decoder(module, args):
        seen["decoder"].append(args[0].shape[0])

    def on_controlnet(module, args, kwargs):
        cond = kwargs["controlnet_cond"]
        seen["controlnet"].append(tuple(cond.shape[2:]))
        colours = (cond * 255).round().to(torch.uint8).permute(0, 2, 3, 1).reshape(-1, 3).unique(dim=0)
        seen["colours"].update(tuple(colour) for colour in colours.tolist())

    def on_unet(module, args):
        seen["unet"] += 1

    pipe.vae.encoder.register_forward_pre_hook(on_encoder)
    pipe.vae.decoder.register_forward_pre_hook(on_decoder)
    pipe.controlnet.register_forward_pre_hook(on_controlnet, with_kwargs=True)
    pipe.unet.register_forward_pre_hook(on_unet)
    reference = make_reference(64)
    for frames in (6, 22):
        seen.update(encoder=[], decoder=[], controlnet=[], colours=set(), unet=0)
        motion = tall_motion(frames, seed=frames)
        first = np.random.default_rng(frames).uniform(0, 1, (frames, 64, 48, 3)).astype(np.float32)
        call = {**WINDOWS, "context_schedule": "sliding", "context_batch_size": 2, "decode_chunk_size": 4}
        refined = refine_video(pipe, first, reference, motion, height=HEIGHT, width=WIDTH, strength=0.5, steps=2,
                               **call)  # fmt: skip
        assert refined.shape == (frames, HEIGHT, WIDTH, 3)
        assert seen["encoder"][0] == (1, 3, HEIGHT, WIDTH)  # the reference photo, re-encoded at the refine size
        video_calls = seen["encoder"][1:]
        assert sum(shape[0] for shape in video_calls) == frames and max(s[0] for s in video_calls) == 4
        assert {shape[1:] for shape in video_calls} == {(3, HEIGHT, WIDTH)}
        assert sum(seen["decoder"]) == frames and max(seen["decoder"]) == 4  # flat in the clip length
        assert set(seen["controlnet"]) == {(HEIGHT, WIDTH)}
        assert seen["colours"] <= {tuple(int(c) for c in colour) for colour in motion.reshape(-1, 3)}
        padded = -(-frames // 8) * 8
        windows = context_windows(padded, 8, 2, "sliding")
        assert seen["unet"] == -(-len(windows) // 2)  # one step run, two windows per UNet call


def test_animate_refines_at_the_refine_size(tiny_pipe, tiny_tree, caplog):
    import logging

    settings = {"steps": 2, "size": 48, "check_motion": False, "refine_size": 64, "refine_strength": 0.5, **WINDOWS}
    progress = []
    with caplog.at_level(logging.INFO, logger="magicanimate"):
        video = animate(make_reference(64), tall_motion(8), pipeline=tiny_pipe, progress=lambda *a: progress.append(a),
                        pretrained=str(tiny_tree), **settings)  # fmt: skip
    assert video.frames.shape == (8, HEIGHT, WIDTH, 3)
    total = denoising_steps(load_config(**settings))
    assert total == 2 + 1 and progress == [(1, total), (2, total), (3, total)]  # 2 steps, then 1 of 2 refine steps
    plan = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("animating"))
    assert f"then refined at {WIDTH}x{HEIGHT}: 1 of 2 steps (strength 0.5)" in plan


# ------------------------------------------------------------------------------------------------ two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refine(pipe, folder: Path, **kwargs) -> np.ndarray:
    first = np.load(folder / "first.npy")
    motion = tall_motion(len(first), seed=4)
    return refine_video(pipe, first, make_reference(64), motion, height=HEIGHT, width=WIDTH, strength=0.5, steps=2,
                        generator=torch.Generator().manual_seed(2), **WINDOWS, **kwargs)  # fmt: skip


def _worker(rank, port, tree, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))  # fmt: skip
    np.save(Path(folder) / f"rank{rank}.npy", _refine(load_tiny_pipeline(Path(tree)), Path(folder), distributed=True))
    dist.destroy_process_group()


def test_two_gloo_processes_refine_like_one(tiny_pipe, tiny_tree, tmp_path):
    # 20 frames (padded to 24): 4 uniform windows of 8, two per rank; decoded in chunks 4 + 4 + 4 + 4 + 4.
    np.save(tmp_path / "first.npy", np.random.default_rng(3).uniform(0, 1, (20, 64, 48, 3)).astype(np.float32))
    context = mp.get_context("spawn")
    port = _free_port()
    procs = [context.Process(target=_worker, args=(rank, port, str(tiny_tree), str(tmp_path))) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the thread count changes float summation order
    try:
        single = _refine(tiny_pipe, tmp_path)
    finally:
        torch.set_num_threads(threads)
    deadline = time.monotonic() + 240
    for proc in procs:
        proc.join(max(1.0, deadline - time.monotonic()))
    alive = [proc for proc in procs if proc.is_alive()]
    for proc in alive:
        proc.kill()
    assert not alive and [proc.exitcode for proc in procs] == [0, 0]
    rank0, rank1 = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    assert rank0.shape == (20, HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(rank0, rank1)
    # Bit-identical by construction, as the first pass in parity mode (tests/test_distributed.py): every model call
    # has the same inputs as in one process, and at most two windows meet in a frame.
    np.testing.assert_array_equal(rank0, single)
