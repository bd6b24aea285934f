"""magicanimate: animate a reference photo with a DensePose motion sequence (MagicAnimate on diffusers).

The model classes are imported on first use, so the command line answers bad input at once instead of after
importing torch and diffusers.
"""

import importlib

from .errors import CheckpointError, InputError, MagicAnimateError, ResourceError

__version__ = "0.1.0"

_LAZY = {
    "MagicAnimatePipeline": "magicanimate.pipelines",
    "MagicAnimatePipelineOutput": "magicanimate.pipelines",
    "VideoUNet": "magicanimate.models",
    "Video": "magicanimate.api",
    "animate": "magicanimate.api",
    "load_pipeline": "magicanimate.api",
}
__all__ = [
    "Video",
    "animate",
    "load_pipeline",
    "CheckpointError",
    "InputError",
    "MagicAnimateError",
    "MagicAnimatePipeline",
    "MagicAnimatePipelineOutput",
    "ResourceError",
    "VideoUNet",
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'magicanimate' has no attribute {name!r}")
