"""``magicanimate prepare-data`` on generated raw videos, with the DensePose stand-in of tests/test_densepose.py (a
red rectangle is the person, painted with a fixed body of part labels)."""

import json

import numpy as np
import pytest
from PIL import Image
from test_densepose import save_stand_in, scene

from magicanimate.cli import main
from magicanimate.densepose.palette import nearest_labels
from magicanimate.io import read_video, write_video
from magicanimate.training.manifest import read_manifest
from magicanimate.training.prepare import prepare_data
from magicanimate.training.scenes import scene_ranges

BLUE = (0, 0, 200)


def two_scene_walk(path, frames=40, fps=30.0):
    """A red 'person' walking right; halfway the shot cuts to a blue background (the person keeps walking)."""
    clip = []
    for t in range(frames):
        frame = scene(red=(5 + 2 * t, 30, 35 + 2 * t, 100))
        if t >= frames // 2:
            frame[frame[..., 0] == 0] = BLUE
        clip.append(frame)
    return write_video(path, clip, fps=fps)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw-videos")
    two_scene_walk(folder / "walk.mp4")
    write_video(folder / "empty.mp4", [scene() for _ in range(20)], fps=25)  # nobody in it
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but nothing after")
    Image.fromarray(scene(red=(60, 10, 100, 110))).save(folder / "still.png")
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_stand_in(tmp_path_factory.mktemp("prepare-model") / "stand_in.torchscript")


def run_cli(videos, data, model, capsys):
    argv = f"prepare-data {videos} -o {data} --model {model} --device cpu --size 64 --min-frames 8 --no-progress"
    code = main(argv.split())
    return code, capsys.readouterr()


def test_prepare_data_writes_clips_meta_and_manifest(videos, model, tmp_path, capsys):
    data = tmp_path / "data"
    code, output = run_cli(videos, data, model, capsys)
    assert code == 0
    assert "warning: skipped broken.mp4: cannot read video" in output.err  # reported, and the others went on
    assert "3 clips written" in output.out and "1 inputs failed" in output.out

    entries = {entry.name: entry for entry in read_manifest(data)}
    assert sorted(entries) == ["still-png-000", "walk-mp4-000", "walk-mp4-001"]  # empty.mp4: no person, left out
    assert [e.split for e in entries.values()].count("val") == 1 and entries["still-png-000"].split == "train"
    for name in ("walk-mp4-000", "walk-mp4-001"):
        folder = data / "clips" / name
        assert sorted(p.name for p in folder.iterdir()) == ["densepose.mp4", "frames.mp4", "meta.json"]
        meta = json.loads((folder / "meta.json").read_text())
        # 20 source frames at 30 fps -> 17 at 25 fps; the stand-in's body has a head (face) but no hands.
        assert (meta["fps"], meta["frames"], meta["size"], meta["coverage"]) == (25.0, 17, 64, 1.0)
        assert meta["face_area"] > 0.01 and meta["hand_area"] == 0 and len(meta["boxes"]) == 17
        frames, fps = read_video(folder / "frames.mp4")
        motion, _ = read_video(folder / "densepose.mp4")
        assert frames.shape == motion.shape == (17, 64, 64, 3) and fps == 25
        labels, distance = zip(*(nearest_labels(frame) for frame in motion), strict=True)
        assert np.mean(np.stack(distance) <= 12) > 0.9  # the palette, up to H.264
        # Image and DensePose are framed by the same window: the parts are on the red person.
        person, labels = (frames[..., 0] > 150) & (frames[..., 2] < 100), np.stack(labels)
        assert person[labels > 0].mean() > 0.95 and person.mean() > 0.1
        background = frames[~person & (labels == 0)].mean(axis=0)
        assert (background[2] > 150) == (name == "walk-mp4-001")  # the second scene is the blue one
    still = data / "clips" / "still-png-000"
    assert sorted(p.name for p in still.iterdir()) == ["densepose.png", "image.png", "meta.json"]
    assert np.asarray(Image.open(still / "image.png")).shape == (64, 64, 3)


def test_a_rerun_skips_finished_clips_and_keeps_the_split(videos, model, tmp_path, capsys):
    data = tmp_path / "data"
    options = dict(model=str(model), device="cpu", size=64, min_frames=8, progress=False)
    first = prepare_data(videos, data, **options)
    assert len(first.written) == 3 and set(first.failed) == {"broken.mp4"}
    val = [e.name for e in read_manifest(data) if e.split == "val"]
    stamps = {p: p.stat().st_mtime_ns for p in (data / "clips").rglob("*") if p.is_file()}

    again = prepare_data(videos, data, **options)
    assert again.written == [] and sorted(again.finished) == ["still-png-000", "walk-mp4-000", "walk-mp4-001"]
    assert stamps == {p: p.stat().st_mtime_ns for p in (data / "clips").rglob("*") if p.is_file()}

    # As after a crash in the middle of a video: only the missing clip is made again.
    for file in (data / "clips" / "walk-mp4-001").iterdir():
        file.unlink()
    (data / "clips" / "walk-mp4-001").rmdir()
    third = prepare_data(videos, data, **options)
    assert third.written == ["walk-mp4-001"] and sorted(third.finished) == ["still-png-000", "walk-mp4-000"]
    assert [e.name for e in read_manifest(data) if e.split == "val"] == val


def test_scene_ranges_split_at_cuts():
    shot_a = [scene(red=(10 + t, 20, 40 + t, 90)) for t in range(6)]
    shot_b = [np.full((120, 160, 3), (30, 160, 40), np.uint8) for _ in range(4)]
    assert scene_ranges(shot_a + shot_b + shot_a) == [(0, 6), (6, 10), (10, 16)]
    assert scene_ranges(shot_a) == [(0, 6)] and scene_ranges([]) == []


def test_bad_options_are_one_line_errors(videos, model, tmp_path, capsys):
    cases = [
        (f"prepare-data {videos} -o {tmp_path / 'd'} --size 10", "--size must be an integer from 64 to 4096"),
        (f"prepare-data {videos / 'walk.mp4'} -o {tmp_path / 'd'}", "VIDEOS must be a folder"),
        (f"prepare-data {videos} -o {videos / 'inside'} --model {model}", "is inside"),
    ]
    for argv, message in cases:
        assert main(argv.split()) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
