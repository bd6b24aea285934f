"""The denoising algorithm: the MagicAnimate pipeline and its sliding-window schedule."""

from .context_windows import context_windows
from .pipeline_magicanimate import MagicAnimatePipeline, MagicAnimatePipelineOutput, magicanimate_scheduler

__all__ = ["MagicAnimatePipeline", "MagicAnimatePipelineOutput", "context_windows", "magicanimate_scheduler"]
