"""The denoising algorithm: the MagicAnimate pipeline and its sliding-window schedules."""

from .context_windows import CONTEXT_SCHEDULES, FUSION_WEIGHTS, context_windows, register_context_schedule
from .pipeline_magicanimate import MagicAnimatePipeline, MagicAnimatePipelineOutput, magicanimate_scheduler

__all__ = [
    "CONTEXT_SCHEDULES",
    "FUSION_WEIGHTS",
    "MagicAnimatePipeline",
    "MagicAnimatePipelineOutput",
    "context_windows",
    "magicanimate_scheduler",
    "register_context_schedule",
]
