"""``magicanimate convert``: the original tree -> a safetensors-only folder that animates identically."""

import os
import subprocess
import sys

import numpy as np
from conftest import TINY_FRAMES, tiny_latents

from magicanimate.api import animate


def run_cli(*args):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "magicanimate", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)


def test_converted_folder_is_safetensors_only_and_animates_identically(
    tiny_tree, tiny_pipe, reference_image, motion16, tmp_path
):
    dst = tmp_path / "converted"
    result = run_cli("convert", tiny_tree, dst)
    assert result.returncode == 0, result.stderr
    assert (dst / "model_index.json").is_file()
    weights = [p for p in dst.rglob("*") if p.suffix in (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".pkl")]
    assert weights and all(p.suffix == ".safetensors" for p in weights), weights
    assert not list(tmp_path.glob(".*partial*"))

    # Through the public API, so load_pipeline takes the converted folder as --pretrained (1 step, fixed seed).
    settings = {"steps": 1, "size": 64, "seed": 5, "device": "cpu", "dtype": "float32"}
    original = animate(reference_image, motion16, pipeline=tiny_pipe, **settings)
    converted = animate(reference_image, motion16, pretrained=str(dst), **settings)
    np.testing.assert_array_equal(converted.frames, original.frames)

    # And the pipeline class itself, with fixed latents.
    from magicanimate import MagicAnimatePipeline

    loaded = MagicAnimatePipeline.from_pretrained(dst)
    loaded.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 1, "latents": tiny_latents(TINY_FRAMES), "output_type": "np"}
    np.testing.assert_allclose(
        loaded(reference_image, motion16, **kwargs).frames,
        tiny_pipe(reference_image, motion16, **kwargs).frames,
        rtol=0,
        atol=1e-6,
    )


def test_convert_refuses_an_existing_folder_and_a_missing_tree(tiny_tree, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    result = run_cli("convert", tiny_tree, tmp_path / "taken")
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "--overwrite" in result.stderr
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"

    result = run_cli("convert", tmp_path / "nothing-here", tmp_path / "out")
    assert result.returncode == 2 and "not found" in result.stderr
    assert not (tmp_path / "out").exists()
