"""``magicanimate.animate`` and ``load_pipeline``: what a Python user gets, on the tiny models."""

import logging
import warnings

import numpy as np
import pytest
import torch
from conftest import load_tiny_pipeline

from magicanimate import animate, load_pipeline
from magicanimate.errors import InputError
from magicanimate.loading import apply_speed_settings
from magicanimate.settings import SettingError, load_config


def test_settings_are_checked_before_any_model_loads(reference_image, motion16, tmp_path):
    nowhere = str(tmp_path / "no-weights-here")  # loading from it would fail with a CheckpointError
    with pytest.raises(SettingError, match="steps"):
        animate(reference_image, motion16, pretrained=nowhere, steps=0)
    with pytest.raises(InputError, match="unknown setting"):
        animate(reference_image, motion16, pretrained=nowhere, stpes=3)
    with pytest.raises(InputError, match="exactly one of motion"):
        animate(reference_image, pretrained=nowhere)
    with pytest.raises(InputError, match="exactly one of motion"):
        animate(reference_image, motion16, driving=tmp_path / "walk.mp4", pretrained=nowhere)
    with pytest.raises(InputError, match="align_to_reference"):
        animate(reference_image, motion16, align_to_reference=True, pretrained=nowhere)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_cuda_without_cuda_is_one_clear_error(reference_image, motion16, tmp_path):
    with pytest.raises(InputError, match="no usable CUDA"):
        animate(reference_image, motion16, pretrained=str(tmp_path), device="cuda")
    with pytest.raises(InputError, match="no usable CUDA"):
        load_pipeline(pretrained=str(tmp_path), device="cuda:0")


def test_the_plan_is_told_before_the_work(tiny_pipe, reference_image, motion16, caplog):
    frames = np.concatenate([motion16, motion16[:4]])  # 20 frames: padded to 32, 3 uniform windows
    with caplog.at_level(logging.INFO, logger="magicanimate"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        video = animate(reference_image, frames, pipeline=tiny_pipe, steps=1, size=60, check_motion=False)
    plan = [r.getMessage() for r in caplog.records if r.getMessage().startswith("animating")]
    assert plan and "20 frames at 64x64" in plan[0] and "3 window(s)" in plan[0] and "1 steps" in plan[0]
    assert "roughly" in plan[0]
    assert any("size 60 is not a multiple of 8" in str(w.message) and "64x64" in str(w.message) for w in caught)
    assert video.frames.shape == (20, 64, 64, 3)


def test_preview_preset_applies_under_explicit_settings(tiny_pipe, reference_image, motion16):
    steps = []
    preview = load_config(preset="preview")
    video = animate(reference_image, motion16[:8], pipeline=tiny_pipe, preset="preview", steps=1,
                    progress=lambda step, total: steps.append(total), check_motion=False)  # fmt: skip
    assert video.frames.shape == (8, preview.size, preview.size, 3) and steps == [1]


def test_compile_on_a_cpu_warns_once(tiny_tree):
    pipe = load_tiny_pipeline(tiny_tree)
    with pytest.warns(UserWarning, match="compile on a CPU"):
        apply_speed_settings(pipe, load_config(compile=True))
    assert pipe.unet.__class__.__name__ == "OptimizedModule"


def test_a_driving_video_is_turned_into_densepose_first(tiny_pipe, reference_image, tmp_path):
    from test_densepose import save_stand_in, walking_video

    from magicanimate.densepose import looks_like_densepose

    model = save_stand_in(tmp_path / "stand_in.torchscript")
    walk = walking_video(tmp_path / "walk.mp4", frames=30, fps=30.0)
    video = animate(reference_image, driving=walk, densepose_model=model, pipeline=tiny_pipe, steps=1, size=64,
                    max_frames=12, device="cpu")  # fmt: skip
    assert video.motion.shape == (12, 64, 64, 3) and looks_like_densepose(video.motion)
    assert video.frames.shape == (12, 64, 64, 3) and video.fps == 25.0
    with pytest.raises(InputError, match="not a DensePose video"):
        animate(reference_image, walk, pipeline=tiny_pipe, steps=1, size=64)  # a raw video given as motion
