"""``magicanimate export`` and ``animate --lora`` on the tiny tree: exported trees load through both loaders with the
trained weights and animate exactly as the training pipeline does; LoRA files apply at a scale; and the whole path
from a raw clip (prepare-data with the DensePose stand-in) through train and export to animate."""

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from conftest import assert_frames_close, tiny_latents
from PIL import Image
from test_densepose import save_stand_in, scene
from test_training import flags, make_data, tiny_settings
from tiny_models import make_motion, make_reference

from magicanimate import MagicAnimatePipeline
from magicanimate.cli import main
from magicanimate.io import read_video, write_video
from magicanimate.models.original_checkpoints import APPEARANCE_ENCODER_DEAD_TAIL, read_state_dict
from magicanimate.training.config import load_train_config
from magicanimate.training.export import export, original_unet_state
from magicanimate.training.trainer import Trainer

MODELS = ("unet", "appearance_encoder", "controlnet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def runs(tiny_tree, tmp_path_factory):
    """One step of each stage at a learning rate that moves the weights visibly; stage 2 keeps an EMA."""
    root = tmp_path_factory.mktemp("export-runs")
    data = make_data(root / "data")
    trainers = {}
    for stage in ("1", "2", "lora"):
        settings = tiny_settings(
            tiny_tree, data, root / stage, stage=stage, max_steps=1, learning_rate=1e-2, ema=stage == "2", ema_decay=0.5
        )
        trainer = Trainer(load_train_config(settings))
        trainer.run()
        trainers[stage] = trainer
    return trainers


def state(pipe, name) -> dict:
    return {k: v.detach().float() for k, v in getattr(pipe, name).state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_step(pipe) -> np.ndarray:
    return pipe(
        make_reference(64), make_motion(16, 64), num_inference_steps=1, latents=tiny_latents(16), output_type="np"
    ).frames


@pytest.mark.parametrize("stage", ["1", "2"])
def test_exported_tree_loads_with_the_trained_weights_and_animates_the_same(runs, tiny_tree, tmp_path, stage):
    trainer = runs[stage]
    tree = export(trainer.last_checkpoint, tmp_path / "tree")
    loaded = MagicAnimatePipeline.from_pretrained(tree)
    loaded.set_progress_bar_config(disable=True)
    for name in MODELS:  # everything: the trained pieces and the ones linked from the base tree
        assert same_weights(state(trainer.pipe, name), state(loaded, name)), name
    base = MagicAnimatePipeline.from_pretrained(tiny_tree)
    trained = [name for name in MODELS if not same_weights(state(base, name), state(loaded, name))]
    assert trained == (["appearance_encoder", "controlnet"] if stage == "1" else ["unet"])
    # Same weights, same code: the same frames (one step, 16 frames).
    assert_frames_close(one_step(loaded), one_step(trainer.pipe))

    # The motion-only loader takes the trained motion modules and SD 1.5's spatial weights.
    motion_only = MagicAnimatePipeline.from_pretrained(tree, motion_only=True)
    base_motion_only = MagicAnimatePipeline.from_pretrained(tiny_tree, motion_only=True)
    a, b, c = state(motion_only, "unet"), state(trainer.pipe, "unet"), state(base_motion_only, "unet")
    for key in a:
        expected = b[key] if "motion_modules" in key else c[key]
        assert torch.equal(a[key], expected), key

    # The release layout and key names.
    ckpt = read_state_dict(tree / "MagicAnimate/temporal_attention/temporal_attention.ckpt")
    release = read_state_dict(tiny_tree / "MagicAnimate/temporal_attention/temporal_attention.ckpt")
    assert ckpt.keys() == release.keys()
    appearance = safetensors.safe_open(
        tree / "MagicAnimate/appearance_encoder/diffusion_pytorch_model.safetensors", framework="pt"
    ).keys()
    assert not set(appearance) & APPEARANCE_ENCODER_DEAD_TAIL


def test_motion_keys_go_back_to_the_original_names_exactly(tiny_tree):
    """The release's temporal checkpoint, loaded into our UNet and written back, is the same file content: every
    original key with the same tensor (pos_encoder tables included)."""
    pipe = MagicAnimatePipeline.from_pretrained(tiny_tree)
    written = original_unet_state(pipe.unet.state_dict())
    release = read_state_dict(tiny_tree / "MagicAnimate/temporal_attention/temporal_attention.ckpt")
    assert written.keys() == release.keys()
    for key, value in release.items():
        torch.testing.assert_close(written[key], value, rtol=0, atol=1e-7 if key.endswith(".pe") else 0)


def test_ema_export_writes_the_moving_average(runs, tmp_path):
    trainer = runs["2"]
    tree = export(trainer.last_checkpoint, tmp_path / "ema", ema=True)
    loaded = state(MagicAnimatePipeline.from_pretrained(tree), "unet")
    ema = safetensors.torch.load_file(trainer.last_checkpoint / "ema.safetensors")
    assert ema and all(torch.equal(loaded[name.removeprefix("unet.")], value) for name, value in ema.items())
    trained = state(trainer.pipe, "unet")
    assert any(not torch.equal(loaded[k.removeprefix("unet.")], trained[k.removeprefix("unet.")]) for k in ema)


def test_lora_file_applies_at_a_scale(runs, tiny_tree, tmp_path):
    """The exported LoRA, fused at scale 1, animates as the training pipeline (adapters unfused) does, up to the
    rounding of adding B @ A into the weights (measured: 3.1e-6 on the frames; the LoRA itself moves them by 9e-3,
    so 1e-4 separates the two); at scale 0 every weight is the base's, bit for bit."""
    from magicanimate import load_pipeline

    trainer = runs["lora"]
    lora = export(trainer.last_checkpoint, tmp_path / "character.safetensors")
    assert lora.stat().st_size < 1_000_000
    fused = load_pipeline(pretrained=str(tiny_tree), lora=str(lora), lora_scale=1.0, device="cpu")
    fused.set_progress_bar_config(disable=True)
    frames = one_step(fused)
    np.testing.assert_allclose(frames, one_step(trainer.pipe), rtol=0, atol=1e-4)
    plain = MagicAnimatePipeline.from_pretrained(tiny_tree)
    plain.set_progress_bar_config(disable=True)
    assert np.abs(frames - one_step(plain)).max() > 1e-3
    off = load_pipeline(pretrained=str(tiny_tree), lora=str(lora), lora_scale=0.0, device="cpu")
    for name in ("unet", "appearance_encoder"):
        a, b, c = state(off, name), state(plain, name), state(fused, name)
        assert all(torch.equal(a[k], b[k]) for k in b)
        assert any(not torch.equal(c[k], b[k]) for k in b)

    # Through the command line.
    Image.fromarray(make_reference(64)).save(tmp_path / "reference.png")
    write_video(tmp_path / "motion.mp4", make_motion(8, 64), fps=25)
    animate = f"animate --reference {tmp_path / 'reference.png'} --motion {tmp_path / 'motion.mp4'} --pretrained "
    animate += f"{tiny_tree} --lora {lora} --lora-scale 0.5 --steps 1 --size 64 -o {tmp_path / 'out.mp4'}"
    code = main(animate.split())
    assert code == 0 and len(read_video(tmp_path / "out.mp4")[0]) == 8


def test_export_mistakes_are_one_line_errors(runs, tiny_tree, tmp_path, capsys):
    cases = [
        (["export", str(runs["lora"].last_checkpoint), "-o", str(tmp_path / "tree")], "must end in .safetensors"),
        (["export", str(runs["1"].last_checkpoint), "-o", str(tmp_path / "x.safetensors")], "exports a folder"),
        (["export", str(runs["1"].last_checkpoint), "-o", str(tmp_path / "t"), "--ema"], "holds no an EMA"),
        (["export", str(tmp_path), "-o", str(tmp_path / "t")], "is not a training checkpoint"),
    ]
    for argv, message in cases:
        assert main(argv) in (2, 3)
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, foreign)
    assert main(
        [
            "animate",
            "--reference",
            "r.png",
            "--motion",
            "m.mp4",
            "--pretrained",
            str(tiny_tree),
            "--lora",
            str(foreign),
            "-o",
            str(tmp_path / "o.mp4"),
        ]
    ) in (2, 3)
    assert not (tmp_path / "tree").exists() and not (tmp_path / "t").exists()


def test_raw_clip_to_an_exported_tree_that_animate_uses(tiny_tree, tmp_path):
    """The three commands end to end: prepare-data (DensePose stand-in) on a raw two-scene video, train stage 2
    with validation, export, animate with the exported tree."""
    videos = tmp_path / "videos"
    videos.mkdir()
    clip = []
    for t in range(24):
        frame = scene(width=96, height=96, red=(10 + 2 * t, 16, 40 + 2 * t, 90))
        if t >= 12:
            frame[frame[..., 0] == 0] = (0, 0, 200)  # a cut: another background
        clip.append(frame)
    write_video(videos / "dance.mp4", clip, fps=25)
    model = save_stand_in(tmp_path / "stand_in.torchscript")
    data, run = tmp_path / "data", tmp_path / "run"
    prepare = f"prepare-data {videos} -o {data} --model {model} --device cpu --size 64 --min-frames 4 --no-progress"
    assert main(prepare.split()) == 0
    assert len((data / "manifest.jsonl").read_text().splitlines()) == 2
    settings = tiny_settings(
        tiny_tree, data, run, stage="2", max_steps=1, validate_every=1, validation_steps=1, validation_frames=4
    )
    assert main(["train", *flags(settings)]) == 0
    assert (run / "validation" / "step-000001.mp4").is_file()
    metrics = (run / "validation.jsonl").read_text()
    assert '"psnr"' in metrics and '"ssim"' in metrics
    assert main(["export", str(run / "checkpoint-1"), "-o", str(tmp_path / "tree")]) == 0
    Image.fromarray(make_reference(64)).save(tmp_path / "reference.png")
    motion = data / "clips" / "dance-mp4-000" / "densepose.mp4"
    animate = f"animate --reference {tmp_path / 'reference.png'} --motion {motion} --pretrained {tmp_path / 'tree'}"
    assert main([*animate.split(), "--steps", "1", "--size", "64", "-o", str(tmp_path / "out.mp4")]) == 0
    assert (tmp_path / "out.mp4").is_file()
