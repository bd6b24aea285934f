"""``compile``: the video UNet and the ControlNet under ``torch.compile``, on the CPU.

A graph break splits a compiled model into pieces run one after the other from Python (and, on a GPU, usually a
device sync): the denoising step's two calls must each trace as one graph. ``torch._dynamo.explain`` checks the
calls exactly as the pipeline makes them, from inside a real run (reference-attention processors installed, the
reference bank loaded, the conditional rows set, a mixed guided batch, so every branch of the processors runs).

The compiled result must match eager within float32 rounding. Inductor's first compile of the tiny UNet on a CPU
takes minutes (measured: ~400 s on a loaded 2-core machine, then a max deviation of 6.2e-6 from eager), so the
default run compiles with ``aot_eager`` (the same Dynamo graphs, functionalised by AOTAutograd, run by eager
kernels); ``MAGICANIMATE_TEST_INDUCTOR=1`` adds the Inductor run.
"""

import os

import numpy as np
import pytest
import torch
from conftest import assert_frames_close, load_tiny_pipeline, tiny_latents

from magicanimate.loading import compile_models


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def test_a_denoising_step_compiles_without_graph_breaks(tiny_pipe, reference_image, motion16, fresh_dynamo):
    reports = {}

    def explain_first_call(name, model):
        def hook(module, args, kwargs):
            if name not in reports:  # explain() calls the model again: only the pipeline's own first call
                reports[name] = None
                reports[name] = torch._dynamo.explain(model)(*args, **kwargs)

        return model.register_forward_pre_hook(hook, with_kwargs=True)

    conditional = []
    readers = list(tiny_pipe.reference_control.readers.values())
    hooks = [
        tiny_pipe.unet.register_forward_pre_hook(lambda m, args: conditional.append(readers[0].conditional)),
        explain_first_call("unet", tiny_pipe.unet),
        explain_first_call("controlnet", tiny_pipe.controlnet),
    ]
    try:
        tiny_pipe(reference_image, motion16, num_inference_steps=1, latents=tiny_latents(16))
    finally:
        for hook in hooks:
            hook.remove()
    assert conditional[0] == (False, True) and readers[0].reference is None  # a guided call; cleared after the run
    for name, report in reports.items():
        reasons = [f"{b.reason} at {b.user_stack[-1] if b.user_stack else '?'}" for b in report.break_reasons]
        assert report.graph_break_count == 0, f"{name}: " + "\n".join(reasons)
        assert report.graph_count == 1, name
    assert set(reports) == {"unet", "controlnet"}


BACKENDS = ["aot_eager"]
if os.environ.get("MAGICANIMATE_TEST_INDUCTOR") == "1":
    BACKENDS.append("inductor")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_models_match_eager(tiny_tree, reference_image, motion16, fresh_dynamo, backend):
    pipe = load_tiny_pipeline(tiny_tree)  # compiling replaces components: not the shared pipeline
    run = lambda: pipe(reference_image, motion16, num_inference_steps=2, latents=tiny_latents(16)).frames  # noqa: E731
    eager = run()
    compile_models(pipe, backend=backend)
    compiled = run()
    stats = torch._dynamo.utils.counters
    print(f"{backend}: max deviation from eager {np.abs(compiled - eager).max():.2e}")
    assert stats["stats"]["unique_graphs"] >= 2 and not stats["graph_break"]  # the UNet and the ControlNet
    assert_frames_close(compiled, eager)
    assert type(pipe.unet).__name__ == type(pipe.controlnet).__name__ == "OptimizedModule"
