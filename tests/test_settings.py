"""The typed settings schema: one table from which the YAML defaults, the flags, validation, the API keywords and the
pipeline arguments come."""

import argparse
import inspect
import math
from pathlib import Path

import pytest
import yaml

from magicanimate.settings import (
    BY_NAME,
    PRESETS,
    SETTINGS,
    SettingError,
    add_setting_flags,
    default_config,
    frame_size,
    load_config,
    pipeline_arguments,
    render_yaml,
    settings_from_args,
)

ROOT = Path(__file__).resolve().parents[1]
NUMERIC = [s for s in SETTINGS if s.kind in (int, float)]


def test_packaged_yaml_is_generated_from_the_schema():
    text = (ROOT / "configs" / "animation.yaml").read_text(encoding="utf-8")
    stale = "configs/animation.yaml is stale: python -c 'import magicanimate.settings as s; s.write_yaml()'"
    assert text == render_yaml(), stale
    assert yaml.safe_load(text) == {s.name: s.default for s in SETTINGS}
    assert dict(default_config()) == dict(load_config())


def test_original_defaults():
    config = load_config()
    original = {"seed": 1, "steps": 25, "guidance_scale": 7.5, "size": 512, "context_frames": 16,
                "context_overlap": 4, "fusion_blocks": "midup", "eta": 0.0,
                "controlnet_conditioning_scale": 1.0}  # fmt: skip
    assert {key: config[key] for key in original} == original


def _parser():
    parser = argparse.ArgumentParser()
    add_setting_flags(parser)
    return parser


def test_every_setting_is_a_flag_with_help_and_allowed_values():
    parser = _parser()
    text = parser.format_help()
    for setting in SETTINGS:
        assert setting.flag in text
        action = parser._option_string_actions[setting.flag]
        assert setting.help.split()[0] in action.help
        if setting.choices:
            assert all(choice in text for choice in setting.choices)
    assert settings_from_args(parser.parse_args([])) == {}
    args = parser.parse_args(["--cfg-parallel", "--steps", "3", "--no-check-motion", "--fps", "null"])
    assert settings_from_args(args) == {"cfg_parallel": True, "steps": 3, "check_motion": False}


def _yaml_scalar(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return ".nan"
    if isinstance(value, float) and math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    return yaml.safe_dump(value).removesuffix("\n...\n").strip()


@pytest.mark.parametrize("setting", NUMERIC, ids=lambda s: s.name)
def test_numbers_out_of_range_are_refused_everywhere(setting, tmp_path):
    bad = [math.nan, math.inf, -math.inf, 2**64 + 1, -(2**64)]
    if setting.kind is int:
        bad.append(1.5)
    if setting.low is not None:
        bad.append(setting.low - 1)
    if setting.above is not None:
        bad += [setting.above, setting.above - 5]
    if setting.high is not None:
        bad.append(setting.high + 1)
    bad += ["7", True]
    parser = _parser()
    for value in bad:
        with pytest.raises(SettingError) as caught:
            load_config(**{setting.name: value})
        assert caught.value.key == setting.name and setting.name in str(caught.value)
        config_file = tmp_path / "bad.yaml"
        config_file.write_text(f"{setting.name}: {_yaml_scalar(value)}\n")
        with pytest.raises(SettingError):
            load_config(config_file)
        if not isinstance(value, (bool, str)):  # on the command line "7" is simply 7
            with pytest.raises(SystemExit):
                parser.parse_args([setting.flag, str(value)])
    good = setting.default if setting.default is not None else (setting.low if setting.low is not None else 1)
    assert load_config(**{setting.name: good})[setting.name] == good


def test_choices_and_cross_checks():
    with pytest.raises(SettingError, match="fusion_blocks must be one of midup, full"):
        load_config(fusion_blocks="bogus")
    with pytest.raises(SettingError, match="context_overlap"):
        load_config(context_frames=8, context_overlap=8)
    assert load_config(device="cuda:1").device == "cuda:1"
    with pytest.raises(SettingError):
        load_config(device="gpu")
    with pytest.raises(Exception, match="unknown setting"):
        load_config(stpes=3)


def test_config_file_errors_are_one_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: 3\nsize: [1, 2\n")
    with pytest.raises(Exception, match=r"line \d+, column \d+"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- steps\n- 3\n")
    with pytest.raises(Exception, match="must be a mapping"):
        load_config(listed)
    with pytest.raises(Exception, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_preset_sits_under_explicit_settings(tmp_path):
    assert {k: load_config(preset="preview")[k] for k in PRESETS["preview"]} == PRESETS["preview"]
    assert load_config(preset="preview", size=128).size == 128
    config_file = tmp_path / "c.yaml"
    config_file.write_text("preset: preview\nsteps: 4\n")
    config = load_config(config_file)
    assert (config.steps, config.size) == (4, PRESETS["preview"]["size"])


def test_pipeline_arguments_are_pipeline_parameters():
    from magicanimate import MagicAnimatePipeline

    parameters = inspect.signature(MagicAnimatePipeline.__call__).parameters
    arguments = pipeline_arguments(load_config())
    assert arguments and set(arguments) <= set(parameters)
    assert arguments["num_inference_steps"] == BY_NAME["steps"].default


def test_frame_size_rounds_to_multiples_of_8():
    assert frame_size(512, 512, None) == (512, 512)
    assert frame_size(720, 1280, 512) == (512, 912)
    assert frame_size(100, 100, 100) == (96, 96)  # the nearest multiple of 8 (ties to even)
    assert frame_size(3, 3, None) == (8, 8)
