"""DensePose extraction (magicanimate.densepose) on CPU, with a scripted stand-in for the real TorchScript export.

The stand-in has exactly the export's contract (uint8 ``(3, H, W)`` in; boxes, coarse, fine, u, v out) and is saved
with ``torch.jit.save`` and loaded through the package's own loader. It "detects" pure-red (first, higher score)
and pure-green rectangles, reading the image as BGR, and paints a fixed body of known part rectangles in each box.
"""

import argparse
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from magicanimate.densepose import (
    LUT,
    MOTION_PALETTE_SHARE,
    Person,
    TorchScriptExtractor,
    check_motion,
    command,
    crop_windows,
    densepose_share,
    extract_motion,
    flip_rate,
    frame_labels,
    hold_last,
    iter_frames,
    labels_to_rgb,
    looks_like_densepose,
    majority_filter,
    nearest_labels,
    palette_share,
    paste_persons,
    resample_indices,
    resize_labels,
    resolve_model_path,
    sample_video,
    select_persons,
)
from magicanimate.densepose.align import box_alignment, transform_box
from magicanimate.densepose.extractor import HUB_REPO, MODEL_ENV, chart_to_labels
from magicanimate.errors import CheckpointError, InputError
from magicanimate.io import read_video, write_video

SHARED = Path(__file__).resolve().parents[2] / "shared"
SAMPLES = SHARED / "samples" / "densepose"
RED, GREEN = (255, 0, 0), (0, 255, 0)

# --------------------------------------------------------------------------------------------- stand-in model

# Part rectangles of the stand-in body, in fractions of its box: (label, top, bottom, left, right).
BODY = [(23, 0.0, 0.2, 0.3, 0.7), (2, 0.2, 0.55, 0.25, 0.75), (15, 0.2, 0.55, 0.0, 0.25), (16, 0.2, 0.55, 0.75, 1.0),
        (7, 0.55, 1.0, 0.25, 0.5), (8, 0.55, 1.0, 0.5, 0.75)]  # fmt: skip


def body_templates(grid: int = 112) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse ``(2, g, g)`` and fine ``(25, g, g)`` logits of the stand-in body."""
    coarse, fine = torch.zeros(2, grid, grid), torch.zeros(25, grid, grid)
    coarse[0] = 5.0
    fine[1] = 1.0
    for label, top, bottom, left, right in BODY:
        rows, cols = slice(round(top * grid), round(bottom * grid)), slice(round(left * grid), round(right * grid))
        coarse[0, rows, cols], coarse[1, rows, cols], fine[label, rows, cols] = 0.0, 5.0, 10.0
    return coarse, fine


class StandInDensePose(torch.nn.Module):
    """The export's contract: a red and a green rectangle are the persons, each painted with the BODY parts."""

    def __init__(self):
        super().__init__()
        coarse, fine = body_templates()
        self.register_buffer("coarse", coarse)
        self.register_buffer("fine", fine)

    def forward(
        self, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        assert image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3
        b, g, r = image[0].int(), image[1].int(), image[2].int()  # BGR, as the real export expects
        boxes: list[torch.Tensor] = []
        for mask in [(r > 128) & (g < 100) & (b < 100), (g > 128) & (r < 100) & (b < 100)]:
            points = torch.nonzero(mask)
            if points.shape[0] > 0:
                y0, x0 = points[:, 0].min(), points[:, 1].min()
                y1, x1 = points[:, 0].max() + 1, points[:, 1].max() + 1
                boxes.append(torch.stack([x0, y0, x1, y1]).float())
        n = len(boxes)
        pred_boxes = torch.stack(boxes) if n > 0 else torch.zeros(0, 4)
        uv = torch.zeros(n, 25, 112, 112)
        return pred_boxes, self.coarse.expand(n, 2, 112, 112), self.fine.expand(n, 25, 112, 112), uv, uv


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The stand-in's tensors are tiny: OpenMP threads only add overhead (20x on a loaded 2-core runner)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_stand_in(path: Path) -> Path:
    """Script and save the stand-in as the real file is shipped: a TorchScript archive."""
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13, but it is the export's format
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(StandInDensePose()), str(path))
    return path


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    return save_stand_in(tmp_path_factory.mktemp("densepose-model") / "stand_in.torchscript")


def scene(width=160, height=120, red=None, green=None) -> np.ndarray:
    """Black RGB frame with a red and/or green rectangle, each given as xyxy."""
    frame = np.zeros((height, width, 3), np.uint8)
    for box, colour in ((red, RED), (green, GREEN)):
        if box is not None:
            x0, y0, x1, y1 = box
            frame[y0:y1, x0:x1] = colour
    return frame


def walking_video(path: Path, frames=30, fps=30.0, blank=()) -> Path:
    """A 30x60 red 'person' walking left to right across 160x120 (frames in `blank` show nobody)."""
    clip = []
    for t in range(frames):
        x = 5 + round(t * 120 / max(frames - 1, 1))
        clip.append(scene(red=None if t in blank else (x, 40, x + 30, 100)))
    return write_video(path, clip, fps=fps)


def faint_densepose(frames: int = 8, size: int = 64) -> np.ndarray:
    """A small DensePose clip with a grey caption band over a third of it: after H.264 about 0.6 of its pixels are
    on the palette, under the 0.8 that `batch` once asked for and over the 0.5 that `animate` accepts."""
    labels = np.zeros((frames, size, size), np.uint8)
    for t in range(frames):
        labels[t, size // 3 :, size // 4 + t : size // 2 + t] = 2 + t % 20
        labels[t, size // 2 :, size // 2 + t : 3 * size // 4 + t] = 7
    clip = labels_to_rgb(labels)
    clip[:, : size // 3] = 128
    return clip


def foreground_box(labels: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(labels)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


def only_lut_colours(frames: np.ndarray) -> bool:
    colours = np.unique(frames.reshape(-1, 3), axis=0)
    return bool((colours[:, None, :] == LUT[None]).all(-1).any(1).all())


# ---------------------------------------------------------------------------------------------------- palette


def test_lut_is_opencv_viridis():
    cv2 = pytest.importorskip("cv2", reason="opencv not installed: the LUT is checked against cv2's VIRIDIS")
    values = (np.arange(25) * 255 / 24).astype(np.uint8)[:, None]
    expected = cv2.applyColorMap(values, cv2.COLORMAP_VIRIDIS)[:, 0, ::-1]
    np.testing.assert_array_equal(LUT, expected)
    assert tuple(LUT[0]) == (68, 1, 84)


def test_palette_matches_shared_samples():
    """The original MagicAnimate driving videos decode to within a few units of the LUT (alpha 1, viridis)."""
    samples = sorted(SAMPLES.glob("*.mp4"))
    if not samples:
        pytest.skip(f"{SAMPLES} not found: the shared sample videos are only present in CI")
    for sample in samples:
        frames = [f for i, f in enumerate(iter_frames(sample, max_frames=40)) if i % 10 == 0]
        labels, distance = zip(*(nearest_labels(f) for f in frames), strict=True)
        labels, distance = np.stack(labels), np.stack(distance)
        foreground = labels > 0
        assert frames[0].shape == (512, 512, 3)
        assert np.median(distance[foreground]) < 6, sample.name
        assert (distance[foreground] <= 12).mean() > 0.85, sample.name
        assert np.bincount(labels.ravel(), minlength=25).argmax() == 0  # the purple background dominates
        assert min(palette_share(f, stride=2) for f in frames) > 0.9, sample.name


def test_palette_share_separates_densepose_from_photos():
    rng = np.random.default_rng(0)
    labels = np.zeros((64, 64), np.uint8)
    labels[10:60, 20:40] = rng.integers(1, 25, (50, 20))
    assert palette_share(labels_to_rgb(labels)) == 1.0
    y, x = np.mgrid[0:64, 0:64]
    photo = np.stack([x * 4, y * 4, (x + y) * 2], -1) + rng.integers(0, 30, (64, 64, 3))
    assert palette_share(np.clip(photo, 0, 255).astype(np.uint8)) < 0.3
    skeleton = np.zeros((64, 64, 3), np.uint8)  # an OpenPose-style image: coloured limbs on black
    skeleton[10:50, 30:33], skeleton[20:23, 10:50] = (255, 0, 0), (0, 255, 255)
    assert palette_share(skeleton) < 0.3


def test_one_densepose_threshold_for_every_caller(tmp_path):
    """`looks_like_densepose` (batch, demo) and `check_motion` (animate) give one verdict for every clip: a faint
    small DensePose clip is accepted by both, a photo-like clip refused by both, at any mix in between alike."""
    faint = write_video(tmp_path / "faint.mp4", faint_densepose(), fps=25)
    frames, _ = read_video(faint)
    assert MOTION_PALETTE_SHARE <= densepose_share(frames) < 0.8
    assert looks_like_densepose(frames)
    check_motion(frames, "faint.mp4")
    y, x = np.mgrid[0:64, 0:64]
    photo = np.clip(np.stack([x * 4, y * 4, (x + y) * 2], -1), 0, 255).astype(np.uint8)
    for covered in np.linspace(0, 1, 11):  # the share of each frame painted as DensePose
        clip = np.repeat(photo[None], 4, axis=0)
        clip[:, : round(64 * covered)] = labels_to_rgb(np.full((round(64 * covered), 64), 5, np.uint8))
        try:
            check_motion(clip)
            accepted = True
        except InputError as err:
            assert "is not a DensePose video" in str(err) and "--driving" in str(err)
            accepted = False
        assert accepted == looks_like_densepose(clip) == (densepose_share(clip) >= MOTION_PALETTE_SHARE), covered


def test_sample_video_reads_what_the_check_looks_at(tmp_path):
    """Decoding only the sampled frames of a file gives the verdict (and share) of the whole decoded clip."""
    clip = np.concatenate([faint_densepose(20), np.zeros((20, 64, 64, 3), np.uint8)])  # DensePose, then black
    path = write_video(tmp_path / "clip.mp4", clip, fps=25)
    frames, _ = read_video(path)
    assert densepose_share(sample_video(path)) == densepose_share(frames)
    assert len(sample_video(path)) == 8
    first, _ = read_video(path, max_frames=12)
    assert densepose_share(sample_video(path, max_frames=12)) == densepose_share(first)
    assert looks_like_densepose(first) and not looks_like_densepose(frames)  # the black half counts
    with pytest.raises(InputError, match="not found"):
        sample_video(tmp_path / "missing.mp4")


# ----------------------------------------------------------------------------------------------------- render


def test_render_only_lut_colours_higher_score_wins_overlap():
    low = Person([10, 10, 40, 50], 0.6, np.full((40, 30), 5, np.uint8))
    high = Person([30, 20, 60, 60], 0.9, np.pad(np.full((30, 20), 23, np.uint8), 5))  # label 0 border
    for order in ([low, high], [high, low]):
        canvas = paste_persons(np.zeros((64, 64), np.uint8), order)
        assert canvas[30, 35] == 23  # overlap: the higher score wins, whatever the list order
        assert canvas[30, 15] == 5  # the other person keeps its parts outside the overlap
        assert canvas[22, 38] == 5  # high's label-0 border (rows 20-24) does not hide low's parts
        assert canvas[5, 5] == 0 and canvas[62, 62] == 0
        assert only_lut_colours(labels_to_rgb(canvas))


def test_nearest_resize_keeps_labels_pure():
    labels = np.random.default_rng(1).integers(0, 25, (37, 23)).astype(np.uint8)
    for height, width in ((100, 64), (10, 7), (37, 23)):
        resized = resize_labels(labels, height, width)
        assert resized.shape == (height, width) and resized.dtype == np.uint8
        assert set(np.unique(resized)) <= set(np.unique(labels))
    np.testing.assert_array_equal(resize_labels(labels, 74, 46), labels.repeat(2, 0).repeat(2, 1))
    np.testing.assert_array_equal(resize_labels(labels, 37, 23), labels)


# -------------------------------------------------------------------------------------------------- extractor


def test_stand_in_through_the_real_loader(stand_in):
    frame = scene(red=(40, 20, 70, 100), green=(100, 30, 140, 90))
    persons = TorchScriptExtractor(stand_in, device="cpu")(frame)
    assert len(persons) == 2
    red, green = persons
    assert red.score > green.score  # detection order stands in for the score
    np.testing.assert_array_equal(red.box, [40, 20, 70, 100])
    np.testing.assert_array_equal(green.box, [100, 30, 140, 90])
    assert red.labels.shape == (80, 30)  # labels at box resolution, as detectron2 resamples them
    assert red.labels[40, 15] == 2 and red.labels[5, 15] == 23 and red.labels[70, 10] == 7
    assert red.labels[70, 2] == 0  # coarse background inside the box
    assert set(np.unique(red.labels)) == {0, 2, 7, 8, 15, 16, 23}

    # RGB order hides the red person from a model that reads BGR: the channel order reaches the model.
    rgb = TorchScriptExtractor(stand_in, device="cpu", channel_order="RGB")(frame)
    assert [p.box.tolist() for p in rgb] == [[100, 30, 140, 90]]

    capped = TorchScriptExtractor(stand_in, device="cpu", label_cap=40)(frame)[0]
    assert capped.labels.shape == (40, 15)


def test_chart_to_labels_masks_coarse_background():
    coarse, fine = torch.randn(2, 112, 112), torch.randn(25, 112, 112)
    labels = chart_to_labels(coarse, fine, np.array([0, 0, 56, 112]))
    assert labels.shape == (112, 56) and labels.dtype == np.uint8
    up_coarse = torch.nn.functional.interpolate(coarse[None], (112, 56), mode="bilinear", align_corners=False)[0]
    assert (labels[(up_coarse.argmax(0) == 0).numpy()] == 0).all()
    assert labels.max() <= 24


def test_model_resolution(stand_in, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv(MODEL_ENV, raising=False)
    assert resolve_model_path(stand_in) == stand_in
    with pytest.raises(CheckpointError, match="--model"):
        resolve_model_path(tmp_path / "missing.torchscript")
    monkeypatch.setenv(MODEL_ENV, str(stand_in))
    assert resolve_model_path() == stand_in
    monkeypatch.delenv(MODEL_ENV)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match=f"offline.*{HUB_REPO}.*--model"):
        resolve_model_path()
    junk = tmp_path / "junk.torchscript"
    junk.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="not a TorchScript"):
        TorchScriptExtractor(junk, device="cpu")


# ---------------------------------------------------------------------------------------------------- framing


def test_framing_follows_the_person_smoothly():
    rng = np.random.default_rng(2)
    t = np.arange(100)
    x = t * 10 + rng.normal(0, 4, 100)  # walks 1000 px with detector jitter
    boxes = np.stack([x, 200 + rng.normal(0, 4, 100), x + 100, 500 + rng.normal(0, 4, 100)], 1)
    windows = crop_windows(boxes, fps=25)
    centre, side = windows[:, :2], windows[:, 2]
    assert np.ptp(side) == 0  # one zoom for the whole clip
    assert (centre - side[:, None] / 2 <= boxes[:, :2] + 1e-6).all()  # the person is always inside
    assert (centre + side[:, None] / 2 >= boxes[:, 2:] - 1e-6).all()
    assert np.ptp(centre[:, 0]) > 800  # follows
    raw_jerk = np.abs(np.diff((boxes[:, 0] + boxes[:, 2]) / 2, 2)).max()
    assert raw_jerk > 8 and np.abs(np.diff(centre, 2, axis=0)).max() < 1.0  # no per-frame jitter


def test_framing_holds_still_when_the_path_fits():
    rng = np.random.default_rng(3)
    boxes = np.array([100, 50, 200, 350]) + rng.normal(0, 3, (40, 4))
    windows = crop_windows(boxes, fps=25)
    assert np.ptp(windows, axis=0).max() == 0


def test_frame_labels_pad_with_background_and_keep_aspect():
    person = Person([0, 0, 40, 40], 1.0, np.full((40, 40), 9, np.uint8))  # square person at the frame corner
    labels = frame_labels([person], (0.0, 20.0, 100.0), size=50)  # window reaches far outside the frame
    box = foreground_box(labels)
    np.testing.assert_allclose(box, [25, 15, 45, 35])  # 40 px -> 20 px both ways: scaled, not squashed
    assert set(np.unique(labels)) == {0, 9}
    assert (labels[:, :25] == 0).all()  # left of the frame: background


def test_select_persons_tracks_and_hold_last():
    def at(x, size, score):
        return Person([x, 0, x + size, 2 * size], score, np.ones((2 * size, size), np.uint8))

    frames = [[at(0, 100, 0.5), at(300 + t, 40, 0.99)] if t < 3 else [at(300 + t, 40, 0.99)] for t in range(20)]
    frames[10] = []  # a dropout
    largest = select_persons(frames, "largest")
    assert all(p[0].box[0] >= 300 for p in largest if p)  # present all clip long beats big for 3 frames
    assert largest[10] == []
    assert hold_last(largest)[10][0] is largest[9][0]
    assert select_persons([[at(0, 100, 0.5), at(300, 40, 0.9)]] * 5, "score")[0][0].score == 0.9
    assert select_persons([[at(0, 100, 0.5), at(300, 40, 0.9)]] * 5, "largest")[0][0].score == 0.5
    assert len(select_persons(frames, "all")[0]) == 2
    with pytest.raises(InputError, match="no person"):
        hold_last([[], []])


# ------------------------------------------------------------------------------------------------------- time


def test_smoothing_lowers_flip_count():
    rng = np.random.default_rng(4)
    clean = []
    for t in range(50):  # a body sliding by one pixel per frame
        labels = np.zeros((64, 64), np.uint8)
        labels[10:50, 10 + t // 2 : 30 + t // 2] = 2
        labels[10:20, 15 + t // 2 : 25 + t // 2] = 23
        clean.append(labels)
    noisy = []
    for labels in clean:
        flicker = labels.copy()
        mask = rng.random(labels.shape) < 0.05
        flicker[mask] = rng.integers(0, 25, mask.sum())
        noisy.append(flicker)
    raw, clean_rate = flip_rate(noisy, 25), flip_rate(clean, 25)
    smoothed = list(majority_filter(noisy, 3))
    assert len(smoothed) == len(noisy)
    assert flip_rate(smoothed, 25) < 0.25 * raw
    assert flip_rate(list(majority_filter(noisy, 5)), 25) < 2 * clean_rate + 0.1
    assert all((a == b).all() for a, b in zip(majority_filter(noisy, 1), noisy, strict=True))


def test_fps_resampling_counts():
    assert len(resample_indices(60, 30.0, 25.0)) == 50  # 2 s at 30 fps -> 50 frames at 25
    assert len(resample_indices(30, 15.0, 25.0)) == 50
    assert len(resample_indices(60, 29.97, 25.0)) == 50
    np.testing.assert_array_equal(resample_indices(40, 25.0, 25.0), np.arange(40))
    np.testing.assert_array_equal(resample_indices(40, 30.0, None), np.arange(40))
    index = resample_indices(60, 30.0, 25.0)
    assert index[0] == 0 and index[-1] <= 59 and (np.diff(index) >= 1).all()


# ------------------------------------------------------------------------------------------------------ align


def test_alignment_maps_driving_box_onto_reference_box():
    driving, reference = np.array([100.0, 50, 180, 290]), np.array([300.0, 100, 340, 220])
    transform = box_alignment(driving, reference)
    moved = transform_box(driving, transform)
    assert moved[3] - moved[1] == pytest.approx(reference[3] - reference[1])
    np.testing.assert_allclose((moved[:2] + moved[2:]) / 2, (reference[:2] + reference[2:]) / 2)


def test_align_to_reference_moves_the_motion_onto_the_reference_person(stand_in, tmp_path):
    video = walking_video(tmp_path / "walk.mp4")
    reference = scene(width=200, height=100, red=(130, 30, 150, 70))  # a small person on the right
    frames, _ = extract_motion(video, model=stand_in, size=100, device="cpu", align_to=reference, progress=False)
    # The pipeline stretches the 200x100 photo to 100x100: the reference box becomes (65, 30, 75, 70).
    boxes = np.stack([foreground_box(nearest_labels(f)[0]) for f in frames])
    median = np.median(boxes, 0)
    assert median[3] - median[1] == pytest.approx(40, abs=2)  # the reference person's height
    np.testing.assert_allclose((median[:2] + median[2:]) / 2, [70, 50], atol=2)  # and centre
    assert np.ptp(boxes[:, 3] - boxes[:, 1]) <= 1  # one scale for the whole clip

    given, _ = extract_motion(
        video, model=stand_in, size=100, device="cpu", align_to=reference, reference_box=(130, 30, 150, 70),
        progress=False,
    )  # fmt: skip
    np.testing.assert_array_equal(given, frames)  # a given box replaces detecting the reference person
    with pytest.raises(InputError, match="no person found in the reference"):
        extract_motion(video, model=stand_in, size=100, device="cpu", align_to=scene(), progress=False)


# ------------------------------------------------------------------------------------------------ end to end


def test_extract_motion_on_a_synthetic_video(stand_in, tmp_path):
    video = walking_video(tmp_path / "walk.mp4", frames=30, fps=30.0, blank={12})
    frames, fps = extract_motion(video, model=stand_in, size=64, device="cpu", progress=False)
    assert fps == 25.0 and frames.shape == (25, 64, 64, 3) and frames.dtype == np.uint8
    assert only_lut_colours(frames)
    labels = np.stack([nearest_labels(f)[0] for f in frames])
    assert (labels > 0).any(axis=(1, 2)).all()  # the blank frame is held, not empty
    boxes = np.stack([foreground_box(lab) for lab in labels])
    centre_x = (boxes[:, 0] + boxes[:, 2]) / 2
    assert np.ptp(centre_x) < 8  # walks 120 px across the source, stays framed in the output
    assert np.abs(np.diff(centre_x, 2)).max() <= 2
    assert np.ptp(boxes[:, 3] - boxes[:, 1]) <= 1  # constant zoom
    assert 0.85 < (boxes[0, 3] - boxes[0, 1]) / 64 <= 1.0  # tight vertical framing, as the samples

    short, _ = extract_motion(video, model=stand_in, size=64, fps=None, max_frames=7, device="cpu", progress=False)
    assert short.shape == (7, 64, 64, 3)


def test_command_run_writes_playable_h264(stand_in, tmp_path, capsys):
    video = walking_video(tmp_path / "walk.mp4", frames=60, fps=30.0)
    parser = argparse.ArgumentParser(prog="magicanimate")
    command.add_parser(parser.add_subparsers(dest="command"))
    output = tmp_path / "out" / "motion.mp4"
    args = parser.parse_args(
        ["densepose", str(video), "-o", str(output), "--model", str(stand_in), "--size", "64", "--device", "cpu",
         "--smooth", "5", "--no-progress"]
    )  # fmt: skip
    assert command.run(args) == output
    with av.open(str(output)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert float(stream.average_rate) == 25.0
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(decoded) == 50 and decoded[0].shape == (64, 64, 3)
    assert min(palette_share(f) for f in decoded) > 0.8  # 64x64: chroma-blurred borders weigh more
    assert "50 frames at 25 fps" in capsys.readouterr().err
    assert [p.name for p in output.parent.iterdir()] == ["motion.mp4"]

    bad = parser.parse_args(["densepose", str(video), "-o", str(tmp_path / "m.gif"), "--model", str(stand_in)])
    with pytest.raises(InputError, match=".mp4"):
        command.run(bad)
    missing = parser.parse_args(["densepose", str(tmp_path / "nope.mp4"), "-o", str(output), "--model", str(stand_in)])
    with pytest.raises(InputError, match="not found"):
        command.run(missing)
    for flags, message in ((["--reference-box", "1,2,3"], "--reference-box must be"), (["--size", "7"], "--size")):
        bad = parser.parse_args(["densepose", str(video), "-o", str(tmp_path / "m.mp4"), *flags])
        with pytest.raises(InputError, match=message):
            command.run(bad)
    assert not (tmp_path / "m.mp4").exists()


def test_no_person_is_a_clear_error(stand_in, tmp_path):
    video = write_video(tmp_path / "empty.mp4", [scene() for _ in range(5)])
    with pytest.raises(InputError, match="no person"):
        extract_motion(video, model=stand_in, size=32, device="cpu", progress=False)


def test_iter_frames_applies_phone_rotation(tmp_path):
    path = tmp_path / "rotated.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(90)  # stored landscape, shown rotated 90 degrees counter-clockwise
        image = np.zeros((32, 64, 3), np.uint8)
        image[:16, :32] = 255  # top-left quadrant
        for t in range(2):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = t
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    frames = list(iter_frames(path))
    assert len(frames) == 2 and frames[0].shape == (64, 32, 3)
    assert frames[0][48:, :16].mean() > 200 and frames[0][:32].mean() < 30  # now the bottom-left quadrant


# ------------------------------------------------------------------------------------------------- detectron2


def test_detectron2_adapter_matches_the_torchscript_rule():
    """The detectron2 backend's conversion, on synthetic Instances (real weights are not needed for the rule)."""
    try:
        from densepose.structures import DensePoseChartPredictorOutput as ChartOutput
        from detectron2.structures import Boxes, Instances
    except Exception as err:  # noqa: BLE001 - ImportError, or torchvision built for another torch
        pytest.skip(f"detectron2 + DensePose not importable ({type(err).__name__}: {err}); they are built from source")

    from magicanimate.densepose.extractor import persons_from_instances

    coarse, fine = body_templates()
    instances = Instances((120, 160))
    instances.pred_boxes = Boxes(torch.tensor([[40.0, 20, 70, 100], [100, 30, 140, 90]]))
    instances.scores = torch.tensor([0.7, 0.95])
    zeros = torch.zeros(2, 25, 112, 112)
    instances.pred_densepose = ChartOutput(
        coarse_segm=coarse.expand(2, -1, -1, -1), fine_segm=fine.expand(2, -1, -1, -1), u=zeros, v=zeros
    )
    persons = persons_from_instances(instances)
    assert [p.score for p in persons] == pytest.approx([0.7, 0.95])
    expected = chart_to_labels(coarse, fine, np.array([40, 20, 70, 100]))
    np.testing.assert_array_equal(persons[0].labels, expected)
    assert persons[0].labels.shape == (80, 30)
