"""Fast tests of magicanimate.weights: hub file selection, tree checks, and clean failures without a network."""

import errno
import os
import time
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants as hub_constants

from magicanimate import weights
from magicanimate.errors import CheckpointError, ResourceError
from magicanimate.weights import (
    HUB_SOURCES,
    PIECES,
    default_pretrained_dir,
    download_weights,
    ensure_weights,
    incomplete_tree_error,
    missing_weights,
    select_files,
)

SD15_FILES = [
    ".gitattributes",
    "README.md",
    "model_index.json",
    "v1-5-pruned-emaonly.safetensors",
    "v1-5-pruned.ckpt",
    "feature_extractor/preprocessor_config.json",
    "scheduler/scheduler_config.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.bin",
]
VAE_FILES = [
    ".gitattributes",
    "README.md",
    "config.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.safetensors",
]
MA_FILES = [
    ".gitattributes",
    "README.md",
    "appearance_encoder/config.json",
    "appearance_encoder/diffusion_pytorch_model.safetensors",
    "densepose_controlnet/config.json",
    "densepose_controlnet/diffusion_pytorch_model.safetensors",
    "temporal_attention/temporal_attention.ckpt",
]

ALL_PIECES = [
    "stable-diffusion-v1-5/unet",
    "stable-diffusion-v1-5/text_encoder",
    "stable-diffusion-v1-5/tokenizer",
    "sd-vae-ft-mse",
    "MagicAnimate/appearance_encoder",
    "MagicAnimate/densepose_controlnet",
    "MagicAnimate/temporal_attention",
]


def test_select_files_sd15_takes_only_safetensors_unet_text_encoder_and_tokenizer():
    assert sorted(select_files("stable-diffusion-v1-5", SD15_FILES)) == [
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]


def test_select_files_vae_and_magicanimate():
    assert sorted(select_files("sd-vae-ft-mse", VAE_FILES)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert sorted(select_files("MagicAnimate", MA_FILES)) == sorted(MA_FILES[2:])


def test_select_files_accepts_repo_ids_and_rejects_unknown():
    assert select_files("stabilityai/sd-vae-ft-mse", VAE_FILES) == select_files("sd-vae-ft-mse", VAE_FILES)
    assert select_files("zcxu-eric/MagicAnimate", MA_FILES) == select_files("MagicAnimate", MA_FILES)
    with pytest.raises(KeyError):
        select_files("runwayml/stable-diffusion-v1-5", SD15_FILES)
    assert {s.repo_id for s in HUB_SOURCES.values()} == {
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "stabilityai/sd-vae-ft-mse",
        "zcxu-eric/MagicAnimate",
    }


def test_default_pretrained_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MAGICANIMATE_PRETRAINED", str(tmp_path / "w"))
    assert default_pretrained_dir() == tmp_path / "w"
    monkeypatch.delenv("MAGICANIMATE_PRETRAINED")
    assert default_pretrained_dir() == Path.home() / ".cache" / "magicanimate" / "pretrained"


def test_missing_weights_empty_and_partial(tmp_path):
    assert missing_weights(tmp_path) == ALL_PIECES
    assert missing_weights(tmp_path / "does-not-exist") == ALL_PIECES
    unet = tmp_path / "stable-diffusion-v1-5" / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text("{}")
    assert missing_weights(tmp_path)[0] == (
        "stable-diffusion-v1-5/unet/diffusion_pytorch_model.safetensors|diffusion_pytorch_model.bin"
    )
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"x")  # .bin alone satisfies the piece
    assert missing_weights(tmp_path) == ALL_PIECES[1:]


def test_missing_weights_tiny_tree_is_complete(tiny_tree):
    assert (tiny_tree / "stable-diffusion-v1-5/unet/diffusion_pytorch_model.bin").is_file()  # .bin, as the release
    assert missing_weights(tiny_tree) == []
    assert ensure_weights(tiny_tree, download=False) == tiny_tree


def test_present_but_unusable_file_is_not_missing(tmp_path):
    """A folder, a broken link or an LFS pointer where a file belongs is there: the loaders name what is wrong with
    it (a download would not fix a folder in the way, and must not be suggested for a file that is present)."""
    unet = tmp_path / "stable-diffusion-v1-5" / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").mkdir()
    os.symlink(tmp_path / "gone", unet / "diffusion_pytorch_model.safetensors")
    assert missing_weights(tmp_path) == ALL_PIECES[1:]


def test_missing_weights_of_pieces_given_elsewhere(tiny_tree, tmp_path):
    assert PIECES == tuple(ALL_PIECES)
    vae = tmp_path / "my-vae"
    assert missing_weights(tiny_tree, {"sd-vae-ft-mse": vae}) == [str(vae)]
    vae.mkdir()
    (vae / "config.json").write_text("{}")
    assert missing_weights(tiny_tree, {"sd-vae-ft-mse": vae}) == [
        f"{vae}/diffusion_pytorch_model.safetensors|diffusion_pytorch_model.bin"
    ]
    assert missing_weights(tiny_tree, {"sd-vae-ft-mse": tiny_tree / "sd-vae-ft-mse"}) == []


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_incomplete_tree_error_says_what_to_do(mode, monkeypatch, tmp_path):
    offline = mode == "offline"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", offline)
    error = incomplete_tree_error(tmp_path, ["sd-vae-ft-mse", "MagicAnimate/temporal_attention"])
    message = str(error)
    assert isinstance(error, CheckpointError) and error.exit_code == 3 and "\n" not in message
    assert "sd-vae-ft-mse, MagicAnimate/temporal_attention" in message and str(tmp_path) in message
    assert f"magicanimate download --to {tmp_path}" in message and "stable-diffusion-v1-5/" in message  # the layout
    assert "pretrained/README.md" not in message and "while online" not in message
    assert ("offline mode is set" in message) == offline, message


@pytest.fixture
def offline(monkeypatch):
    """huggingface_hub 2.4 reads HF_HUB_OFFLINE once at import into constants.HF_HUB_OFFLINE: patch both."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def _assert_one_line(err, root):
    msg = str(err.value)
    assert "\n" not in msg and str(root) in msg and "download" in msg
    assert err.value.exit_code == 3


def test_ensure_weights_offline_fails_cleanly(offline, tmp_path):
    with pytest.raises(CheckpointError) as err:
        ensure_weights(tmp_path)
    _assert_one_line(err, tmp_path)
    assert "stable-diffusion-v1-5" in str(err.value) and "offline mode is set" in str(err.value)
    assert "while online" not in str(err.value) and "pretrained/README.md" not in str(err.value)
    with pytest.raises(CheckpointError) as err:
        ensure_weights(tmp_path, download=False)
    _assert_one_line(err, tmp_path)
    assert "missing: " + ", ".join(ALL_PIECES) in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_offline_detected_from_hub_constant_alone(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="offline"):
        download_weights(tmp_path)


def test_download_skips_complete_tree_without_network(offline, tiny_tree):
    assert download_weights(tiny_tree) == tiny_tree


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """Online mode, but the endpoint is a closed loopback port: connections are refused at once."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub_constants, "HF_HUB_ETAG_TIMEOUT", 2)
    monkeypatch.setattr(hub_constants, "HF_HUB_DOWNLOAD_TIMEOUT", 2)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # no stray refs from ~/.cache
    monkeypatch.setenv("HF_TOKEN", "")


def test_download_unreachable_endpoint_fails_fast(unreachable_hub, tmp_path):
    root = tmp_path / "pretrained"
    start = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        download_weights(root)
    assert time.monotonic() - start < 10
    _assert_one_line(err, root)
    assert "stable-diffusion-v1-5" in str(err.value)
    assert missing_weights(root) == ALL_PIECES
    weight_files = [p for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts]
    assert weight_files == []


def test_download_unreachable_with_partial_folder_is_not_claimed_complete(unreachable_hub, tmp_path):
    # snapshot_download returns an existing non-empty local_dir as-is when the hub is unreachable.
    root = tmp_path / "pretrained"
    (root / "stable-diffusion-v1-5" / "unet").mkdir(parents=True)
    (root / "stable-diffusion-v1-5" / "unet" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as err:
        ensure_weights(root)
    _assert_one_line(err, root)
    assert "stable-diffusion-v1-5" in str(err.value)
    assert missing_weights(root) != []


def test_disk_full_is_a_resource_error(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", full)
    with pytest.raises(ResourceError, match="disk full"):
        weights.download_weights(tmp_path)
