"""The samplers of the ``scheduler`` setting: diffusers' own schedulers, all on the original's noise schedule.

MagicAnimate's UNet (AnimateDiff v1) was trained with linear betas 0.00085-0.012 over 1000 steps, predicting the
noise; the original samples it with DDIM on "leading" timesteps (offset 1: 961, 921, ..., 1 for 25 steps). Every
scheduler here takes that noise schedule from :func:`magicanimate_scheduler`, so the models see the noise levels they
were trained on. ``ddim`` is the original's sampler exactly. ``dpmpp_2m`` (DPM-Solver++ 2M), ``unipc`` (UniPC, 2nd
order) and ``euler`` are for fewer steps, a quality trade (how much is for real weights to show), and use "trailing"
timesteps: the first step starts at the last training timestep (999), where the initial noise belongs, whatever
the step count; with "leading" ones a 10-step run would start at 901 and treat pure noise as partly denoised (Lin
et al. 2024, "Common diffusion noise schedules and sample steps are flawed"). On the same timesteps Euler would be
DDIM (eta 0) again: both are the first-order step of the same ODE.

The pipeline honours what these schedulers need: it multiplies the initial noise by ``init_noise_sigma`` (1 for
DDIM, DPM-Solver and UniPC; about 25 for Euler) and passes every UNet and ControlNet input through
``scale_model_input``; the multistep solvers keep their history between ``step`` calls, reset by ``set_timesteps``
at the start of every call.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..errors import InputError
from .pipeline_magicanimate import magicanimate_scheduler

# The parts of the original's scheduler config that define the noise levels and what the model predicts.
ORIGINAL_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
)
FEW_STEP_SPACING = "trailing"  # timesteps of the few-step solvers (see above)


def original_schedule() -> dict:
    """The noise schedule of the original's DDIM sampler, as scheduler keyword arguments."""
    config = magicanimate_scheduler().config
    return {key: config[key] for key in ORIGINAL_SCHEDULE_KEYS}


SCHEDULERS: dict[str, Callable[[], SchedulerMixin]] = {
    "ddim": magicanimate_scheduler,
    "dpmpp_2m": lambda: DPMSolverMultistepScheduler(
        **original_schedule(), algorithm_type="dpmsolver++", solver_order=2, timestep_spacing=FEW_STEP_SPACING
    ),
    "unipc": lambda: UniPCMultistepScheduler(**original_schedule(), solver_order=2, timestep_spacing=FEW_STEP_SPACING),
    "euler": lambda: EulerDiscreteScheduler(**original_schedule(), timestep_spacing=FEW_STEP_SPACING),
}


def make_scheduler(name: str) -> SchedulerMixin:
    """A new scheduler of the registry :data:`SCHEDULERS` (``ddim``, ``dpmpp_2m``, ``unipc`` or ``euler``)."""
    if name not in SCHEDULERS:
        raise InputError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    return SCHEDULERS[name]()


@contextmanager
def scheduler_for_call(pipe, name: str) -> Iterator[SchedulerMixin]:
    """Within the block ``pipe.scheduler`` is a new ``name`` scheduler; afterwards the pipeline's own one is back.

    Batch jobs and the demo animate with one loaded pipeline, each call with its own settings: a call's scheduler
    must not stay behind for the next caller. (Calls on one pipeline never overlap: it keeps per-call state.)
    """
    own = pipe.scheduler
    pipe.scheduler = make_scheduler(name)
    try:
        yield pipe.scheduler
    finally:
        pipe.scheduler = own
