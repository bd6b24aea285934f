"""magicanimate: animate a reference photo with a DensePose motion sequence (MagicAnimate on diffusers)."""

__version__ = "0.1.0"

from .errors import CheckpointError, InputError, MagicAnimateError, ResourceError
from .models import VideoUNet
from .pipelines import MagicAnimatePipeline, MagicAnimatePipelineOutput
