"""Frame interpolation (``frame_stride``): the plug-in protocol and its loader, the stride logic, the built-in flow
interpolator on synthetic scenes with a known answer, and the stage end to end through the API, batch and the CLI on
the tiny models."""

import logging
import sys
import textwrap

import av
import cv2
import numpy as np
import pytest
import yaml
from conftest import TINY_SIZE
from test_cli import run_cli
from tiny_models import make_motion, make_reference

from magicanimate import animate
from magicanimate.batch import run_batch
from magicanimate.densepose.palette import LUT
from magicanimate.errors import InputError
from magicanimate.interpolation import (
    ENTRY_POINT_GROUP,
    FlowInterpolator,
    fill_frames,
    find_interpolator,
    load_interpolator,
    stride_indices,
)
from magicanimate.io import read_video, write_video
from magicanimate.settings import SettingError

# ------------------------------------------------------------------------------------------------ helpers


def blend(frame0: np.ndarray, frame1: np.ndarray, t: float) -> np.ndarray:
    """The linear blend of two frames: the baseline every interpolator must beat, and a valid plug-in."""
    return ((1 - t) * frame0.astype(np.float32) + t * frame1.astype(np.float32) + 0.5).astype(np.uint8)


def decoded(path) -> tuple[str, float, int]:
    """``(codec, fps, frame count)`` of a written video."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.codec_context.name, float(stream.average_rate), sum(1 for _ in container.decode(stream))


def psnr(estimate: np.ndarray, truth: np.ndarray, where: np.ndarray | None = None) -> float:
    error = (estimate.astype(np.float64) - truth.astype(np.float64)) ** 2
    return float(10 * np.log10(255.0**2 / max((error if where is None else error[where]).mean(), 1e-12)))


def texture(shape: tuple, seed: int, blur: float) -> np.ndarray:
    noise = np.random.default_rng(seed).uniform(0, 255, shape).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), blur)
    return np.clip((smooth - smooth.mean()) / smooth.std() * 50 + 128, 0, 255).astype(np.uint8)


def moving_scene(frames: int = 3, size: int = 128, step: tuple = (3, 2), box: tuple = (48, 36)):
    """``(pictures, poses)``: a textured box moving ``step`` (x, y) pixels per frame over a still textured
    background (RGB pictures, as the animation makes), and its DensePose-like guide (two palette parts on a purple
    background) moving the same way. Each ``(frames, size, size, 3)`` uint8."""
    background, patch = texture((size, size, 3), 1, 4.0), texture((*box, 3), 2, 3.0)
    pictures = np.repeat(background[None], frames, axis=0)
    poses = np.empty_like(pictures)
    poses[:] = LUT[0]
    for f in range(frames):
        y, x = size // 4 + step[1] * f, size // 4 + step[0] * f
        pictures[f, y : y + box[0], x : x + box[1]] = patch
        poses[f, y : y + box[0] // 2, x : x + box[1]] = LUT[10]
        poses[f, y + box[0] // 2 : y + box[0], x : x + box[1]] = LUT[20]
    return pictures, poses


# ------------------------------------------------------------------------------------------------ stride logic


@pytest.mark.parametrize(
    ("frames", "stride", "expected"),
    [
        (10, 1, list(range(10))),
        (10, 2, [0, 2, 4, 6, 8, 9]),  # the last frame is always animated
        (9, 2, [0, 2, 4, 6, 8]),
        (8, 3, [0, 3, 6, 7]),
        (7, 3, [0, 3, 6]),
        (3, 8, [0, 2]),
        (1, 4, [0]),
    ],
)
def test_stride_indices(frames, stride, expected):
    assert stride_indices(frames, stride) == expected


def test_fill_keeps_the_count_and_the_animated_frames_exactly():
    rng = np.random.default_rng(0)
    indices = stride_indices(11, 4)  # [0, 4, 8, 10]: gaps of 3, 3 and 1 frames
    animated = rng.integers(0, 256, (len(indices), 6, 5, 3), dtype=np.uint8)
    seen = []

    def record(frame0, frame1, t):
        seen.append((int(frame0[0, 0, 0]), int(frame1[0, 0, 0]), round(t, 6)))
        return blend(frame0, frame1, t)

    filled = fill_frames(animated, indices, 11, record, progress=False)
    assert filled.shape == (11, 6, 5, 3) and filled.dtype == np.uint8
    np.testing.assert_array_equal(filled[indices], animated)
    first = [int(animated[i, 0, 0, 0]) for i in range(4)]
    assert seen == [
        (first[0], first[1], 0.25), (first[0], first[1], 0.5), (first[0], first[1], 0.75),
        (first[1], first[2], 0.25), (first[1], first[2], 0.5), (first[1], first[2], 0.75),
        (first[2], first[3], 0.5),
    ]  # fmt: skip
    np.testing.assert_array_equal(filled[9], blend(animated[2], animated[3], 0.5))


def test_fill_uses_the_batch_form_with_the_gaps_motion_at_the_frames_size():
    indices = stride_indices(7, 3)  # [0, 3, 6]
    animated = np.stack([np.full((8, 8, 3), 40 * i, np.uint8) for i in range(len(indices))])
    motion = np.stack([np.full((4, 4, 3), i, np.uint8) for i in range(7)])  # half the size: resized nearest
    calls, progress = [], []

    class Batched:
        def __call__(self, frame0, frame1, t):
            raise AssertionError("the batch form is there: it must be used")

        def interpolate(self, frame0, frame1, times, motion=None):
            calls.append((list(times), motion.shape, sorted(np.unique(motion))))
            return np.stack([blend(frame0, frame1, t) for t in times])

    filled = fill_frames(animated, indices, 7, Batched(), motion=motion, progress=lambda *a: progress.append(a))
    assert calls == [([1 / 3, 2 / 3], (4, 8, 8, 3), [0, 1, 2, 3]), ([1 / 3, 2 / 3], (4, 8, 8, 3), [3, 4, 5, 6])]
    assert progress == [(2, 4), (4, 4)]
    np.testing.assert_array_equal(filled[indices], animated)


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (lambda f0, f1, t: f0[:4], r"returned a uint8 array of shape \(4, 8, 3\); it must return uint8 RGB frames"),
        (lambda f0, f1, t: f0 / 255.0, r"returned a float64 array"),
    ],
)
def test_an_interpolator_returning_no_frame_is_one_line(returned, message):
    animated = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(InputError, match=message) as caught:
        fill_frames(animated, [0, 2], 3, returned, progress=False)
    assert "\n" not in str(caught.value)


def test_inputs_of_an_interpolator_are_read_only():
    def scribble(frame0, frame1, t):
        frame0[:] = 0
        return frame0

    with pytest.raises(ValueError, match="read-only"):
        fill_frames(np.full((2, 4, 4, 3), 9, np.uint8), [0, 2], 3, scribble, progress=False)


# ------------------------------------------------------------------------------------------------ the loader


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """A plug-in package on the Python path, installed as a distribution whose entry points name its objects."""
    (tmp_path / "user_interpolators.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            class Halfway:
                '''A class: the loader creates it without arguments.'''
                def __call__(self, frame0, frame1, t):
                    return ((frame0.astype(np.float32) + frame1) / 2 + 0.5).astype(np.uint8)

            def earlier(frame0, frame1, t):
                return frame0 if t < 0.5 else frame1

            class NeedsWeights:
                def __init__(self):
                    raise FileNotFoundError("rife.pkl not found; set RIFE_WEIGHTS\\nsecond line")

            not_an_interpolator = 42
            """
        )
    )
    (tmp_path / "broken_interpolator.py").write_text("raise RuntimeError('boom at import')\n")
    dist = tmp_path / "user_interpolators-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: user-interpolators\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nhalfway = user_interpolators:Halfway\nbroken = broken_interpolator:anything\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("user_interpolators", None)  # the next test's copy is imported from its own folder


def test_the_loader_finds_objects_names_entry_points_and_dotted_paths(plugins):
    frame0, frame1 = np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 200, np.uint8)
    assert isinstance(load_interpolator("flow"), FlowInterpolator)
    assert load_interpolator(blend) is blend  # an object is used as it is
    assert isinstance(load_interpolator(FlowInterpolator), FlowInterpolator)  # a class is created
    by_entry_point = load_interpolator("halfway")
    assert type(by_entry_point).__name__ == "Halfway" and by_entry_point(frame0, frame1, 0.3)[0, 0, 0] == 100
    assert load_interpolator("user_interpolators:earlier")(frame0, frame1, 0.7) is frame1
    assert type(load_interpolator("user_interpolators:Halfway")).__name__ == "Halfway"
    assert find_interpolator("user_interpolators:NeedsWeights").__name__ == "NeedsWeights"  # found, not created


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope", r"interpolator 'nope' is not 'flow', an entry point of the magicanimate.interpolators group "
                 r"\(installed: broken, halfway\) or a dotted path"),
        ("no_such_module_here:thing", r"no module named 'no_such_module_here' on the Python path"),
        ("user_interpolators:Missing", r"user_interpolators has no 'Missing'"),
        ("user_interpolators:", r"must be 'flow', an entry point name"),
        ("two words", r"must be 'flow', an entry point name"),
        ("broken_interpolator:x", r"importing broken_interpolator failed: RuntimeError: boom at import"),
        ("broken", r"'broken' \(entry point broken_interpolator:anything\) cannot be loaded: RuntimeError: boom"),
        ("user_interpolators:NeedsWeights", r"creating it failed: FileNotFoundError: rife.pkl not found"),
        ("user_interpolators:not_an_interpolator", r"\(int\) is not an interpolator: it must be callable as f"),
    ],
)  # fmt: skip
def test_bad_specs_are_one_line(plugins, spec, message):
    with pytest.raises(SettingError, match=message) as caught:
        load_interpolator(spec)
    assert caught.value.key == "interpolator" and "\n" not in str(caught.value)


# ------------------------------------------------------------------------------------------------ the flow interpolator


def test_flow_beats_the_linear_blend_on_a_moving_pattern():
    pictures, poses = moving_scene()
    interpolator = FlowInterpolator()
    linear = psnr(blend(pictures[0], pictures[2], 0.5), pictures[1])
    plain = psnr(interpolator(pictures[0], pictures[2], 0.5), pictures[1])
    guided = psnr(interpolator.interpolate(pictures[0], pictures[2], [0.5], motion=poses)[0], pictures[1])
    print(f"moving pattern: blend {linear:.2f} dB, flow {plain:.2f} dB ({plain - linear:+.2f}), flow + DensePose "
          f"{guided:.2f} dB ({guided - linear:+.2f})")  # fmt: skip
    # Measured (OpenCV 5.0, x86-64): blend 26.2, flow 34.6, flow + DensePose 41.2 dB. The bounds leave room for other
    # OpenCV builds' rounding in DIS, not for a broken warp (which lands at or below the blend).
    assert plain > linear + 4.0
    assert guided > plain + 3.0


def test_flow_with_densepose_at_thirds():
    """Stride 3: the times 1/3 and 2/3 between frames 0 and 3, the DensePose of all four frames as the guide."""
    pictures, poses = moving_scene(frames=4)
    made = FlowInterpolator().interpolate(pictures[0], pictures[3], [1 / 3, 2 / 3], motion=poses)
    for j, t in enumerate((1 / 3, 2 / 3), start=1):
        linear, guided = psnr(blend(pictures[0], pictures[3], t), pictures[j]), psnr(made[j - 1], pictures[j])
        print(f"t = {t:.2f}: blend {linear:.2f} dB, flow + DensePose {guided:.2f} dB")
        assert guided > linear + 8.0  # measured: blend 24.2 / 24.4, guided 36.8 / 36.2 dB


def test_the_background_next_to_the_body_stays_still():
    """The DensePose knows only the body: beside it, the frames' own flow holds the still background in place
    (with the body's flow everywhere, the background next to the body is dragged along: 34.6 dB there)."""
    pictures, poses = moving_scene()
    body = (np.abs(poses.astype(np.int16) - LUT[0]).max(axis=-1) > 8).any(axis=0).astype(np.uint8)
    beside = cv2.dilate(body, np.ones((33, 33), np.uint8)) > cv2.dilate(body, np.ones((7, 7), np.uint8))
    made = FlowInterpolator().interpolate(pictures[0], pictures[2], [0.5], motion=poses)[0]
    beside_psnr = psnr(made, pictures[1], where=beside)
    print(f"background 3-16 px from the body: {beside_psnr:.2f} dB")
    assert beside_psnr > 40.0  # measured 44.0 dB


def test_flow_refuses_mismatched_inputs_in_one_line():
    frame = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(InputError, match="differ in size"):
        FlowInterpolator()(frame, np.zeros((16, 8, 3), np.uint8), 0.5)
    with pytest.raises(InputError, match=r"must lie in \(0, 1\)"):
        FlowInterpolator()(frame, frame, 1.0)
    with pytest.raises(InputError, match=r"the DensePose of a gap must be 3 frames"):
        FlowInterpolator().interpolate(frame, frame, [0.5], motion=np.zeros((2, 16, 16, 3), np.uint8))


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def motion_file(tmp_path_factory):
    """A 12-frame DensePose-like clip at 12.5 fps (not the default 25): animated at stride 2 are 0, 2, ..., 10, 11."""
    path = tmp_path_factory.mktemp("stride-motion") / "motion.mp4"
    write_video(path, make_motion(12, TINY_SIZE, seed=3), fps=12.5)
    return path


def test_animate_at_stride_2_animates_the_strided_frames_and_fills_the_rest(
    tiny_pipe, reference_image, motion_file, caplog
):
    settings = {"pipeline": tiny_pipe, "steps": 1, "size": TINY_SIZE, "context_frames": 8, "context_overlap": 2}
    with caplog.at_level(logging.INFO, logger="magicanimate"):
        video = animate(reference_image, motion_file, frame_stride=2, **settings)
    motion, fps = read_video(motion_file)
    keep = [0, 2, 4, 6, 8, 10, 11]
    assert video.frames.shape == (12, TINY_SIZE, TINY_SIZE, 3) and video.fps == fps == 12.5
    np.testing.assert_array_equal(video.motion, motion)  # all the motion, not the strided part
    plan = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("frame_stride", "animating"))]
    assert "7 of the 12 frames are animated" in plan[0] and plan[1].startswith("animating 7 frames")
    # The strided frames are exactly what the stages make of the subsampled motion: the pipeline saw only those.
    direct = animate(reference_image, motion[keep], **settings)
    np.testing.assert_array_equal(video.frames[keep], direct.frames)
    # The frames between are the built-in's, from the animated neighbours and the DensePose of the gap.
    middle = FlowInterpolator().interpolate(video.frames[2], video.frames[4], [0.5], motion=motion[2:5])[0]
    np.testing.assert_array_equal(video.frames[3], middle)


def test_an_interpolator_object_and_the_grid(tiny_pipe, reference_image, motion16):
    times = []

    def linear(frame0, frame1, t):
        times.append(round(t, 6))
        return blend(frame0, frame1, t)

    motion = motion16[:6]
    video = animate(reference_image, motion, pipeline=tiny_pipe, steps=1, size=TINY_SIZE, frame_stride=3,
                    interpolator=linear, grid=True, check_motion=False)  # fmt: skip
    assert times == [0.333333, 0.666667, 0.5]  # [0, 3, 5] animated
    assert video.frames.shape == (6, TINY_SIZE, 3 * TINY_SIZE, 3)
    result = video.frames[:, :, 2 * TINY_SIZE :]
    np.testing.assert_array_equal(video.frames[:, :, TINY_SIZE : 2 * TINY_SIZE], motion)  # every motion frame
    np.testing.assert_array_equal(result[4], blend(result[3], result[5], 0.5))


def test_batch_checks_and_passes_the_stride(tiny_pipe, tmp_path, motion_file):
    from PIL import Image

    Image.fromarray(make_reference(TINY_SIZE)).save(tmp_path / "ref.png")
    job = {"reference": "ref.png", "driving": str(motion_file), "output": "out.mp4", "frame_stride": 2}
    manifest = tmp_path / "jobs.yaml"
    manifest.write_text(yaml.safe_dump({"defaults": {"steps": 1, "size": TINY_SIZE}, "jobs": [job]}))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"jobs": [{**job, "interpolator": "no_such_module_here:rife"}]}))
    with pytest.raises(InputError, match=r"^job 1: interpolator 'no_such_module_here:rife': no module named"):
        run_batch(bad)  # before any model loads (none is given here)
    (result,) = run_batch(manifest, pipeline=tiny_pipe)
    assert result.status == "done", result.error
    _, fps, count = decoded(tmp_path / "out.mp4")
    assert count == 12 and fps == pytest.approx(12.5)


def test_cli_animate_with_frame_stride(tiny_tree, motion_file, tmp_path):
    from PIL import Image

    reference = tmp_path / "reference.png"
    Image.fromarray(make_reference(TINY_SIZE)).save(reference)
    out = tmp_path / "out.mp4"
    common = ("animate", "--reference", reference, "--motion", motion_file, "--pretrained", tiny_tree, "--steps", 1,
              "--size", TINY_SIZE, "--frame-stride", 2)  # fmt: skip
    result = run_cli(*common, "-o", out)
    assert result.returncode == 0, result.stderr
    assert "7 of the 12 frames are animated" in result.stderr
    codec, fps, count = decoded(out)
    assert codec == "h264" and count == 12 and fps == pytest.approx(12.5)
    refused = run_cli(*common, "-o", tmp_path / "never.mp4", "--interpolator", "nope")
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: interpolator 'nope' is not 'flow'") and refused.stderr.count("\n") == 1
    assert "(--interpolator, or interpolator: in --config)" in refused.stderr
    assert not (tmp_path / "never.mp4").exists()


def test_the_demo_servers_frame_stride_reaches_every_request(tiny_pipe, motion_file, caplog):
    """``magicanimate demo --frame-stride 2``: a server setting, like the other speed levers (the UI shows none)."""
    from magicanimate.demo.runner import Animator, Limits, request_settings
    from magicanimate.settings import load_config

    server = load_config(steps=1, size=TINY_SIZE, frame_stride=2, context_frames=8, context_overlap=2)
    animator = Animator(tiny_pipe, Limits())
    try:
        with caplog.at_level(logging.INFO, logger="magicanimate"):
            result = animator.run(make_reference(TINY_SIZE), motion_file, request_settings(server, Limits()))
        _, fps, count = decoded(result.animation)
    finally:
        animator.close()
    assert any("7 of the 12 frames are animated" in record.getMessage() for record in caplog.records)
    assert count == 12 and fps == pytest.approx(12.5)
