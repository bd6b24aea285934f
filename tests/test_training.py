"""Training (magicanimate.training) on the tiny random-weight tree, CPU: the loss falls in every stage, exactly the
intended weights change, a resumed run equals an uninterrupted one, two processes equal one, augmentations keep
image and DensePose aligned, and configs that do not fit the release weights are refused.

The data folders are built in code (clips of moving DensePose-like parts over a reference photo); the tiny models
need 128 px for single-frame samples (stage 1): at 64 px their deepest level is 1x1 with one channel per
GroupNorm group, which GroupNorm refuses for a batch of one.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.multiprocessing as mp
from tiny_models import make_motion, make_reference

from magicanimate.cli import main
from magicanimate.densepose.palette import LUT, nearest_labels
from magicanimate.io import write_video
from magicanimate.training.augment import HFLIP_PARTS, CropFlip, flip_labels
from magicanimate.training.config import TRAIN_SETTINGS, load_train_config, render_train_yaml
from magicanimate.training.dataset import SampleStream, TrainingData
from magicanimate.training.manifest import ManifestEntry, write_manifest
from magicanimate.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
CLIP_FRAMES = 12


def make_data(root: Path, splits=("train", "val"), size: int = 64, frames: int = CLIP_FRAMES) -> Path:
    """A data folder as prepare-data writes it: per clip a video of a photo modulated by moving parts, and the
    parts' DensePose rendering (its labels are the parts), plus the manifest."""
    entries = []
    for index, split in enumerate(splits):
        motion = make_motion(frames, size, seed=index)
        photo = make_reference(size, seed=index).astype(np.int16)
        clip = np.clip(photo + (motion.astype(np.int16) - 128) // 2, 0, 255).astype(np.uint8)
        folder = root / "clips" / f"clip{index}"
        folder.mkdir(parents=True, exist_ok=True)
        write_video(folder / "frames.mp4", clip, fps=25)
        write_video(folder / "densepose.mp4", motion, fps=25)
        entries.append(ManifestEntry(f"clip{index}", f"clips/clip{index}", "video", frames, 25.0, size, split))
    write_manifest(root, entries)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("training-data"))


def tiny_settings(tree, data, output, **overrides) -> dict:
    """Settings for quick CPU runs: 64 px (128 for stage 1, see the module docstring), 2-frame clips and no
    single-frame samples (which would need 128 px too; test_stage_2_mixes_single_frames has them), no loader
    workers, no validation; LoRA rank 8 at scale 4 (alpha 32) so that few steps move it."""
    stage = overrides.get("stage", "2")
    settings = dict(
        stage=stage,
        data=str(data),
        pretrained=str(tree),
        output=str(output),
        resolution=128 if stage == "1" else 64,
        clip_frames=2,
        image_probability=0.0,
        dataloader_workers=0,
        validate_every=0,
        checkpoint_every=1000,
        lora_rank=8,
        lora_alpha=32,
        gradient_checkpointing=False,
    )
    settings.update(overrides)
    return settings


def all_weights(pipe) -> dict[str, torch.Tensor]:
    """Every parameter of every model of the pipeline, copied (LoRA layers included, by their peft names)."""
    return {
        f"{name}.{key}": value.detach().clone()
        for name, component in pipe.components.items()
        if isinstance(component, torch.nn.Module)
        for key, value in component.named_parameters()
    }


# ------------------------------------------------------------------------------------------------ the stages


@pytest.mark.parametrize(("stage", "steps"), [("1", 12), ("2", 6), ("lora", 12)])
def test_each_stage_overfits_a_fixed_batch_and_changes_only_its_weights(tiny_tree, data, tmp_path, stage, steps):
    """The loss on a fixed evaluation batch (one sample: fixed frames, timestep and noise) at least halves after
    training on it (measured: 0.35, 0.33 and 0.33 of the start for stage 1, 2 and lora); after training exactly the
    stage's parameters differ and every other weight of every model is bit-identical."""
    trainer = Trainer(
        load_train_config(
            tiny_settings(tiny_tree, data, tmp_path / "run", stage=stage, batch_size=1, learning_rate=1e-2)
        )
    )
    model = trainer.accelerator.unwrap_model(trainer.model)
    batch = [trainer.data.sample(0, seed, evaluation=True) for seed in (11,)]

    def evaluation_loss() -> float:
        with torch.no_grad():
            return sum(float(model(sample)) for sample in batch) / len(batch)

    before_weights = all_weights(trainer.pipe)
    before = evaluation_loss()
    for _ in range(steps):
        trainer.train_step(batch)
    after = evaluation_loss()
    assert after <= 0.5 * before, f"stage {stage}: evaluation loss {before:.4f} -> {after:.4f}"

    after_weights = all_weights(trainer.pipe)
    assert after_weights.keys() == before_weights.keys()
    changed = {name for name in before_weights if not torch.equal(before_weights[name], after_weights[name])}
    trained = set(trainer.params)
    assert changed == trained
    if stage == "1":
        assert all(name.startswith(("appearance_encoder.", "controlnet.")) for name in trained)
        assert len([n for n in trained if n.startswith("controlnet.")]) == len(
            list(trainer.pipe.controlnet.parameters())
        )
        assert not any(".up_blocks.3.attentions.2.proj_out." in name for name in trained)  # the dead tail stays
    elif stage == "2":
        assert trained and all(name.startswith("unet.") and ".motion_modules." in name for name in trained)
    else:
        assert trained and all(".lora_" in name for name in trained)
        assert {name.split(".")[0] for name in trained} == {"appearance_encoder", "unet"}


def test_gradient_checkpointing_gives_the_same_gradients(tiny_tree, data, tmp_path):
    """Checkpointed layers recompute their forward (reference attention included) in the backward pass: the
    gradients are the same floats as without checkpointing (measured: bit-identical on this CPU; 1e-6 relative
    leaves room for other kernels)."""
    trainer = Trainer(load_train_config(tiny_settings(tiny_tree, data, tmp_path / "run", stage="lora")))
    sample = trainer.data.sample(0, 5, evaluation=True)
    grads = []
    for checkpointing in (False, True):
        for name in ("unet", "appearance_encoder", "controlnet"):
            model = getattr(trainer.pipe, name)
            model.enable_gradient_checkpointing() if checkpointing else model.disable_gradient_checkpointing()
        trainer.model(sample).backward()
        grads.append({name: param.grad.clone() for name, param in trainer.params.items()})
        trainer.optimizer.zero_grad(set_to_none=True)
    assert trainer.pipe.unet.is_gradient_checkpointing
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------------ resume


def test_resume_in_a_fresh_process_equals_an_uninterrupted_run(tiny_tree, data, tmp_path):
    """2 steps, checkpoint, 2 more in a new process (the CLI, --resume latest) give bit-identical weights, EMA and
    losses to 4 uninterrupted steps: every sample is a function of the run's seed and its number, and the
    optimizer, learning-rate schedule and EMA come back from the checkpoint exactly (float32, same kernels, one
    thread in both processes)."""
    common = dict(
        stage="2",
        ema=True,
        ema_decay=0.9,
        gradient_checkpointing=True,
        lr_scheduler="cosine",
        lr_warmup_steps=1,
        learning_rate=1e-3,
        max_steps=4,
    )
    whole = Trainer(load_train_config(tiny_settings(tiny_tree, data, tmp_path / "whole", **common))).run()

    config_file = tmp_path / "train.yaml"
    config_file.write_text(json.dumps(tiny_settings(tiny_tree, data, tmp_path / "split", **common, checkpoint_every=2)))
    Trainer(load_train_config(config_file)).run(stop_at=2)  # as if the job ended after step 2
    assert [p.name for p in (tmp_path / "split").glob("checkpoint-*")] == ["checkpoint-2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "magicanimate.cli", "train", "--config", str(config_file), "--resume", "latest"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stderr and "checkpoint-4" in result.stdout

    resumed = tmp_path / "split" / "checkpoint-4"
    for name in ("trained.safetensors", "ema.safetensors"):
        a, b = safetensors.torch.load_file(whole / name), safetensors.torch.load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    losses = [
        [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
        for run in (tmp_path / "whole", tmp_path / "split")
    ]
    assert losses[0] == losses[1]
    assert sorted(p.name for p in (tmp_path / "split").iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]


def test_retention_keeps_the_newest_checkpoints(tiny_tree, data, tmp_path, capsys):
    settings = tiny_settings(
        tiny_tree, data, tmp_path / "run", max_steps=3, checkpoint_every=1, checkpoints_total_limit=2
    )
    Trainer(load_train_config(settings)).run()
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if "checkpoint" in p.name) == [
        "checkpoint-2",
        "checkpoint-3",
    ]
    # A finished run is not silently restarted over its checkpoints.
    assert main(["train", *flags(settings)]) == 2
    assert "already holds checkpoints; pass --resume latest" in capsys.readouterr().err


def flags(settings: dict) -> list[str]:
    out = []
    for key, value in settings.items():
        flag = "-o" if key == "output" else "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            out += [flag, str(value)]
    return out


# ------------------------------------------------------------------------------------------------ two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, settings: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE="2",
    )
    torch.set_num_threads(1)
    Trainer(load_train_config(settings)).run()


def test_two_gloo_processes_with_batch_1_match_one_with_batch_2(tiny_tree, data, tmp_path):
    """Two processes (gloo, DDP) with one sample each per step train the same weights as one process with two: the
    same samples (numbered per step, not per process), gradients averaged across processes instead of summed in
    one. Measured: bit-identical on this CPU (halving is exact in floating point, and the two gradients are
    computed by the same kernels at the same shapes); the tolerance, 1e-6 of the weights' scale, covers an
    all-reduce that sums in another order on other machines. reference_drop 0.5 gives steps where a sample leaves
    the appearance encoder without gradients (DDP's unused parameters)."""
    common = dict(stage="lora", max_steps=2, reference_drop=0.5, learning_rate=1e-3)
    one = Trainer(load_train_config(tiny_settings(tiny_tree, data, tmp_path / "one", batch_size=2, **common))).run()

    settings = tiny_settings(tiny_tree, data, tmp_path / "two", batch_size=1, **common)
    context = mp.get_context("spawn")
    port = _free_port()
    procs = [context.Process(target=_worker, args=(rank, port, settings)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + 300
    for proc in procs:
        proc.join(max(1.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    assert [proc.exitcode for proc in procs] == [0, 0]

    a = safetensors.torch.load_file(one / "trained.safetensors")
    b = safetensors.torch.load_file(tmp_path / "two" / "checkpoint-2" / "trained.safetensors")
    assert a.keys() == b.keys()
    moved = [k for k in a if "lora_B" in k and a[k].abs().max() > 0]
    assert moved  # the adapters did train
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6 * max(float(a[key].abs().max()), 1e-3))
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        for run in ("one", "two")
    ]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)


# ------------------------------------------------------------------------------------------------ data


def test_flip_swaps_left_and_right_parts():
    assert HFLIP_PARTS.tolist()[:5] == [0, 1, 2, 4, 3] and np.array_equal(HFLIP_PARTS[HFLIP_PARTS], np.arange(25))
    pairs = {(3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16), (17, 18), (19, 20), (21, 22), (23, 24)}
    for left, right in pairs:
        assert HFLIP_PARTS[left] == right and HFLIP_PARTS[right] == left
    assert HFLIP_PARTS[1] == 1 and HFLIP_PARTS[2] == 2 and HFLIP_PARTS[0] == 0
    labels = np.zeros((1, 4, 6), np.uint8)
    labels[0, 1, 0] = 4  # a left hand in the left column
    labels[0, 2, 5] = 1  # torso in the right column
    flipped = flip_labels(labels)
    assert flipped[0, 1, 5] == 3 and flipped[0, 2, 0] == 1 and flipped.sum() == 4
    np.testing.assert_array_equal(flip_labels(flipped), labels)


def test_crop_and_flip_keep_image_and_densepose_aligned():
    """A marker pixel of the image and the label at the same place land at the same output pixel."""
    image = np.zeros((40, 60, 3), np.uint8)
    labels = np.zeros((1, 40, 60), np.uint8)
    image[10:14, 30:34] = 255
    labels[0, 10:14, 30:34] = 23
    for flip in (False, True):
        crop = CropFlip(top=6, left=20, side=32, size=16, flip=flip)
        out_image, out_labels = crop.images(image), crop.labels(labels)
        assert out_image.shape == (16, 16, 3) and out_labels.shape == (1, 16, 16)
        assert set(np.unique(out_labels)) == {0, 24 if flip else 23}  # head right <-> left when mirrored
        assert np.array_equal(out_image[..., 0] > 127, out_labels[0] > 0)


def test_samples_are_reproducible_and_flipped_samples_mirror(tiny_tree, data):
    config = load_train_config(
        tiny_settings(tiny_tree, data, "unused", stage="2", clip_frames=4, crop_scale=0.7, image_probability=0.0)
    )
    flipped = load_train_config({**dict(config), "flip_probability": 1.0})
    plain = load_train_config({**dict(config), "flip_probability": 0.0})
    a, b = TrainingData(data, plain).sample(0, 3), TrainingData(data, plain).sample(0, 3)
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("reference", "frames", "control"))
    assert (a.timestep, a.noise_seed) == (b.timestep, b.noise_seed)
    m = TrainingData(data, flipped).sample(0, 3)  # same draws: only the flip differs
    np.testing.assert_array_equal(m.frames, a.frames[:, :, ::-1])
    np.testing.assert_array_equal(m.reference, a.reference[:, ::-1])
    labels = np.stack([nearest_labels(frame)[0] for frame in a.control])
    np.testing.assert_array_equal(m.control, LUT[flip_labels(labels)])
    assert a.frames.shape == (4, 64, 64, 3) and a.control.shape == (4, 64, 64, 3)
    assert set(map(tuple, np.unique(a.control.reshape(-1, 3), axis=0))) <= set(map(tuple, LUT))


def test_stage_2_mixes_single_frames(tiny_tree, data, tmp_path):
    """Image-video joint training: with image_probability a sample is one frame (through the same video UNet,
    motion modules on), otherwise a clip of clip_frames frames; both train the motion modules. (A single frame
    attends to itself only: the attention's value path learns, its query and key get no gradient but rounding.)"""
    settings = tiny_settings(
        tiny_tree, data, tmp_path / "run", stage="2", resolution=128, clip_frames=3, image_probability=0.5
    )
    trainer = Trainer(load_train_config(settings))
    samples = [trainer.data.sample(0, seed) for seed in range(12)]
    assert {len(sample.frames) for sample in samples} == {1, 3}
    for length, learning in ((1, (".to_v.",)), (3, (".to_q.", ".to_k.", ".to_v."))):
        trainer.model(next(s for s in samples if len(s.frames) == length)).backward()
        grads = {name: float(param.grad.abs().max()) for name, param in trainer.params.items()}
        assert all(value > 1e-6 for name, value in grads.items() if any(key in name for key in learning)), length
        trainer.optimizer.zero_grad(set_to_none=True)


def test_stage_1_pairs_are_far_apart(tiny_tree, data):
    """Which frames a pair took, found back by matching the sample against every frame of the clip."""
    from magicanimate.io import read_video

    settings = tiny_settings(
        tiny_tree, data, "unused", stage="1", min_frame_gap=8, crop_scale=1.0, flip_probability=0.0
    )
    dataset = TrainingData(data, load_train_config(settings))
    assert len(dataset) == 1  # the val clip is not trained on
    frames = CropFlip(0, 0, 64, 128, False).images(read_video(data / "clips" / "clip0" / "frames.mp4")[0])

    def index(image: np.ndarray) -> int:
        return int(np.argmin([np.abs(frame.astype(int) - image).sum() for frame in frames]))

    for seed in range(6):
        sample = dataset.sample(0, seed)
        target, reference = index(sample.frames[0]), index(sample.reference)
        assert abs(target - reference) >= min(8, max(target, CLIP_FRAMES - 1 - target))


def test_sample_stream_is_the_same_for_any_process_count_and_after_resume():
    def numbers(stream, steps):
        iterator = iter(stream)
        return [next(iterator) for _ in range(steps * stream.per_step)]

    one = numbers(SampleStream(5, seed=3, per_step=2), 4)
    ranks = [numbers(SampleStream(5, seed=3, per_step=1, rank=r, world_size=2), 4) for r in (0, 1)]
    assert [spec for step in zip(*ranks, strict=True) for spec in step] == one
    assert numbers(SampleStream(5, seed=3, per_step=2, start_step=2), 2) == one[4:]
    assert sorted(spec[0] for spec in one[:5]) == list(range(5))  # each pass visits every entry once


# ------------------------------------------------------------------------------------------------ settings


def test_packaged_train_yaml_is_generated_from_the_table():
    assert (ROOT / "configs" / "train.yaml").read_text(encoding="utf-8") == render_train_yaml()
    flags_ = {action.option_strings[0] for action in _train_parser()._actions if action.option_strings}
    for flag in (
        "--max-steps",
        "--resolution",
        "--batch-size",
        "--learning-rate",
        "--checkpoint-every",
        "--mixed-precision",
        "--resume",
        "-o",
    ):
        assert flag in flags_
    assert {s.name for s in TRAIN_SETTINGS} >= {"snr_gamma", "ema", "reference_drop", "optimizer"}


def _train_parser():
    from magicanimate.cli import build_parser

    parser = build_parser()
    return parser._subparsers._group_actions[0].choices["train"]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--prediction-type", "v_prediction", "prediction_type 'v_prediction' does not fit the release weights"),
        ("--beta-schedule", "squaredcos_cap_v2", "beta_schedule 'squaredcos_cap_v2' does not fit the release"),
        ("--beta-end", "0.02", "beta_end 0.02 does not fit the release weights"),
        ("--num-train-timesteps", "500", "num_train_timesteps 500 does not fit"),
        ("--fusion-blocks", "full", "fusion_blocks 'full' does not fit the release weights"),
    ],
)
def test_configs_that_do_not_fit_the_release_are_refused_in_one_line(tmp_path, capsys, flag, value, message):
    code = main(
        [
            "train",
            "--stage",
            "2",
            "--data",
            str(tmp_path),
            "--pretrained",
            str(tmp_path),
            "-o",
            str(tmp_path / "run"),
            flag,
            value,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    # The same refusal from a config file.
    config = tmp_path / "train.yaml"
    config.write_text(f"{flag.removeprefix('--').replace('-', '_')}: {value}\n")
    assert main(["train", "--stage", "lora", "--config", str(config)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_settings_and_data_are_one_line_errors(tmp_path, capsys):
    assert main(["train", "--stage", "1", "--pretrained", str(tmp_path), "-o", str(tmp_path / "r")]) == 2
    assert "setting data is needed: pass --data" in capsys.readouterr().err
    assert (
        main(
            ["train", "--stage", "1", "--data", str(tmp_path), "--pretrained", str(tmp_path), "-o", str(tmp_path / "r")]
        )
        == 2
    )
    assert "no manifest.jsonl in" in capsys.readouterr().err
    (tmp_path / "train.yaml").write_text("learning_rat: 1e-4\n")
    assert main(["train", "--config", str(tmp_path / "train.yaml")]) == 2
    assert "unknown training setting(s) learning_rat" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ cached latents

# A run on cached latents (float16 mean and std) against the same run encoding every sample with the VAE: the
# cache's rounding (at most 2**-11 of each value) moves the latents, hence the losses, a little. Measured on the
# tiny tree, 3 steps at learning rate 1e-3: the losses differ by at most 5.9e-6 relative (8 single samples of stages
# 1 and 2: 4.3e-6); 5e-5 leaves room for other CPUs. Measured for wrong implementations: another noise draw moves
# them by 7%, the mean without the std term by 0.2%.
CACHED_LOSS_RTOL = 5e-5


def add_cached_latents(tree: Path, data: Path) -> Path:
    """What prepare-data --cache-latents adds to each clip (make_data writes no meta.json for prepare-data to
    read): latents.safetensors from the tree's VAE."""
    from magicanimate.training.latents import LatentEncoder
    from magicanimate.training.manifest import read_manifest

    encoder = LatentEncoder.load(tree, device="cpu")
    for entry in read_manifest(data):
        encoder.write(data / entry.path, entry.frames, entry.size)
    return data


@pytest.fixture(scope="module")
def cached_data(tiny_tree, tmp_path_factory) -> Path:
    return add_cached_latents(tiny_tree, make_data(tmp_path_factory.mktemp("cached-data")))


WHOLE_FRAMES = dict(crop_scale=1.0, flip_probability=0.0)


def test_cached_latents_are_sampled_with_the_vae_encoders_draws(tiny_tree, data, tmp_path):
    """From the latent distribution's exact mean and std, sample_cached gives bit for bit what encode_frames gives
    (diffusers' latent_dist.sample: one draw per 4-frame chunk, here 4 + 2 frames) and leaves the generator at the
    same place, so the diffusion noise drawn next is the same as well."""
    settings = tiny_settings(tiny_tree, data, tmp_path / "run", clip_frames=6, **WHOLE_FRAMES)
    trainer = Trainer(load_train_config(settings))
    model, vae = trainer.accelerator.unwrap_model(trainer.model), trainer.pipe.vae
    frames = trainer.data.sample(0, 3).frames
    with torch.no_grad():
        pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
        dists = [vae.encode(chunk).latent_dist for chunk in pixels.split(4)]
        mean, std = (torch.cat([getattr(d, key) for d in dists]).numpy() for key in ("mean", "std"))
        encoded = model.encode_frames(frames, a := torch.Generator().manual_seed(7))
        cached = model.sample_cached(mean, std, b := torch.Generator().manual_seed(7))
    assert encoded.shape == (1, 4, 6, 8, 8) and torch.equal(encoded, cached)
    assert torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b))


def test_training_on_cached_latents_gives_the_same_losses(tiny_tree, data, cached_data, tmp_path):
    """Three steps through the loader, the same seed, with and without cached_latents (the VAE encoder made
    unusable in the cached run: it must not run): the same losses within CACHED_LOSS_RTOL."""
    losses = []
    for cached in (False, True):
        settings = tiny_settings(
            tiny_tree,
            cached_data,
            tmp_path / f"run-{cached}",
            clip_frames=6,
            max_steps=3,
            learning_rate=1e-3,
            cached_latents=cached,
            **WHOLE_FRAMES,
        )
        trainer = Trainer(load_train_config(settings))
        if cached:
            sample = trainer.data.sample(0, 1)
            assert sample.frames is None and sample.latent_mean.shape == (6, 4, 8, 8)
            assert sample.latent_mean.dtype == np.float16 and sample.reference_mean.shape == (4, 8, 8)

            def no_encoder(*args, **kwargs):
                raise AssertionError("the VAE encoder ran on cached latents")

            trainer.pipe.vae.encode = no_encoder
        trainer.run()
        log = (tmp_path / f"run-{cached}" / "log.jsonl").read_text().splitlines()
        losses.append([json.loads(line)["loss"] for line in log])
    assert len(losses[1]) == 3
    np.testing.assert_allclose(losses[1], losses[0], rtol=CACHED_LOSS_RTOL, atol=0)


def test_cached_latents_refusals_are_one_line(tiny_tree, data, cached_data, tmp_path, capsys):
    other_tree = tmp_path / "other-tree"  # the same tree with another VAE
    shutil.copytree(tiny_tree, other_tree)
    vae_file = other_tree / "sd-vae-ft-mse" / "diffusion_pytorch_model.safetensors"
    weights = safetensors.torch.load_file(vae_file)
    weights = {key: value + 1e-3 if key.endswith("conv_in.weight") else value for key, value in weights.items()}
    safetensors.torch.save_file(weights, vae_file)

    whole = ["--crop-scale", "1", "--flip-probability", "0", "--resolution", "64"]
    cases = [
        (cached_data, tiny_tree, [], "setting cached_latents needs crop_scale 1"),
        (cached_data, tiny_tree, ["--crop-scale", "1"], "setting cached_latents needs flip_probability 0"),
        (cached_data, tiny_tree, [*whole, "--resolution", "128"], "setting cached_latents needs resolution 64"),
        (data, tiny_tree, whole, "clip clip0 has no cached latents"),
        (cached_data, other_tree, whole, "the cached latents of clip clip0 come from another VAE"),
    ]
    for folder, tree, flags, message in cases:
        argv = ["train", "--stage", "2", "--data", str(folder), "--pretrained", str(tree), "-o", str(tmp_path / "r")]
        code = main([*argv, "--cached-latents", "--clip-frames", "2", "--image-probability", "0", *flags])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert "rerun prepare-data with --cache-latents" in err
    assert not list((tmp_path / "r").glob("checkpoint-*"))
