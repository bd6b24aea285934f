"""Every setting of ``magicanimate``, typed, in one table: the single source of names, types, ranges, choices,
defaults and help.

From :data:`SETTINGS` come the packaged ``configs/animation.yaml`` (:func:`render_yaml`; a test keeps the file
equal to it), the command-line flags (:func:`add_setting_flags`, ``context_overlap`` -> ``--context-overlap``), the
Python API's keywords (``magicanimate.animate(..., steps=10)``), batch manifests and the demo, validation
(:func:`load_config`) and the pipeline's call arguments (:func:`pipeline_arguments`). Defaults are the original
MagicAnimate's (its ``configs/prompts/animation.yaml`` and pipeline defaults).

Only the standard library and OmegaConf are imported here, so bad settings are refused before torch loads.
"""

import argparse
import math
import re
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from .errors import InputError


class SettingError(InputError):
    """A setting has a value it cannot take. ``key`` names the setting, so a front end can add its own spelling of
    it (the CLI appends the flag)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Setting:
    """One setting. ``kind`` is ``bool``, ``int``, ``float`` or ``str``; numbers lie in ``[low, high]`` (``above``:
    strictly greater); ``None`` is allowed when ``nullable``. ``scope`` says where it acts: ``"load"`` settings shape
    the loaded pipeline (one value per batch or demo server), ``"call"`` settings one animation."""

    name: str
    kind: type
    default: object
    help: str
    group: str
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    above: float | None = None
    nullable: bool = False
    scope: str = "call"
    argument: str | None = None  # the MagicAnimatePipeline.__call__ argument this setting feeds

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def allowed(self) -> str:
        """The allowed values in words, for help texts and errors."""
        if self.kind is bool:
            return "true or false"
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind is str:
            return "a path" if self.group == "checkpoints" else "text"
        noun = "an integer" if self.kind is int else "a number"
        show = (lambda x: str(int(x))) if self.kind is int else (lambda x: f"{x:g}")
        if self.above is not None:
            bounds = f"above {show(self.above)}"
            if self.high is not None:
                bounds += f" and at most {show(self.high)}"
        elif self.low is not None and self.high is not None:
            bounds = f"from {show(self.low)} to {show(self.high)}"
        elif self.low is not None:
            bounds = f"of at least {show(self.low)}"
        else:
            bounds = ""
        return f"{noun} {bounds}".strip()

    def check(self, value):
        """``value`` as this setting's type, or :class:`SettingError` saying what is allowed."""
        if value is None:
            if self.nullable:
                return None
            raise SettingError(self.name, f"setting {self.name} must be {self.allowed()}, got null")
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise SettingError(self.name, f"setting {self.name} must be true or false, got {value!r}")
        if self.kind is str:
            if not isinstance(value, str) or (not value and not self.nullable):
                raise SettingError(self.name, f"setting {self.name} must be {self.allowed()}, got {value!r}")
            if self.choices and value not in self.choices and not _matches_device(self, value):
                raise SettingError(self.name, f"setting {self.name} must be {self.allowed()}, got {value!r}")
            return value
        return self._check_number(value)

    def _check_number(self, value):
        wrong = SettingError(self.name, f"setting {self.name} must be {self.allowed()}, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        if isinstance(value, float) and not math.isfinite(value):
            raise wrong
        if self.kind is int:
            if isinstance(value, float):
                if not value.is_integer():
                    raise wrong
                value = int(value)
        else:
            value = float(value)
        too_low = (self.low is not None and value < self.low) or (self.above is not None and value <= self.above)
        if too_low or (self.high is not None and value > self.high):
            raise wrong
        return value


def _matches_device(setting: Setting, value: str) -> bool:
    """``device`` also takes an indexed device (``cuda:1``)."""
    return setting.name == "device" and re.fullmatch(r"(cuda|xpu|npu):\d+", value) is not None


S = Setting
SETTINGS: tuple[Setting, ...] = (
    # Checkpoints.
    S("pretrained", str, None, "root of the weights tree (null: $MAGICANIMATE_PRETRAINED or "
      "~/.cache/magicanimate/pretrained, fetched on first use when online)", "checkpoints", nullable=True,
      scope="load"),
    S("pretrained_model_path", str, None, "stable-diffusion-v1-5 folder (unet, text_encoder, tokenizer)",
      "checkpoints", nullable=True, scope="load"),
    S("pretrained_vae_path", str, None, "sd-vae-ft-mse folder", "checkpoints", nullable=True, scope="load"),
    S("pretrained_appearance_encoder_path", str, None, "MagicAnimate/appearance_encoder folder", "checkpoints",
      nullable=True, scope="load"),
    S("pretrained_controlnet_path", str, None, "MagicAnimate/densepose_controlnet folder", "checkpoints",
      nullable=True, scope="load"),
    S("motion_module", str, None, "MagicAnimate/temporal_attention/temporal_attention.ckpt file", "checkpoints",
      nullable=True, scope="load"),
    S("motion_only", bool, False, "take only the motion modules from motion_module (keeps the base UNet's spatial "
      "weights)", "checkpoints", scope="load"),
    S("fusion_blocks", str, "midup", "layers that attend to the reference: midup (10 layers, the original's) or "
      "full (16)", "checkpoints", choices=("midup", "full"), scope="load"),
    S("lora", str, None, "a LoRA .safetensors from `magicanimate train --stage lora` (export) applied to the "
      "appearance encoder and the video UNet", "checkpoints", nullable=True, scope="load"),
    S("lora_scale", float, 1.0, "strength of the LoRA", "checkpoints", low=0, high=4, scope="load"),
    # Sampling.
    S("preset", str, None, "a named set of settings under your own: preview (256 px, 10 steps: a quick look, even "
      "on a CPU); fast (under a quarter of the original's work: DPM-Solver++ in 10 steps, guidance on the first "
      "40%, non-wrapping windows, 4 per UNet call)", "sampling", choices=("preview", "fast"), nullable=True),
    S("seed", int, 1, "random seed of the initial noise", "sampling", low=0, high=2**64 - 1),
    S("steps", int, 25, "denoising steps", "sampling", low=1, high=1000, argument="num_inference_steps"),
    S("guidance_scale", float, 7.5, "reference guidance strength (1 or less: no guidance, half the work)",
      "sampling", low=0, high=100, argument="guidance_scale"),
    S("size", int, 512, "output side for a square motion; other aspect ratios keep theirs with the shorter side "
      "= size (sides are rounded to multiples of 8)", "sampling", low=8, high=4096, nullable=True),
    S("max_frames", int, None, "use only the first N motion frames", "sampling", low=1, high=10_000_000,
      nullable=True),
    S("check_motion", bool, True, "refuse motion that is not a DensePose rendering (a raw video belongs in "
      "driving)", "sampling"),
    S("context_frames", int, 16, "frames per window (the motion modules' training length)", "sampling", low=1,
      high=256, argument="context_frames"),
    S("context_overlap", int, 4, "frames shared by neighbouring windows (less than context_frames)", "sampling",
      low=0, high=255, argument="context_overlap"),
    S("context_schedule", str, "uniform", "uniform: the original's wrap-around windows; sliding: no wrap-around, "
      "weighted seams", "sampling", choices=("uniform", "sliding"), argument="context_schedule"),
    S("context_batch_size", int, 1, "windows per UNet call (more: faster on a large GPU, same result)",
      "sampling", low=1, high=1024, argument="context_batch_size"),
    S("controlnet_conditioning_scale", float, 1.0, "strength of the DensePose ControlNet", "sampling", low=0,
      high=10, argument="controlnet_conditioning_scale"),
    S("eta", float, 0.0, "DDIM eta (0: deterministic)", "sampling", low=0, high=1, argument="eta"),
    S("scheduler", str, "ddim", "sampler: ddim (the original's), dpmpp_2m, unipc or euler, all on the original's "
      "beta schedule (the last three reach a similar result in fewer steps)", "sampling",
      choices=("ddim", "dpmpp_2m", "unipc", "euler")),
    S("guidance_start", float, 0.0, "classifier-free guidance only from this fraction of the steps on (0: from the "
      "first)", "sampling", low=0, high=1, argument="guidance_start"),
    S("guidance_end", float, 1.0, "... up to this fraction (1: to the last); steps outside run the conditional "
      "branch alone, about half the work", "sampling", low=0, high=1, argument="guidance_end"),
    S("cache_interval", int, 1, "feature reuse across steps (DeepCache-style): the whole video UNet every N steps, "
      "between them only its outer blocks on the deep features cached per window and guidance branch (1: off)",
      "sampling", low=1, high=50, argument="cache_interval"),
    S("noise_prior", float, 0.0, "latent noise prior: move the initial noise towards the reference image's latent "
      "(steadier layout and background over long clips; 0: off, the original's noise)", "sampling", low=0, high=1,
      argument="noise_prior"),
    S("keyframe_blend", str, "linear", "with reference_end or keyframes: how each frame's weight moves from the "
      "earlier keyframe's estimate to the later one's (linear, or smooth: eased at both keyframes)", "sampling",
      choices=("linear", "smooth"), argument="keyframe_blend"),
    # Stages.
    S("prompt", str, None, "generate the reference photo from this text with SD 1.5 (instead of a reference "
      "photo); it is saved next to the output as NAME.reference.png", "stages", nullable=True),
    S("negative_prompt", str, None, "what the generated reference photo should not show", "stages", nullable=True),
    S("prompt_steps", int, 30, "denoising steps of the reference photo from a prompt", "stages", low=1, high=1000),
    S("prompt_guidance", float, 7.5, "text guidance of the reference photo from a prompt", "stages", low=0,
      high=100),
    S("prompt_model", str, None, "another SD 1.5 fine-tune (diffusers folder) for the prompt stage (null: the "
      "release tree's stable-diffusion-v1-5)", "stages", nullable=True, scope="load"),
    S("refine_size", int, None, "second pass at this size (shorter side, multiple of 8): the first pass upscaled, "
      "noised part-way and denoised again (null: no refine pass)", "stages", low=64, high=4096, nullable=True),
    S("refine_strength", float, 0.4, "how far the refine pass re-noises the upscaled video (0: keep it, 1: from "
      "pure noise)", "stages", low=0, high=1),
    S("refine_steps", int, None, "denoising steps of the full schedule the refine pass runs a part of (null: steps)",
      "stages", low=1, high=1000, nullable=True),
    S("frame_stride", int, 1, "animate every k-th motion frame (and the last) and interpolate the frames between: k "
      "times fewer animated frames, so fewer 16-frame windows (64 frames at 2: 4 windows instead of 6; 1: every "
      "frame)", "stages", low=1, high=8),
    S("interpolator", str, "flow", "how frame_stride fills the frames between: flow (built-in optical flow, "
      "OpenCV), an entry point of the magicanimate.interpolators group, or a dotted path module:object", "stages"),
    # Output.
    S("fps", float, None, "frames per second of the result (null: the motion video's)", "output", above=0,
      high=1000, nullable=True),
    S("grid", bool, False, "write reference | motion | result side by side", "output"),
    S("crf", int, 18, "H.264 quality, 0-51 (lower: better and larger)", "output", low=0, high=51),
    # Execution.
    S("device", str, "auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps", "execution",
      choices=("auto", "cpu", "cuda", "mps"), scope="load"),
    S("dtype", str, "auto", "weights' precision (auto: float16 on cuda, float32 on cpu)", "execution",
      choices=("auto", "float16", "bfloat16", "float32"), scope="load"),
    S("channels_last", bool, False, "NHWC memory layout for the UNet and ControlNet (often faster on GPUs)",
      "execution", scope="load"),
    S("motion_attention", str, "sdpa", "motion-module attention: sdpa (fused kernels) or bmm (two batched "
      "matmuls, the original's)", "execution", choices=("sdpa", "bmm"), scope="load"),
    S("compile", bool, False, "torch.compile the video UNet and the ControlNet (a GPU speed-up; slow first call)",
      "execution", scope="load"),
    S("compile_mode", str, "default", "torch.compile mode: default, max-autotune, or reduce-overhead (CUDA graphs)",
      "execution", choices=("default", "max-autotune", "reduce-overhead"), scope="load"),
    S("share_down_path", bool, True, "run the video UNet's down blocks once for both guidance branches where they "
      "see the same input (fusion_blocks midup, one prompt): same result up to rounding, less work", "execution",
      argument="share_down_path"),
    S("decode_chunk_size", int, 4, "frames per VAE decode call (sets the call's peak memory: fewer use less)",
      "execution", low=1, high=4096, argument="decode_chunk_size"),
    S("low_vram", bool, False, "least accelerator memory, slower: the models wait on the CPU until they run (model "
      "offload), one frame per VAE decode call, one window per UNet call; nothing changes on a CPU", "execution",
      scope="load"),
    S("cfg_parallel", bool, False, "with several processes: the guidance branches on different ranks (needs an "
      "even number of processes)", "execution", argument="cfg_parallel"),
)  # fmt: skip
del S
BY_NAME: dict[str, Setting] = {setting.name: setting for setting in SETTINGS}
# The single checkpoint pieces (the original config's key names) that replace parts of the `pretrained` tree.
PIECE_KEYS = tuple(
    s.name
    for s in SETTINGS
    if s.group == "checkpoints" and s.kind is str and not s.choices and s.name not in ("pretrained", "lora")
)
LOAD_KEYS = tuple(s.name for s in SETTINGS if s.scope == "load")

# Named presets: values applied under the user's own settings (a flag or a config key still wins).
PRESETS: dict[str, dict] = {
    "preview": {"size": 256, "steps": 10},
    # Quality-trading levers together (README, Performance): a better solver in fewer steps, guidance only while the
    # layout forms, windows that do not wrap around (one fewer at 64 frames) and batched windows (same output).
    "fast": {
        "scheduler": "dpmpp_2m",
        "steps": 10,
        "guidance_end": 0.4,
        "context_schedule": "sliding",
        "context_batch_size": 4,
    },
}

GROUP_TITLES = {
    "checkpoints": "Checkpoints. `pretrained` is the release tree (see pretrained/README.md in the repository); the "
    "next five (the original's key names) replace single pieces of it.",
    "sampling": "Sampling.",
    "stages": "Stages around the animation (each off by default): a reference photo from a prompt, a refine pass at "
    "a larger size, and frame interpolation.",
    "output": "Output.",
    "execution": "Execution.",
}
YAML_HEADER = (
    "# Settings of `magicanimate animate`, `magicanimate batch`, the demo and `magicanimate.animate()`. Every key is\n"
    "# also a command-line flag (underscores become dashes: context_overlap -> --context-overlap). Defaults are the\n"
    "# original MagicAnimate's (configs/prompts/animation.yaml and the pipeline defaults of magic-research/\n"
    "# magic-animate). Generated from magicanimate/settings.py, which also holds each setting's allowed values.\n"
)


# ---------------------------------------------------------------------------------------------------- config


def default_config() -> DictConfig:
    """Every setting at its default, as read from the packaged ``configs/animation.yaml``."""
    return OmegaConf.create((files("magicanimate.configs") / "animation.yaml").read_text(encoding="utf-8"))


def read_config_file(path: str | Path) -> dict:
    """The settings of a YAML file, as a plain mapping; one-line errors for a missing, unreadable, malformed or
    non-mapping file (with the line of a syntax error)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"config file {path} is a folder; pass a .yaml file") from None
    except PermissionError:
        raise InputError(f"config file {path} cannot be read: permission denied") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"config file {path} cannot be read: {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InputError(f"config file {path} is not valid YAML: {yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"config file {path} must be a mapping of settings (key: value), got {type(data).__name__}")
    return data


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error as one line with its position (``line 3, column 7: ...``)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def load_config(path: str | Path | Mapping | None = None, **overrides) -> DictConfig:
    """Validated settings: the defaults, then the named ``preset``, then the YAML file (or mapping) ``path``, then
    ``overrides`` (``None`` values are ignored). Unknown keys and values a setting cannot take are errors, so a
    typo never silently falls back to a default.

    Raises:
        SettingError: a value is out of range, of the wrong type or not a choice (``err.key`` names it).
        InputError: the file is missing or malformed, or a key is unknown.
    """
    if isinstance(path, Mapping):
        layer = dict(path)
    else:
        layer = read_config_file(path) if path is not None else {}
    layers = [layer, {k: v for k, v in overrides.items() if v is not None}]
    for values in layers:
        unknown = sorted(str(k) for k in set(values) - set(BY_NAME))
        if unknown:
            raise InputError(f"unknown setting(s) {', '.join(unknown)}; the names are those of configs/animation.yaml")
    merged = {setting.name: setting.default for setting in SETTINGS}
    for values in layers:
        merged.update(values)
    preset = BY_NAME["preset"].check(merged["preset"])
    if preset is not None:
        merged = {s.name: s.default for s in SETTINGS} | PRESETS[preset]
        for values in layers:
            merged.update(values)
    checked = {name: BY_NAME[name].check(value) for name, value in merged.items()}
    if checked["guidance_start"] > checked["guidance_end"]:
        raise SettingError(
            "guidance_start",
            f"setting guidance_start ({checked['guidance_start']:g}) must not be above guidance_end "
            f"({checked['guidance_end']:g})",
        )
    if checked["context_overlap"] >= checked["context_frames"]:
        raise SettingError(
            "context_overlap",
            f"setting context_overlap ({checked['context_overlap']}) must be smaller than context_frames "
            f"({checked['context_frames']})",
        )
    return OmegaConf.create(checked)


def pipeline_arguments(config: Mapping) -> dict:
    """The ``MagicAnimatePipeline.__call__`` keyword arguments that come straight from settings."""
    return {s.argument: config[s.name] for s in SETTINGS if s.argument is not None}


def frame_size(height: int, width: int, size: int | None) -> tuple[int, int]:
    """The output ``(height, width)`` for motion frames of ``height x width`` under the ``size`` setting: the shorter
    side becomes ``size`` (``None``: the motion's own size), both rounded to multiples of 8 (the VAE's factor)."""
    if size is None:
        return max(8, height // 8 * 8), max(8, width // 8 * 8)
    scale = size / min(height, width)
    return max(8, round(height * scale / 8) * 8), max(8, round(width * scale / 8) * 8)


# ---------------------------------------------------------------------------------------------------- front ends


def add_setting_flags(
    parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = (), table: tuple[Setting, ...] = SETTINGS
) -> None:
    """One flag per setting of ``table`` (default: :data:`SETTINGS`), named after it, with its help, allowed values
    and default. Flags default to ``None`` (not given), so only what the user typed overrides the config file."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for setting in table:
        if setting.name in skip or setting.flag in parser._option_string_actions:
            continue  # a command may give a setting its own flag (e.g. ``--pretrained`` with a command-specific help)
        if setting.group not in groups:
            groups[setting.group] = parser.add_argument_group(f"{setting.group} settings")
        group = groups[setting.group]
        default = "null" if setting.default is None else setting.default
        if setting.kind is bool:
            text = f"{setting.help} (default: {'on' if setting.default else 'off'})"
            group.add_argument(
                setting.flag,
                dest=setting.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=text.replace("%", "%%"),
            )
            continue
        text = f"{setting.help}; {setting.allowed()} (default: {default})"
        group.add_argument(
            setting.flag,
            dest=setting.name,
            type=_flag_parser(setting),
            default=None,
            metavar=_metavar(setting),
            help=text.replace("%", "%%"),
        )


def _metavar(setting: Setting) -> str:
    if setting.choices:
        return "{" + ",".join(setting.choices) + "}"
    return "PATH" if setting.kind is str else {int: "N", float: "X"}[setting.kind]


def _flag_parser(setting: Setting):
    """Turn a flag's text into a value of the setting's type, with the setting's own error message."""

    def parse(text: str):
        if setting.nullable and text.strip().lower() in ("null", "none"):
            return None
        if setting.kind is str:
            value = text
        else:
            try:
                value = int(text) if setting.kind is int else float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be {setting.allowed()}, got {text!r}") from None
        try:
            return setting.check(value)
        except SettingError as err:
            raise argparse.ArgumentTypeError(f"must be {setting.allowed()}, got {text!r}") from err

    parse.__name__ = setting.kind.__name__
    return parse


def settings_from_args(args: argparse.Namespace, names: Mapping | None = None) -> dict:
    """The settings (of ``names``, default: :data:`BY_NAME`) a parsed command line gave (flags left out are not in
    the result)."""
    names = BY_NAME if names is None else names
    return {name: value for name, value in vars(args).items() if name in names and value is not None}


# ---------------------------------------------------------------------------------------------------- the YAML


def render_yaml(
    table: tuple[Setting, ...] = SETTINGS, header: str = YAML_HEADER, titles: Mapping = GROUP_TITLES
) -> str:
    """``configs/animation.yaml`` as :data:`SETTINGS` define it (or another ``table`` with its ``header`` and group
    ``titles``): every key at its default, its help as a comment."""
    lines = [header]
    group = None
    for setting in table:
        if setting.group != group:
            group = setting.group
            lines.append("\n" + "".join(f"# {line}\n" for line in textwrap.wrap(titles[group], 116)))
        value = yaml.safe_dump(setting.default, default_flow_style=True).removesuffix("\n...\n").strip()
        lines.extend(f"# {line}\n" for line in textwrap.wrap(f"{setting.help} ({setting.allowed()})", 116))
        lines.append(f"{setting.name}: {value}\n")
    return "".join(lines)


def write_yaml(path: str | Path | None = None) -> Path:
    """Regenerate ``configs/animation.yaml`` (of this checkout, by default) after editing :data:`SETTINGS`."""
    path = Path(path) if path is not None else Path(__file__).resolve().parents[1] / "configs" / "animation.yaml"
    path.write_text(render_yaml(), encoding="utf-8")
    return path
