"""``magicanimate convert``: the original tree -> a safetensors-only folder with the same weights, which animates the
same up to float32 rounding (FRAME_ATOL, measured: see conftest)."""

import errno
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY_FRAMES, assert_frames_close, tiny_latents
from diffusers import DiffusionPipeline

from magicanimate.api import animate
from magicanimate.convert import convert
from magicanimate.errors import InputError, ResourceError


def run_cli(*args):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "magicanimate", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)


def test_converted_folder_is_safetensors_only_and_animates_the_same(
    tiny_tree, tiny_pipe, reference_image, motion16, tmp_path
):
    dst = tmp_path / "converted"
    result = run_cli("convert", tiny_tree, dst)
    assert result.returncode == 0, result.stderr
    assert (dst / "model_index.json").is_file()
    weights = [p for p in dst.rglob("*") if p.suffix in (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".pkl")]
    assert weights and all(p.suffix == ".safetensors" for p in weights), weights
    assert not list(tmp_path.glob(".*partial*"))

    from magicanimate import MagicAnimatePipeline

    loaded = MagicAnimatePipeline.from_pretrained(dst)
    loaded.set_progress_bar_config(disable=True)
    for name, component in tiny_pipe.components.items():  # the promise: the very same weights
        if isinstance(component, torch.nn.Module):
            theirs = loaded.components[name].state_dict()
            assert set(theirs) == set(component.state_dict()), name
            for key, value in component.state_dict().items():
                assert theirs[key].dtype == value.dtype and torch.equal(theirs[key], value), f"{name}: {key}"

    kwargs = {"num_inference_steps": 1, "latents": tiny_latents(TINY_FRAMES), "output_type": "np"}
    assert_frames_close(
        loaded(reference_image, motion16, **kwargs).frames, tiny_pipe(reference_image, motion16, **kwargs).frames
    )

    # Through the public API, so the converted folder is taken as --pretrained (uint8 frames, 1 step, fixed seed).
    settings = {"steps": 1, "size": 64, "seed": 5, "device": "cpu", "dtype": "float32"}
    original = animate(reference_image, motion16, pipeline=tiny_pipe, **settings)
    converted = animate(reference_image, motion16, pretrained=str(dst), **settings)
    assert_frames_close(converted.frames, original.frames)


def test_convert_refuses_an_existing_folder_and_a_missing_tree(tiny_tree, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    result = run_cli("convert", tiny_tree, tmp_path / "taken")
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "--overwrite" in result.stderr
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"

    result = run_cli("convert", tmp_path / "nothing-here", tmp_path / "out")
    assert result.returncode == 2 and "not found" in result.stderr
    assert not (tmp_path / "out").exists()


def _snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


@pytest.mark.parametrize("where", ["itself", "inside", "around"])
def test_convert_refuses_a_destination_that_is_or_holds_the_source(tiny_tree, tmp_path, where):
    """Even with overwrite: the source tree is never written into or replaced. Checked before anything loads."""
    before = _snapshot(tiny_tree)
    dst = {"itself": tiny_tree, "inside": tiny_tree / "converted", "around": tiny_tree.parent}[where]
    with pytest.raises(InputError) as info:
        convert(tiny_tree, dst, overwrite=True)
    assert str(tiny_tree) in str(info.value) or str(dst) in str(info.value)
    assert _snapshot(tiny_tree) == before


@pytest.mark.parametrize(
    ("error", "expected"),
    [(OSError(errno.ENOSPC, "No space left on device"), ResourceError), (KeyboardInterrupt(), KeyboardInterrupt)],
)
def test_interrupted_conversion_leaves_nothing(tiny_tree, tmp_path, monkeypatch, error, expected):
    """A full disk (exit 4) or Ctrl-C halfway through writing: no destination, no temporary folder left behind."""

    def save_half_and_fail(self, folder, **kwargs):
        (folder / "unet").mkdir()
        (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
        raise error

    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", save_half_and_fail)
    with pytest.raises(expected):
        convert(tiny_tree, tmp_path / "converted")
    assert list(tmp_path.iterdir()) == []


def test_code_running_text_encoder_pickle_is_one_line(tiny_tree, tmp_path):
    """transformers would print its traceback and advise loading the file unsafely; we say what it is, once."""
    tree = tmp_path / "tree"
    for piece in ["stable-diffusion-v1-5/unet", "stable-diffusion-v1-5/tokenizer", "sd-vae-ft-mse", "MagicAnimate"]:
        (tree / piece).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(tiny_tree / piece, tree / piece, target_is_directory=True)
    text_encoder = tree / "stable-diffusion-v1-5" / "text_encoder"
    text_encoder.mkdir()
    (text_encoder / "config.json").write_text(
        (tiny_tree / "stable-diffusion-v1-5/text_encoder/config.json").read_text()
    )
    marker = tmp_path / "pwned"
    # Unpickling calls open(marker, "w"): code execution at load time.
    payload = f"""import torch
class Evil:
    def __reduce__(self):
        return (open, ({str(marker)!r}, "w"))
torch.save({{"text_model.embeddings.token_embedding.weight": Evil()}}, {str(text_encoder / "pytorch_model.bin")!r})
"""
    subprocess.run([sys.executable, "-c", payload], check=True)

    result = run_cli("convert", tree, tmp_path / "out")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 3 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "would run code" in lines[0] and "pytorch_model.bin" in lines[0], lines[0]
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr
    assert not marker.exists(), "the checkpoint ran code"
    assert not (tmp_path / "out").exists()
