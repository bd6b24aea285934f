"""The prompt stage: a reference photo generated from text by SD 1.5 (diffusers' StableDiffusionPipeline around the
animation pipeline's VAE, text encoder and tokenizer, plus the tree's 2D UNet), on the tiny tree built in code.

Reproducible with the seed, at the motion's aspect ratio and the animation's size, the 2D UNet loaded only when a
prompt is used, and end to end through the Python API, the CLI, batch jobs and the demo.
"""

import gc
import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
import yaml
from conftest import load_tiny_pipeline
from diffusers import UNet2DConditionModel
from PIL import Image
from tiny_models import make_motion, make_reference

from magicanimate import CheckpointError, InputError, animate
from magicanimate.batch import job_configs, read_manifest, run_batch
from magicanimate.cli import animate_command, build_parser
from magicanimate.io import write_video
from magicanimate.loading import load_prompt_stage, locate_weights
from magicanimate.models.original_checkpoints import read_state_dict
from magicanimate.settings import SettingError, load_config
from magicanimate.stages.prompt_reference import PromptReference, reference_output_path

FRAMES = 8
PROMPT = "a woman in a red dress, full body, studio"
# One 8-frame window, one animation step, two steps for the photo: each call is about a second here.
SMALL = {"steps": 1, "prompt_steps": 2, "size": 64, "context_frames": 8, "context_overlap": 2, "check_motion": False}


@pytest.fixture(scope="module")
def pipe(tiny_tree):
    """A pipeline of this module's own: the prompt stage attaches itself to the pipeline it serves."""
    return load_tiny_pipeline(tiny_tree)


@pytest.fixture(scope="module")
def tall_motion() -> np.ndarray:
    """8 DensePose-like frames, 48 wide and 64 high (at size 64: 64x88, the shorter side 64)."""
    return np.ascontiguousarray(make_motion(FRAMES, 64)[:, :, 8:56])


@pytest.fixture(scope="module")
def files(tmp_path_factory, tall_motion):
    folder = tmp_path_factory.mktemp("prompt-inputs")
    write_video(folder / "tall.mp4", tall_motion, fps=25)
    Image.fromarray(make_reference(64)).save(folder / "photo.png")
    return folder


def unet2d_count() -> int:
    gc.collect()
    return sum(type(item) is UNet2DConditionModel for item in gc.get_objects())


def test_the_photo_has_the_motions_aspect_ratio_and_follows_the_seed(pipe, tiny_tree, tall_motion):
    settings = {**SMALL, "pretrained": str(tiny_tree)}
    first = animate(motion=tall_motion, prompt=PROMPT, pipeline=pipe, seed=3, **settings)
    assert first.reference.size == (64, 88)  # (width, height): the shorter side is the size, both multiples of 8
    assert first.frames.shape == (FRAMES, 88, 64, 3)
    # The generated photo is what was animated: given as the photo, the same run gives the same frames.
    from_photo = animate(first.reference, tall_motion, pipeline=pipe, seed=3, **settings)
    assert from_photo.reference is None
    np.testing.assert_array_equal(from_photo.frames, first.frames)
    # The same seed and prompt give the same bits; another seed or prompt another photo.
    stage = pipe.prompt_reference
    draw = {"height": 88, "width": 64, "steps": SMALL["prompt_steps"]}
    np.testing.assert_array_equal(np.asarray(stage(PROMPT, seed=3, **draw)), np.asarray(first.reference))
    for prompt, seed in ((PROMPT, 4), ("a man in a blue suit", 3)):
        other = np.asarray(stage(prompt, seed=seed, **draw), float)
        assert np.abs(other - np.asarray(first.reference, float)).mean() > 1, (prompt, seed)
    # A wide motion gets a wide photo.
    wide = animate(motion=tall_motion.transpose(0, 2, 1, 3).copy(), prompt=PROMPT, pipeline=pipe, **settings)
    assert wide.reference.size == (88, 64) and wide.frames.shape == (FRAMES, 64, 88, 3)


def test_the_2d_unet_is_loaded_only_when_a_prompt_is_used(tiny_tree, tall_motion):
    fresh = load_tiny_pipeline(tiny_tree)
    settings = {**SMALL, "pretrained": str(tiny_tree)}
    before = unet2d_count()
    animate(make_reference(64), tall_motion, pipeline=fresh, **settings)
    assert unet2d_count() == before  # no prompt: nothing loaded
    animate(motion=tall_motion, prompt=PROMPT, pipeline=fresh, **settings)
    assert unet2d_count() == before + 1
    stage = fresh.prompt_reference
    assert load_prompt_stage(fresh, load_config(**settings, prompt="another prompt")) is stage
    assert unet2d_count() == before + 1  # loaded once, kept for the next prompts
    assert isinstance(stage, PromptReference)
    text_to_image = stage.pipeline
    assert text_to_image.vae is fresh.vae and text_to_image.text_encoder is fresh.text_encoder
    assert text_to_image.tokenizer is fresh.tokenizer and text_to_image.safety_checker is None
    # It is SD 1.5's 2D UNet from the tree (the tiny tree draws the appearance encoder's weights independently).
    saved = read_state_dict(tiny_tree / "stable-diffusion-v1-5" / "unet" / "diffusion_pytorch_model.bin")
    for name, tensor in text_to_image.unet.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert not torch.equal(fresh.appearance_encoder.conv_in.weight, text_to_image.unet.conv_in.weight)


def test_the_prompt_weights_are_checked_only_with_a_prompt(tmp_path, pipe, tall_motion):
    converted = tmp_path / "converted"  # a `magicanimate convert` folder holds the video UNet, not SD 1.5's 2D one
    converted.mkdir()
    (converted / "model_index.json").write_text("{}")
    assert locate_weights(load_config(pretrained=str(converted)))[0] == converted
    with pytest.raises(CheckpointError, match=r"a prompt needs SD 1.5's 2D UNet.*stable-diffusion-v1-5/unet"):
        locate_weights(load_config(pretrained=str(converted), prompt=PROMPT))
    with pytest.raises(CheckpointError, match="prompt model folder not found"):
        locate_weights(load_config(pretrained=str(converted), prompt=PROMPT, prompt_model=str(tmp_path / "none")))
    partial = tmp_path / "fine-tune"
    for part in ("unet", "tokenizer"):
        (partial / part).mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"not an SD 1.5 folder in diffusers layout \(missing: vae, text_enc"):
        locate_weights(load_config(pretrained=str(converted), prompt=PROMPT, prompt_model=str(partial)))
    # With a loaded pipeline the check still comes before any work.
    with pytest.raises(CheckpointError, match="prompt needs SD 1.5's 2D UNet"):
        animate(motion=tall_motion, prompt=PROMPT, pipeline=pipe, **{**SMALL, "pretrained": str(converted)})


def test_a_fine_tune_brings_its_own_components(tmp_path, pipe, tiny_tree, tall_motion):
    """``prompt_model``: an SD 1.5 folder in diffusers layout, whose UNet, VAE, text encoder and tokenizer draw."""
    tree_photo = animate(motion=tall_motion, prompt=PROMPT, pipeline=pipe, seed=3,
                         **{**SMALL, "pretrained": str(tiny_tree)}).reference  # fmt: skip
    fine_tune = tmp_path / "fine-tune"
    pipe.prompt_reference.pipeline.save_pretrained(fine_tune)  # the tree's stage, as an SD 1.5 folder
    video = animate(motion=tall_motion, prompt=PROMPT, pipeline=pipe, prompt_model=str(fine_tune), seed=3,
                    **{**SMALL, "pretrained": str(tiny_tree)})  # fmt: skip
    own = pipe.prompt_reference.pipeline
    assert own.vae is not pipe.vae and own.text_encoder is not pipe.text_encoder
    # The same weights as the tree's stage (saved from it): the same photo, up to float rounding of another loading
    # path (the tensors' memory layout; the photo is uint8, so at most a level here and there).
    difference = np.abs(np.asarray(video.reference, int) - np.asarray(tree_photo, int))
    assert difference.max() <= 1


def test_the_api_takes_exactly_one_of_a_photo_and_a_prompt(tall_motion, tmp_path):
    nowhere = str(tmp_path / "no-weights")
    with pytest.raises(InputError, match="exactly one of reference .* and prompt"):
        animate(motion=tall_motion, pretrained=nowhere)
    with pytest.raises(InputError, match="exactly one of reference .* and prompt"):
        animate(make_reference(64), tall_motion, prompt=PROMPT, pretrained=nowhere)
    with pytest.raises(SettingError, match="setting prompt must describe the person"):
        animate(motion=tall_motion, prompt="  ", pretrained=nowhere)
    with pytest.raises(InputError, match="align_to_reference fits the motion to the person in a reference photo"):
        animate(driving=tmp_path / "walk.mp4", prompt=PROMPT, align_to_reference=True, pretrained=nowhere)


def test_cli_reference_and_prompt_are_exclusive(files, tmp_path, capsys):
    common = ["animate", "--motion", str(files / "tall.mp4"), "-o", str(tmp_path / "out.mp4")]
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args([*common, "--reference", str(files / "photo.png"), "--prompt", PROMPT])
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("error: argument --prompt: not allowed with argument --reference")
    assert message.count("\n") == 1  # one line
    with pytest.raises(InputError, match="give the person to animate: --reference PHOTO, or --prompt TEXT"):
        animate_command(build_parser().parse_args(common))
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump({"prompt": PROMPT}))
    with pytest.raises(InputError, match="--reference and a prompt .* are exclusive"):
        animate_command(build_parser().parse_args([*common, "--reference", str(files / "photo.png"), "--config",
                                                   str(config)]))  # fmt: skip
    # The photo's file is checked with the output, before any model loads.
    (tmp_path / "out.reference.png").write_bytes(b"an earlier photo")
    with pytest.raises(InputError, match=r"out.reference.png already exists; pass overwrite"):
        animate_command(build_parser().parse_args([*common, "--prompt", PROMPT, "--pretrained", str(tmp_path)]))


def test_cli_writes_the_photo_next_to_the_animation(tiny_tree, files, tmp_path):
    """With the refine pass too (tests/test_refine.py checks it in depth): the video at the refine size, the photo
    at the animation's."""
    out = tmp_path / "out.mp4"
    command = [sys.executable, "-m", "magicanimate.cli", "animate", "--prompt", PROMPT, "--motion",
               files / "tall.mp4", "-o", out, "--pretrained", tiny_tree, "--steps", 1, "--prompt-steps", 2, "--size",
               64, "--context-frames", 8, "--context-overlap", 2, "--refine-size", 96, "--refine-strength", 0.5,
               "--refine-steps", 2]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    photo = tmp_path / "out.reference.png"
    assert result.stdout.splitlines() == [f"wrote {photo}", f"wrote {out}"]
    assert Image.open(photo).size == (64, 88)
    with av.open(str(out)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == FRAMES and frames[0].shape == (128, 96, 3)  # 88 x 64 refined with the shorter side 96
    # The plan says so.
    assert "from a photo generated from the prompt (2 steps)" in result.stderr
    assert "then refined at 96x128: 1 of 2 steps (strength 0.5)" in result.stderr


def test_reference_output_path():
    assert reference_output_path("out/a.mp4").as_posix() == "out/a.reference.png"
    assert reference_output_path("a.gif").as_posix() == "a.reference.png"
    assert reference_output_path("frames").as_posix() == "frames.reference.png"  # beside the folder of PNG frames


def write_manifest(path, jobs, defaults=None):
    path.write_text(yaml.safe_dump({"defaults": {**SMALL, **(defaults or {})}, "jobs": jobs}))
    return path


def test_batch_manifest_rules_for_prompts(tmp_path):
    drive = {"driving": "d.mp4"}

    def configs(jobs, defaults=None, flags=None):
        return job_configs(read_manifest(write_manifest(tmp_path / "jobs.yaml", jobs, defaults)), flags=flags)[1]

    assert configs([{"prompt": PROMPT, **drive, "output": "a.mp4"}])[1].prompt == PROMPT
    assert configs([{**drive, "output": "a.mp4"}], defaults={"prompt": PROMPT})[1].prompt == PROMPT
    with pytest.raises(InputError, match=r"job 1 has no reference \(a photo\) or prompt"):
        configs([{**drive, "output": "a.mp4"}])
    with pytest.raises(InputError, match=r"job 1 has both a reference and a prompt \(its own\)"):
        configs([{"reference": "r.png", "prompt": PROMPT, **drive, "output": "a.mp4"}])
    with pytest.raises(InputError, match=r"job 2 has both a reference and a prompt \(from defaults:\)"):
        configs([{**drive, "output": "a.mp4"}, {"reference": "r.png", **drive, "output": "b.mp4"}], {"prompt": "x"})
    with pytest.raises(InputError, match=r"job 1 has both a reference and a prompt \(from --prompt\)"):
        configs([{"reference": "r.png", **drive, "output": "a.mp4"}], flags={"prompt": PROMPT})
    with pytest.raises(InputError, match="job 1 writes its generated photo to .*a.reference.png, which is job 2's"):
        configs([{"prompt": PROMPT, **drive, "output": "a.mp4"}, {"reference": "a.reference.png", **drive,
                                                                    "output": "b.mp4"}])  # fmt: skip
    with pytest.raises(InputError, match="job 1: align_to_reference needs a reference photo"):
        configs([{"prompt": PROMPT, **drive, "output": "a.mp4", "align_to_reference": True}])
    # CSV: a prompt column instead of reference; its cells stay text (not YAML: "yes" is no boolean here).
    manifest = tmp_path / "jobs.csv"
    manifest.write_text('prompt;driving;output;seed\nyes;d.mp4;a.mp4;4\n"a dancer: red, full body";d.mp4;b.mp4;\n')
    plan = read_manifest(manifest)
    assert [job.reference for job in plan.jobs] == [None, None]
    texts = job_configs(plan)[1]
    assert (texts[1].prompt, texts[1].seed, texts[2].prompt) == ("yes", 4, "a dancer: red, full body")


def test_batch_jobs_save_the_generated_photo(pipe, tiny_tree, files, tmp_path):
    jobs = [
        {"prompt": PROMPT, "driving": str(files / "tall.mp4"), "output": "out/a.mp4"},
        {"reference": str(files / "photo.png"), "driving": str(files / "tall.mp4"), "output": "out/b.mp4"},
    ]
    manifest = write_manifest(tmp_path / "jobs.yaml", jobs)
    report = tmp_path / "report.json"
    results = run_batch(manifest, settings={"pretrained": str(tiny_tree)}, pipeline=pipe, report=report)
    assert [result.status for result in results] == ["done", "done"], [result.error for result in results]
    assert Image.open(tmp_path / "out" / "a.reference.png").size == (64, 88)
    assert not (tmp_path / "out" / "b.reference.png").exists()  # a photo was given
    entries = json.loads(report.read_text())["jobs"]
    assert entries[0]["reference"] == str(tmp_path / "out" / "a.reference.png")  # the photo that was animated
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["a.mp4", "a.reference.png", "b.mp4"]


def test_demo_takes_a_prompt_instead_of_an_upload(pipe, tiny_tree, files):
    from magicanimate.demo.app import build_demo
    from magicanimate.demo.runner import Limits, request_settings

    with pytest.raises(SettingError, match="setting refine_size must be at most 128 on this demo"):
        request_settings(load_config(size=64), Limits(max_size=128), refine_size=256)
    server = load_config(pretrained=str(tiny_tree), steps=1, prompt_steps=2, size=64, context_frames=8,
                         context_overlap=2)  # fmt: skip
    demo, animator = build_demo(pipe, server)
    try:
        endpoints = demo.get_api_info()["named_endpoints"]
        # /animate keeps its signature for existing scripts; /animate_stages (the Animate button) adds the stages.
        names = [parameter["parameter_name"] for parameter in endpoints["/animate"]["parameters"]]
        assert names[:2] == ["reference_image", "driving_video"] and names[-2:] == ["grid", "densepose_preview"]
        assert len(endpoints["/animate"]["returns"]) == 3
        staged = [parameter["parameter_name"] for parameter in endpoints["/animate_stages"]["parameters"]]
        assert staged[:3] == ["reference_image", "prompt", "driving_video"]
        assert {"negative_prompt", "refine_size", "refine_strength"} <= set(staged)
        run = next(fn.fn for fn in demo.fns.values() if fn.api_name == "animate_stages")
        animation, grid, preview, photo = run(None, PROMPT, str(files / "tall.mp4"), 1, 7.5, 3, 64, 8, 2)
        assert grid is None and preview is None and photo["visible"] is True
        assert Image.open(photo["value"]).size == (64, 88)
        with av.open(animation) as container:
            assert container.streams.video[0].height == 88
        import gradio as gr

        with pytest.raises(gr.Error, match="either a reference image or a prompt, not both"):
            run(make_reference(64), PROMPT, str(files / "tall.mp4"), 1, 7.5, 3, 64, 8, 2)
        with pytest.raises(gr.Error, match="or describe one in the prompt box"):
            run(None, "   ", str(files / "tall.mp4"), 1, 7.5, 3, 64, 8, 2)
    finally:
        demo.close()
        animator.close()
