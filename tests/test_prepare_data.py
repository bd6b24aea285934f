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


# ------------------------------------------------------------------------------------------------ cached latents

# latents.safetensors stores float16, rounded to nearest: at most 2**-11 of the value off (measured on the tiny VAE:
# up to 4.8e-4 relative for mean and std alike). The absolute part covers float32 rounding between this test's
# one-call encode and prepare-data's 4-frame chunks (measured: bit-identical on this CPU) and float16's subnormals.
LATENT_RTOL = 2**-11
LATENT_ATOL = 1e-6
CLIP_NAMES = ["still-png-000", "walk-mp4-000", "walk-mp4-001"]


def test_cache_latents_are_a_vae_encode_of_the_written_frames(videos, model, tiny_tree, tmp_path, capsys):
    """Each clip's latents are the tiny VAE's latent distribution of its frames.mp4 as decoded (what training reads
    without the cache), mean and std, every frame; meta.json names the VAE."""
    import safetensors.numpy
    import torch
    from diffusers import AutoencoderKL

    data = tmp_path / "data"
    argv = f"prepare-data {videos} -o {data} --model {model} --device cpu --size 64 --min-frames 8 --no-progress"
    assert main([*argv.split(), "--cache-latents", "--pretrained", str(tiny_tree)]) == 0
    assert "3 clips written" in capsys.readouterr().out
    vae = AutoencoderKL.from_pretrained(tiny_tree / "sd-vae-ft-mse").eval()
    for name in CLIP_NAMES:
        folder = data / "clips" / name
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["latents"]["vae"] == str((tiny_tree / "sd-vae-ft-mse").resolve())
        assert meta["latents"]["dtype"] == "float16" and meta["latents"]["file"] == "latents.safetensors"
        if meta["kind"] == "video":
            frames = read_video(folder / "frames.mp4")[0]
        else:
            frames = np.asarray(Image.open(folder / "image.png"))[None]
        with torch.no_grad():
            pixels = torch.from_numpy(frames.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
            dist = vae.encode(pixels).latent_dist
        cached = safetensors.numpy.load_file(folder / "latents.safetensors")
        for key in ("mean", "std"):
            assert cached[key].dtype == np.float16 and cached[key].shape == (meta["frames"], 4, 8, 8)
            expected = getattr(dist, key).numpy()
            np.testing.assert_allclose(cached[key].astype(np.float32), expected, rtol=LATENT_RTOL, atol=LATENT_ATOL)
        assert np.abs(cached["mean"]).max() > 0.1  # not a blank encode


def test_a_rerun_with_cache_latents_adds_them_to_earlier_clips_only(videos, model, tiny_tree, tmp_path):
    """Clips prepared without latents get them on a rerun with --cache-latents (their videos untouched); a further
    rerun skips everything; a clip that lost its latents gets only those again; a clip whose latents cannot be
    made is reported, and leaves no latents file, whole or partial."""
    data, clips = tmp_path / "data", tmp_path / "data" / "clips"
    options = dict(model=str(model), device="cpu", size=64, min_frames=8, progress=False)
    cached = dict(options, cache_latents=True, pretrained=str(tiny_tree))
    assert len(prepare_data(videos, data, **options).written) == 3
    assert not list(clips.rglob("latents.safetensors"))

    def stamps():
        return {p: p.stat().st_mtime_ns for p in clips.rglob("*") if p.is_file()}

    videos_before = {p: t for p, t in stamps().items() if p.name != "meta.json"}
    second = prepare_data(videos, data, **cached)
    assert second.written == [] and second.finished == [] and sorted(second.latents_added) == CLIP_NAMES
    assert "3 earlier clips given cached latents" in second.summary()
    assert all(stamps()[p] == t for p, t in videos_before.items())
    for name in CLIP_NAMES:
        assert (clips / name / "latents.safetensors").is_file()
        assert "vae_fingerprint" in json.loads((clips / name / "meta.json").read_text())["latents"]

    before = stamps()
    third = prepare_data(videos, data, **cached)
    assert third.latents_added == [] and sorted(third.finished) == CLIP_NAMES and stamps() == before

    (clips / "walk-mp4-001" / "latents.safetensors").unlink()  # as after a crash between latents and meta.json
    fourth = prepare_data(videos, data, **cached)
    assert fourth.latents_added == ["walk-mp4-001"] and sorted(fourth.finished) == CLIP_NAMES[:2]

    (clips / "walk-mp4-001" / "latents.safetensors").unlink()
    meta = json.loads((clips / "walk-mp4-001" / "meta.json").read_text())
    (clips / "walk-mp4-001" / "meta.json").write_text(json.dumps({**meta, "frames": meta["frames"] + 1}))
    fifth = prepare_data(videos, data, **cached)
    assert "17 frames encoded, but the clip has 18" in fifth.failed["walk.mp4"]
    assert sorted(p.name for p in (clips / "walk-mp4-001").iterdir()) == ["densepose.mp4", "frames.mp4", "meta.json"]


def test_cache_latents_refusals_are_one_line(videos, model, tiny_tree, tmp_path, capsys):
    base = f"prepare-data {videos} -o {tmp_path / 'd'} --model {model} --device cpu"
    (tmp_path / "no-vae").mkdir()
    cases = [
        (f"{base} --cache-latents", 2, "--cache-latents needs --pretrained TREE"),
        (f"{base} --pretrained {tiny_tree}", 2, "--pretrained is only read with --cache-latents"),
        (f"{base} --cache-latents --pretrained {tmp_path / 'absent'}", 2, "pretrained tree not found"),
        (f"{base} --cache-latents --pretrained {tmp_path / 'no-vae'}", 3, "no VAE in"),
        (f"{base} --cache-latents --pretrained {tiny_tree} --size 100", 2, "--size a multiple of 8"),
    ]
    for argv, code, message in cases:
        assert main(argv.split()) == code
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "d" / "manifest.jsonl").exists()
