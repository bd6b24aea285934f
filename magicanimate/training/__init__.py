"""Training and fine-tuning MagicAnimate, continuing from the release weights (see docs/training.md).

The commands: ``magicanimate prepare-data`` (:mod:`.prepare`: raw videos -> clips with their DensePose and a
manifest, :mod:`.manifest`), ``magicanimate train`` (:mod:`.command`, :mod:`.trainer`: stage 1, stage 2 or a
per-character LoRA) and ``magicanimate export`` (:mod:`.export`: a checkpoint -> a release-layout tree or a LoRA
file, :mod:`.lora`). The pieces: the settings table (:mod:`.config`, ``configs/train.yaml``), the samples
(:mod:`.dataset`, :mod:`.augment`), the loss of one sample computed by the pipeline's own forward pieces
(:mod:`.model`), checkpoints (:mod:`.checkpoints`), validation (:mod:`.validation`) and scene cuts
(:mod:`.scenes`). The command modules import only argparse and the settings table, so registering them costs nothing.
"""
