"""Keyframes (``reference_end``, ``keyframes``): bidirectional sampling between reference photos.

Pinned here: without them the output is today's; the method's defining symmetry (swap the photos, reverse the motion
and the noise: the time-reversed video, up to float rounding); the ends of the clip follow their own keyframe; the
reversed pass reads the frames backwards and costs one more estimate per step whatever the number of keyframes; the
ControlNet runs once per frame and step for both passes.
"""

import numpy as np
import pytest
import torch
from conftest import TINY_SIZE, tiny_latents
from tiny_models import make_motion, make_reference

from magicanimate.errors import InputError
from magicanimate.pipelines.keyframes import KeyframePlan, blend_weight, reversed_windows

STEPS = 2


@pytest.fixture(scope="module")
def motion32():
    return make_motion(32, TINY_SIZE, seed=5)


@pytest.fixture(scope="module")
def photos():
    """Two clearly different photos: the tiny reference and another one (colours rolled, flipped)."""
    a = make_reference(TINY_SIZE)
    b = np.ascontiguousarray(np.roll(np.asarray(a), 1, axis=-1)[:, ::-1])
    return np.asarray(a), b


def _run(pipe, reference, motion, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("latents", tiny_latents(len(motion), seed=2))
    return pipe(reference, motion, **kwargs).frames


def test_without_keyframes_the_output_is_unchanged(tiny_pipe, photos, motion16):
    plain = _run(tiny_pipe, photos[0], motion16)
    np.testing.assert_array_equal(_run(tiny_pipe, photos[0], motion16, reference_end=None, keyframes=None), plain)
    # one keyframe is the plain mode with that photo
    np.testing.assert_array_equal(_run(tiny_pipe, None, motion16, keyframes=[(0, photos[0])]), plain)


@pytest.mark.parametrize("schedule", ["uniform", "sliding"])
def test_swapping_the_photos_and_reversing_time_reverses_the_video(tiny_pipe, photos, motion32, schedule):
    """The symmetry that defines the method, on 32 frames (two windows' worth, the uniform schedule wraps around):
    A -> B on (motion, noise) equals B -> A on the reversed motion and noise, read backwards. Float rounding only:
    the reversed pass sums the same terms in other orders (measured ~1e-7 here; FRAME_ATOL-like 3e-5 allowed)."""
    a, b = photos
    noise = tiny_latents(32, seed=2)
    forward = _run(tiny_pipe, a, motion32, reference_end=b, latents=noise, context_schedule=schedule)
    mirrored = _run(tiny_pipe, b, motion32[::-1].copy(), reference_end=a, latents=noise.flip(2),
                    context_schedule=schedule)  # fmt: skip
    deviation = float(np.abs(mirrored[::-1] - forward).max())
    print(f"{schedule}: |mirrored reversed - forward| max {deviation:.2e}")
    np.testing.assert_allclose(mirrored[::-1], forward, rtol=0, atol=3e-5)
    assert np.abs(forward - forward[::-1]).max() > 1e-3  # the video is not trivially symmetric


def test_each_end_follows_its_own_keyframe(tiny_pipe, photos, motion32):
    a, b = photos
    only_a = _run(tiny_pipe, a, motion32)
    only_b = _run(tiny_pipe, b, motion32)
    both = _run(tiny_pipe, a, motion32, reference_end=b)

    def distance(x, y):
        return float(np.abs(x - y).mean())

    first = (distance(both[0], only_a[0]), distance(both[0], only_b[0]))
    last = (distance(both[-1], only_a[-1]), distance(both[-1], only_b[-1]))
    print(f"first frame: to A-only {first[0]:.4f}, to B-only {first[1]:.4f}; last frame: {last[0]:.4f}, {last[1]:.4f}")
    assert first[0] < first[1] and last[1] < last[0]
    print(f"margins: first {first[1] - first[0]:.4f}, last {last[0] - last[1]:.4f}")


def test_the_reversed_pass_reads_frames_backwards_and_costs_one_estimate(tiny_pipe, photos, motion32):
    """Two and three keyframes make the same UNet calls: twice the windows of the plain mode, half of them over
    windows whose frames run backwards (seen through the latents the UNet receives, frame by frame). The ControlNet
    runs its chunks once per step for both passes."""
    a, b = photos
    noise = torch.arange(32, dtype=torch.float32)[None, None, :, None, None].expand(1, 4, 32, 8, 8).contiguous()

    def record(**kwargs):
        calls, control = [], []
        hooks = [
            tiny_pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0][0, 0, :, 0, 0].clone())),
            tiny_pipe.controlnet.register_forward_hook(lambda *_: control.append(1)),
        ]
        try:
            _run(tiny_pipe, a, motion32, num_inference_steps=1, latents=noise, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        return calls, len(control)

    plain, plain_control = record()
    two, two_control = record(reference_end=b)
    three, three_control = record(keyframes=[(15, b), (31, a)])
    assert len(two) == len(three) == 2 * len(plain) and two_control == three_control == plain_control == 2
    backwards = [frames for frames in two if int((frames[1:] < frames[:-1]).sum()) > len(frames) // 2]
    assert len(backwards) == len(plain)
    mirrored_schedule = reversed_windows([x.long().tolist() for x in plain], 32)  # the windows of the reversed clip
    assert sorted(tuple(x.long().tolist()) for x in backwards) == sorted(tuple(w) for w in mirrored_schedule)


def test_work_is_one_more_estimate_whatever_the_number_of_keyframes(tiny_pipe, photos, motion32):
    """FLOPs (shapes only, exact): two keyframes cost exactly twice the plain video-UNet work (each direction its
    guided estimate) and the same ControlNet work (residuals shared); a third keyframe adds only its appearance
    encoding and its own reference keys/values, under 1% here."""
    from torch.utils.flop_counter import FlopCounterMode

    a, b = photos

    def flops(**kwargs):
        with FlopCounterMode(display=False) as counter:
            _run(tiny_pipe, a, motion32, num_inference_steps=1, output_type="latent", **kwargs)
        return {name: sum(c.values()) for name, c in counter.get_flop_counts().items() if "." not in name}

    plain, two, three = flops(), flops(reference_end=b), flops(keyframes=[(12, b), (31, a)])
    print(f"video UNet: plain {plain['VideoUNet'] / 1e9:.2f}, two keyframes {two['VideoUNet'] / 1e9:.2f}, "
          f"three {three['VideoUNet'] / 1e9:.2f} GFLOP")  # fmt: skip
    assert two["VideoUNet"] == 2 * plain["VideoUNet"]
    assert two["ControlNetModel"] == three["ControlNetModel"] == plain["ControlNetModel"]
    assert 0 < three["VideoUNet"] - two["VideoUNet"] < 0.01 * two["VideoUNet"]


def test_plan_banks_and_weights():
    plan = KeyframePlan.plan([0, 4, 8], 10, "linear")
    assert plan.forward_banks == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert plan.reverse_banks == [0, 1, 1, 1, 1, 2, 2, 2, 2, 2]
    assert plan.forward_weight == [1.0, 0.75, 0.5, 0.25, 0.5, 0.75, 0.5, 0.25, 0.0, 0.0]
    late = KeyframePlan.plan([2, 4], 6, "linear")
    assert late.forward_banks == [0, 0, 0, 0, 1, 1] and late.reverse_banks == [0, 0, 0, 1, 1, 1]
    assert late.forward_weight == [1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    for blend in ("linear", "smooth"):
        for x in np.linspace(0, 1, 11):
            assert blend_weight(1 - x, blend) == pytest.approx(1 - blend_weight(x, blend))
    assert blend_weight(0.1, "smooth") > blend_weight(0.1, "linear")  # eased: stays near the keyframe longer
    assert reversed_windows([[0, 1, 2], [2, 3, 4]], 5) == [[4, 3, 2], [2, 1, 0]]


def test_smooth_blend_and_bad_keyframes(tiny_pipe, photos, motion16):
    a, b = photos
    linear = _run(tiny_pipe, a, motion16, reference_end=b)
    smooth = _run(tiny_pipe, a, motion16, reference_end=b, keyframe_blend="smooth")
    assert not np.array_equal(linear, smooth)
    with pytest.raises(InputError, match="keyframe_blend"):
        _run(tiny_pipe, a, motion16, reference_end=b, keyframe_blend="cubic")
    with pytest.raises(InputError, match="frame must be an integer from 0 to 15"):
        _run(tiny_pipe, a, motion16, keyframes=[(16, b)])
    with pytest.raises(InputError, match="same frame"):
        _run(tiny_pipe, a, motion16, keyframes=[(0, b)])


def test_keyframes_with_the_levers(tiny_pipe, photos, motion32):
    """Batched windows give the same frames (rounding); the feature cache and the noise prior run."""
    a, b = photos
    one = _run(tiny_pipe, a, motion32, reference_end=b, context_schedule="sliding")
    batched = _run(tiny_pipe, a, motion32, reference_end=b, context_schedule="sliding", context_batch_size=3)
    np.testing.assert_allclose(batched, one, rtol=0, atol=3e-5)
    levers = _run(tiny_pipe, a, motion32, reference_end=b, cache_interval=2, noise_prior=0.5)
    assert np.isfinite(levers).all() and levers.shape == one.shape


# ------------------------------------------------------------------------------------------------ front ends


@pytest.fixture(scope="module")
def files(tmp_path_factory, photos):
    from PIL import Image

    from magicanimate.io import write_video

    folder = tmp_path_factory.mktemp("keyframe-inputs")
    Image.fromarray(photos[0]).save(folder / "start.png")
    Image.fromarray(photos[1]).save(folder / "end.png")
    write_video(folder / "motion.mp4", make_motion(12, TINY_SIZE, seed=4), fps=25)
    return folder


def test_api_reference_end_and_references(tiny_pipe, photos, files):
    """``reference_end`` and ``references`` reach the pipeline (the frames change, and equal a direct pipeline call
    with the same keyframes); a keyframe beyond the clip is one line; with frame_stride an odd keyframe is kept."""
    from magicanimate import animate

    common = dict(pipeline=tiny_pipe, steps=1, size=TINY_SIZE, context_frames=12, context_overlap=2)
    plain = animate(files / "start.png", files / "motion.mp4", **common).frames
    ended = animate(files / "start.png", files / "motion.mp4", reference_end=files / "end.png", **common).frames
    middle = animate(None, files / "motion.mp4", references=[(0, files / "start.png"), (5, files / "end.png")],
                     **common).frames  # fmt: skip
    assert ended.shape == plain.shape == middle.shape == (12, TINY_SIZE, TINY_SIZE, 3)
    assert not np.array_equal(ended, plain) and not np.array_equal(middle, ended)
    with pytest.raises(InputError, match="keyframe at frame 12, but the motion has 12 frames"):
        animate(files / "start.png", files / "motion.mp4", references=[(12, files / "end.png")], **common)
    strided = animate(files / "start.png", files / "motion.mp4", references=[(5, files / "end.png")], frame_stride=2,
                      **common)  # fmt: skip
    assert strided.frames.shape == plain.shape


def test_cli_reference_end_and_keyframe_flags(tiny_tree, files, tmp_path):
    from test_cli import run_cli

    out = tmp_path / "out.mp4"
    result = run_cli(
        "animate", "--reference", files / "start.png", "--reference-end", files / "end.png", "--keyframe",
        f"6:{files / 'end.png'}", "--motion", files / "motion.mp4", "-o", out, "--pretrained", tiny_tree,
        "--steps", 1, "--size", TINY_SIZE, "--context-frames", 12, "--keyframe-blend", "smooth",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.is_file()
    bad = run_cli("animate", "--reference", files / "start.png", "--keyframe", "six:end.png", "--motion",
                  files / "motion.mp4", "-o", tmp_path / "bad.mp4")  # fmt: skip
    assert bad.returncode == 2 and "FRAME:PHOTO" in bad.stderr and "Traceback" not in bad.stderr


def test_batch_reference_end(tiny_tree, files, tmp_path):
    import yaml

    from magicanimate.batch import read_manifest

    manifest = tmp_path / "jobs.yaml"
    jobs = [{"reference": str(files / "start.png"), "reference_end": "end.png", "driving": str(files / "motion.mp4"),
             "output": str(tmp_path / "out.mp4")}]  # fmt: skip
    manifest.write_text(
        yaml.safe_dump({"defaults": {"context_frames": 12, "steps": 1, "size": TINY_SIZE}, "jobs": jobs})
    )
    with pytest.raises(InputError, match="end.png"):  # relative to the manifest: not there
        from magicanimate.batch import inspect_job
        from magicanimate.settings import load_config

        inspect_job(read_manifest(manifest).jobs[0], load_config())
    jobs[0]["reference_end"] = str(files / "end.png")
    manifest.write_text(
        yaml.safe_dump({"defaults": {"context_frames": 12, "steps": 1, "size": TINY_SIZE}, "jobs": jobs})
    )
    from test_batch import run_batch

    result = run_batch(manifest, "--pretrained", tiny_tree)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.mp4").is_file()


def test_demo_end_photo(tiny_pipe, files, photos):
    from PIL import Image

    from magicanimate.demo.runner import Animator, Limits, request_settings
    from magicanimate.settings import load_config

    limits = Limits(max_frames=12)
    animator = Animator(tiny_pipe, limits)
    config = request_settings(load_config(None, steps=1, size=TINY_SIZE, context_frames=12), limits)
    try:
        reference = Image.open(files / "start.png")
        plain = animator.run(reference, files / "motion.mp4", config)
        ended = animator.run(reference, files / "motion.mp4", config, reference_end=Image.open(files / "end.png"))
        # the page's other per-request stage controls reach the run too (settings-checked like the CLI's)
        levers = request_settings(config, limits, frame_stride=2, noise_prior=0.3, keyframe_blend="smooth")
        both = animator.run(reference, files / "motion.mp4", levers, reference_end=Image.open(files / "end.png"))
        assert plain.animation.is_file() and ended.animation.is_file() and both.animation.is_file()
        with pytest.raises(InputError, match="keyframe_blend"):
            request_settings(config, limits, keyframe_blend="cubic")
    finally:
        animator.close()


def test_keyframes_with_the_refine_pass(tiny_pipe, files):
    """The refine pass re-noises the first pass's result and denoises it with the same keyframes."""
    from magicanimate import animate

    common = dict(pipeline=tiny_pipe, steps=2, size=TINY_SIZE, context_frames=12, refine_size=96, refine_strength=0.5)
    plain = animate(files / "start.png", files / "motion.mp4", **common).frames
    ended = animate(files / "start.png", files / "motion.mp4", reference_end=files / "end.png", **common).frames
    assert ended.shape == plain.shape == (12, 96, 96, 3) and not np.array_equal(ended, plain)


def test_a_prompt_photo_starts_the_keyframes(tiny_pipe, tiny_tree, files):
    """The photo a prompt makes is the keyframe at frame 0; with keyframes alone no reference is needed; a photo
    and a prompt together stay refused."""
    from magicanimate import animate

    common = dict(pipeline=tiny_pipe, pretrained=str(tiny_tree), steps=1, size=TINY_SIZE, context_frames=12,
                  prompt_steps=1)  # fmt: skip
    video = animate(None, files / "motion.mp4", prompt="a dancer", reference_end=files / "end.png", **common)
    assert video.reference is not None and video.frames.shape == (12, TINY_SIZE, TINY_SIZE, 3)
    alone = animate(None, files / "motion.mp4", references=[(0, files / "start.png"), (11, files / "end.png")],
                    **common)  # fmt: skip
    assert alone.reference is None and alone.frames.shape == video.frames.shape
    with pytest.raises(InputError, match="not both"):
        animate(files / "start.png", files / "motion.mp4", prompt="a dancer", reference_end=files / "end.png",
                **common)  # fmt: skip
