"""Every setting of ``magicanimate train``, typed, in one table (the same :class:`~magicanimate.settings.Setting`
records as the animation settings, in a table of their own: training and animation share no keys).

From :data:`TRAIN_SETTINGS` come ``configs/train.yaml`` (:func:`render_train_yaml`; a test keeps the file equal to
it), the flags of ``magicanimate train`` (``max_steps`` -> ``--max-steps``) and the checks of
:func:`load_train_config`: defaults, then ``--config FILE``, then flags. The noise schedule and fusion keys are
there to be refused (:func:`check_fits_release`): training always continues from the release weights, which were
trained with epsilon prediction on the linear 0.00085-0.012 schedule and the reference fused into the mid and up
blocks; a config written for another trainer (v-prediction, a cosine schedule) must fail in one line, not train a
model that no longer matches its own weights.

Only the standard library, PyYAML and OmegaConf are imported here, so a bad flag is refused before torch loads.
"""

import argparse
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..errors import InputError
from ..settings import Setting, SettingError, add_setting_flags, read_config_file, render_yaml, settings_from_args

STAGES = ("1", "2", "lora")

S = Setting
TRAIN_SETTINGS: tuple[Setting, ...] = (
    # Run.
    S("stage", str, None, "what trains: 1 (appearance encoder + DensePose ControlNet on frame pairs, motion modules "
      "off), 2 (motion modules on clips), lora (LoRA on the attention of the appearance encoder and the video UNet)",
      "run", choices=STAGES, nullable=True),
    S("data", str, None, "folder written by `magicanimate prepare-data` (manifest.jsonl)", "run", nullable=True),
    S("pretrained", str, None, "the release weights tree to start from (stable-diffusion-v1-5/, sd-vae-ft-mse/, "
      "MagicAnimate/)", "run", nullable=True),
    S("output", str, None, "the run folder: checkpoints (checkpoint-STEP/), logs and validation videos", "run",
      nullable=True),
    S("resume", str, None, "continue from `latest` (the newest checkpoint of the run folder) or a checkpoint folder",
      "run", nullable=True),
    S("seed", int, 0, "seed of everything random (sample order, crops, timesteps, noise, LoRA init)", "run", low=0,
      high=2**31 - 1),
    S("device", str, "auto", "auto (CUDA when usable, else the CPU) or cpu; under accelerate launch/torchrun each "
      "process takes its local GPU", "run", choices=("auto", "cpu", "cuda")),
    # Data.
    S("resolution", int, 512, "side of the square training crops, in pixels (a multiple of 8; the release was "
      "trained at 512)", "data", low=64, high=2048),
    S("clip_frames", int, 16, "frames per clip of stage 2 and lora (the motion modules' window)", "data", low=1,
      high=24),
    S("clip_stride", int, 1, "take every n-th frame of a clip (25 fps data: 2 gives 12.5 fps clips)", "data", low=1,
      high=16),
    S("min_frame_gap", int, 30, "stage 1: reference and target frames at least this many frames apart (the farthest "
      "pair in shorter clips)", "data", low=0, high=100000),
    S("image_probability", float, 0.1, "stage 2 and lora: share of single-frame samples (image-video joint "
      "training)", "data", low=0, high=1),
    S("crop_scale", float, 0.8, "random crops: side drawn from [crop_scale, 1] of the clip's side (1: no crop)",
      "data", low=0.1, high=1),
    S("flip_probability", float, 0.5, "horizontal flips (image and DensePose together; left/right part labels "
      "swap)", "data", low=0, high=1),
    S("cached_latents", bool, False, "use the VAE latents prepare-data --cache-latents wrote instead of running the "
      "VAE encoder per sample; they are of the whole frame: needs crop_scale 1, flip_probability 0 and the clips' "
      "size as resolution", "data"),
    S("dataloader_workers", int, 2, "processes decoding samples (0: in the training process)", "data", low=0,
      high=64),
    # Loss and model.
    S("reference_drop", float, 0.1, "share of samples trained without the reference (the unconditional branch of "
      "guidance)", "loss", low=0, high=1),
    S("snr_gamma", float, None, "min-SNR loss weighting with this gamma (5 is usual; null: off)", "loss", above=0,
      high=1000, nullable=True),
    S("face_hand_weight", float, 1.0, "loss weight of face and hand pixels (DensePose parts 23, 24 and 3, 4; 1: "
      "off)", "loss", low=1, high=100),
    S("lora_rank", int, 16, "rank of the LoRA matrices", "loss", low=1, high=1024),
    S("lora_alpha", float, None, "LoRA alpha (null: the rank, i.e. scale 1)", "loss", above=0, high=100000,
      nullable=True),
    S("gradient_checkpointing", bool, True, "recompute activations in the backward pass: much less memory, about "
      "30% more time", "loss"),
    S("prediction_type", str, "epsilon", "what the UNet predicts; the release weights predict the noise, so only "
      "epsilon is accepted", "loss", choices=("epsilon", "v_prediction", "sample")),
    S("beta_schedule", str, "linear", "noise schedule; the release weights were trained on linear", "loss",
      choices=("linear", "scaled_linear", "squaredcos_cap_v2")),
    S("beta_start", float, 0.00085, "first beta of the schedule (the release: 0.00085)", "loss", above=0, high=1),
    S("beta_end", float, 0.012, "last beta of the schedule (the release: 0.012)", "loss", above=0, high=1),
    S("num_train_timesteps", int, 1000, "timesteps of the schedule (the release: 1000)", "loss", low=1,
      high=100000),
    S("fusion_blocks", str, "midup", "layers that attend to the reference; the release was trained with midup",
      "loss", choices=("midup", "full")),
    # Optimisation.
    S("max_steps", int, 2000, "optimizer steps of the run", "optimisation", low=1, high=100_000_000),
    S("batch_size", int, 1, "samples per optimizer step and process (run one at a time, their gradients summed)",
      "optimisation", low=1, high=4096),
    S("gradient_accumulation_steps", int, 1, "batches summed into one optimizer step", "optimisation", low=1,
      high=4096),
    S("learning_rate", float, None, "AdamW learning rate (null: 1e-5 for stages 1 and 2, 1e-4 for lora)",
      "optimisation", above=0, high=1, nullable=True),
    S("lr_scheduler", str, "constant", "learning-rate schedule (diffusers.optimization)", "optimisation",
      choices=("constant", "constant_with_warmup", "linear", "cosine")),
    S("lr_warmup_steps", int, 0, "steps of linear warm-up (constant_with_warmup, linear, cosine)", "optimisation",
      low=0, high=100_000_000),
    S("weight_decay", float, 0.01, "AdamW weight decay", "optimisation", low=0, high=1),
    S("optimizer", str, "adamw", "adamw (torch) or adamw_8bit (bitsandbytes, when installed: optimizer states in "
      "a quarter of the memory)", "optimisation", choices=("adamw", "adamw_8bit")),
    S("max_grad_norm", float, 1.0, "clip the gradient norm to this", "optimisation", above=0, high=1e6),
    S("mixed_precision", str, "auto", "auto (bf16 on GPUs that have it, else fp16; none on a CPU), no, fp16 or bf16; "
      "trained weights stay float32", "optimisation", choices=("auto", "no", "fp16", "bf16")),
    S("ema", bool, False, "keep an exponential moving average of the trained weights (export --ema writes it)",
      "optimisation"),
    S("ema_decay", float, 0.9999, "EMA decay per step", "optimisation", low=0, high=1),
    # Checkpoints and validation.
    S("checkpoint_every", int, 500, "write RUN/checkpoint-STEP/ every N steps (and at the last step)",
      "checkpoints", low=1, high=100_000_000),
    S("checkpoints_total_limit", int, 3, "keep only the newest N checkpoints (null: all)", "checkpoints", low=1,
      high=100000, nullable=True),
    S("validate_every", int, 500, "animate the held-out clip every N steps and log an mp4 and PSNR/SSIM against "
      "the ground truth (0: never)", "checkpoints", low=0, high=100_000_000),
    S("validation_steps", int, 25, "denoising steps of the validation animation", "checkpoints", low=1, high=1000),
    S("validation_frames", int, 16, "frames of the validation animation", "checkpoints", low=1, high=100000),
    S("report_to", str, None, "also log to this accelerate tracker (tensorboard, wandb; installed separately)",
      "checkpoints", choices=("tensorboard", "wandb"), nullable=True),
)  # fmt: skip
del S
TRAIN_BY_NAME: dict[str, Setting] = {setting.name: setting for setting in TRAIN_SETTINGS}
DEFAULT_LEARNING_RATE = {"1": 1e-5, "2": 1e-5, "lora": 1e-4}

# What the release weights were trained with; training continues from them, so these cannot change.
RELEASE_TRAINING = {
    "prediction_type": "epsilon",
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "fusion_blocks": "midup",
}

GROUP_TITLES = {
    "run": "Run.",
    "data": "Data: sampling and augmentation.",
    "loss": "Loss and model. The schedule and fusion keys must keep the release's values (they are checked).",
    "optimisation": "Optimisation.",
    "checkpoints": "Checkpoints, validation and logging.",
}
YAML_HEADER = (
    "# Settings of `magicanimate train`. Every key is also a flag (underscores become dashes: max_steps ->\n"
    "# --max-steps); flags win over this file (--config FILE), which wins over these defaults. Defaults fit one 24 GB\n"
    "# GPU at 512x512 for stage 2 and lora (see docs/training.md). Generated from magicanimate/training/config.py.\n"
)


def _checked(setting: Setting, value):
    if setting.name == "stage" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # `stage: 1` in YAML is an integer
    return setting.check(value)


def load_train_config(path: str | Path | Mapping | None = None, **overrides) -> DictConfig:
    """Validated training settings: the defaults, then the YAML file (or mapping) ``path``, then ``overrides``
    (``None`` values are ignored). ``learning_rate`` null becomes the stage's default.

    Raises:
        SettingError: a value is out of range, of the wrong type, not a choice, or does not fit the release weights.
        InputError: the file is missing or malformed, or a key is unknown.
    """
    layer = dict(path) if isinstance(path, Mapping) else read_config_file(path) if path is not None else {}
    layers = [layer, {k: v for k, v in overrides.items() if v is not None}]
    for values in layers:
        unknown = sorted(str(k) for k in set(values) - set(TRAIN_BY_NAME))
        if unknown:
            raise InputError(
                f"unknown training setting(s) {', '.join(unknown)}; the names are those of configs/train.yaml"
            )
    merged = {setting.name: setting.default for setting in TRAIN_SETTINGS}
    for values in layers:
        merged.update(values)
    checked = {name: _checked(TRAIN_BY_NAME[name], value) for name, value in merged.items()}
    if checked["resolution"] % 8:
        raise SettingError(
            "resolution", f"setting resolution must be a multiple of 8 (the VAE's factor), got {checked['resolution']}"
        )
    check_cached_latents(checked)
    if checked["learning_rate"] is None and checked["stage"] is not None:
        checked["learning_rate"] = DEFAULT_LEARNING_RATE[checked["stage"]]
    check_fits_release(checked)
    return OmegaConf.create(checked)


def check_fits_release(config: Mapping) -> None:
    """Refuse, in one line, a schedule or fusion that differs from the release's: the weights would be trained
    towards another objective than the one they were trained on, and animate (which samples with the release's
    schedule) would not match them any more."""
    for key, value in RELEASE_TRAINING.items():
        if config[key] != value:
            raise SettingError(
                key,
                f"setting {key} {config[key]!r} does not fit the release weights, which were trained with {key} "
                f"{value!r}; training continues from them, so keep {value!r}",
            )


def check_cached_latents(config: Mapping) -> None:
    """Refuse, in one line, augmentations that cached latents cannot follow: they are the VAE latents of the whole,
    unflipped frame (the clips' size is checked against the data, see :class:`~.dataset.TrainingData`)."""
    if not config["cached_latents"]:
        return
    for name, needed, wrong in (
        ("crop_scale", 1, config["crop_scale"] < 1),
        ("flip_probability", 0, config["flip_probability"] > 0),
    ):
        if wrong:
            raise SettingError(
                name,
                f"setting cached_latents needs {name} {needed} (cached latents are of the whole, unflipped frame), "
                f"got {name} {config[name]}; pass --crop-scale 1 --flip-probability 0, or --no-cached-latents",
            )


def require(config: Mapping, *names: str) -> None:
    """Refuse a run that lacks one of the settings ``names`` (``stage``, ``data``, ...), naming its flag."""
    for name in names:
        if config[name] is None:
            flag = "-o/--output" if name == "output" else TRAIN_BY_NAME[name].flag
            raise SettingError(name, f"setting {name} is needed: pass {flag} (or {name}: in --config)")


def add_train_flags(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per training setting (``--max-steps N``), defaulting to ``None`` (not given) so that only what the
    user typed overrides the config file."""
    add_setting_flags(parser, skip=skip, table=TRAIN_SETTINGS)


def train_settings_from_args(args: argparse.Namespace) -> dict:
    """The training settings a parsed command line gave (flags left out are not in the result)."""
    return settings_from_args(args, TRAIN_BY_NAME)


def render_train_yaml() -> str:
    """``configs/train.yaml`` as :data:`TRAIN_SETTINGS` define it: every key at its default, its help as a comment."""
    return render_yaml(TRAIN_SETTINGS, YAML_HEADER, GROUP_TITLES)


def write_train_yaml(path: str | Path | None = None) -> Path:
    """Regenerate ``configs/train.yaml`` (of this checkout, by default) after editing :data:`TRAIN_SETTINGS`."""
    path = Path(path) if path is not None else Path(__file__).resolve().parents[2] / "configs" / "train.yaml"
    path.write_text(render_train_yaml(), encoding="utf-8")
    return path
