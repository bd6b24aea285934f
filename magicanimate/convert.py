"""``magicanimate convert SRC_TREE DST_DIR``: the original release tree -> one safetensors-only diffusers folder.

The release ships torch pickles (``temporal_attention.ckpt``, often ``.bin`` weights); the converted folder holds
only ``.safetensors`` files, loads without unpickling anything and faster (``--pretrained DST_DIR``, or
``MagicAnimatePipeline.from_pretrained(DST_DIR)``). Only argparse is imported until the command runs.
"""

import argparse
import os
from pathlib import Path

from .errors import InputError


def add_parser(commands) -> argparse.ArgumentParser:
    """Register ``convert`` on the ``magicanimate`` subcommands."""
    parser = commands.add_parser(
        "convert",
        help="convert the original pretrained tree into a safetensors-only folder",
        description=__doc__.splitlines()[0].split(": ", 1)[1],
    )
    parser.add_argument("src", metavar="SRC_TREE", help="original tree (stable-diffusion-v1-5/, sd-vae-ft-mse/, ...)")
    parser.add_argument("dst", metavar="DST_DIR", help="folder to write (model_index.json + safetensors)")
    parser.add_argument("--motion-only", action="store_true", help="take only the motion modules from the ckpt")
    parser.add_argument("--overwrite", action="store_true", help="replace DST_DIR if it exists")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.set_defaults(run=_run_and_report)
    return parser


def _run_and_report(args) -> int:
    print(f"wrote {convert(args.src, args.dst, motion_only=args.motion_only, overwrite=args.overwrite)}")
    return 0


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, motion_only: bool = False, overwrite: bool = False):
    """Load ``src`` with :meth:`MagicAnimatePipeline.from_pretrained` and save it to ``dst`` as safetensors only.

    ``dst`` is checked before anything loads and appears only when complete (written under a temporary name next to
    it, then renamed), so an interrupted conversion leaves nothing that looks like a usable folder.

    Raises:
        InputError: ``src`` is not a folder; ``dst`` exists (without ``overwrite``), cannot be written, or is
            ``src``, inside it or around it. CheckpointError: ``src`` is unusable. ResourceError: the disk is full.
    """
    from .io.output import atomic_output, check_output

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise InputError(f"checkpoint tree not found: {src}; pass the folder that holds stable-diffusion-v1-5/")
    if dst.resolve().is_relative_to(src.resolve()):
        raise InputError(f"DST_DIR {dst} is inside the source tree {src}; choose a folder outside it")
    check_output(dst, inputs=[src], overwrite=overwrite, suffixes=None, folder_ok=True)
    from .loading import quiet_loading
    from .pipelines import MagicAnimatePipeline

    with quiet_loading():
        pipe = MagicAnimatePipeline.from_pretrained(src, motion_only=motion_only)
    with atomic_output(dst, folder=True) as temp:
        pipe.save_pretrained(temp, safe_serialization=True)
    return dst
