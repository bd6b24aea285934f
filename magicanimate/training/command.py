"""``magicanimate train --stage 1|2|lora --data DATA/ --pretrained TREE -o RUN/ [--config train.yaml]``.

Only argparse and the settings table are imported here, so registering the subcommand costs nothing and a bad flag
is refused before torch loads. Several GPUs or machines: launch the same command with ``accelerate launch -m
magicanimate.cli train ...`` or ``torchrun --nproc_per_node=N -m magicanimate.cli train ...``.
"""

import argparse

from .config import TRAIN_BY_NAME, add_train_flags, load_train_config, train_settings_from_args

DESCRIPTION = (
    "Train or fine-tune MagicAnimate on a folder from `magicanimate prepare-data`, starting from the release weights. "
    "--stage 1: the appearance encoder and the DensePose ControlNet on frame pairs; --stage 2: the motion modules on "
    "clips; --stage lora: a per-character LoRA. Checkpoints go to RUN/checkpoint-STEP/ (--resume latest continues); "
    "`magicanimate export` turns one into weights that `animate` uses. Settings: the defaults (configs/train.yaml), "
    "then --config, then flags."
)


def add_parser(commands) -> argparse.ArgumentParser:
    """Register ``train`` on the ``magicanimate`` subcommands."""
    parser = commands.add_parser(
        "train", help="train or fine-tune (stage 1, stage 2, or a LoRA)", description=DESCRIPTION
    )
    parser.add_argument("-o", "--output", dest="output", default=None, help=TRAIN_BY_NAME["output"].help)
    parser.add_argument("--config", default=None, help="YAML file of training settings (keys as in configs/train.yaml)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    add_train_flags(parser, skip=("output",))
    parser.set_defaults(run=run)
    return parser


def run(args) -> int:
    from .trainer import train

    config = load_train_config(args.config, **train_settings_from_args(args))
    last = train(config)
    if last is not None:
        print(f"last checkpoint: {last}")
    return 0
