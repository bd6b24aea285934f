"""``low_vram`` and diffusers' CPU offload with this pipeline, as far as a CPU can show them.

What a CPU can show: the pipeline runs under accelerate's offload hooks (it asks for the execution device, never
``self.device``, and touches no weight outside a module's forward) with the same frames; ``low_vram`` on a CPU is a
no-op with one warning. What only a GPU can show (the memory saved) is measured by benchmarks/bench_pipeline.py.
"""

import warnings
from types import SimpleNamespace

import numpy as np
import torch
from conftest import load_tiny_pipeline, tiny_latents

from magicanimate.loading import LOW_VRAM_CALL, call_arguments, load_pipeline
from magicanimate.settings import load_config, pipeline_arguments


def _run(pipe, reference, motion):
    return pipe(reference, motion, num_inference_steps=2, latents=tiny_latents(len(motion))).frames


def test_model_cpu_offload_gives_the_same_frames(tiny_tree, reference_image, motion16):
    """diffusers needs an accelerator for it unless told the device: "cpu" runs the same hooks, moving nothing."""
    pipe = load_tiny_pipeline(tiny_tree)
    plain = _run(pipe, reference_image, motion16)
    pipe.enable_model_cpu_offload(device="cpu")
    assert len(pipe._all_hooks) == 5  # one per model of model_cpu_offload_seq
    for _ in range(2):  # the hooks are re-armed after each call (maybe_free_model_hooks)
        np.testing.assert_array_equal(_run(pipe, reference_image, motion16), plain)


def test_sequential_offload_hooks_give_the_same_frames(tiny_tree, reference_image, motion16):
    """Every weight lives on the meta device between uses and is brought in by its module's hook (what
    ``enable_sequential_cpu_offload`` installs; called here with the device "cpu", since diffusers' own method makes
    it "cpu:0", which accelerate cannot round-trip on a CPU even for a stock CLIP model). The reference-attention
    keys/values, computed outside the UNet's forward, go through the layers' own hooks too."""
    from accelerate import cpu_offload

    pipe = load_tiny_pipeline(tiny_tree)
    plain = _run(pipe, reference_image, motion16)
    for model in pipe.components.values():
        if isinstance(model, torch.nn.Module):
            cpu_offload(model, torch.device("cpu"), offload_buffers=len(model._parameters) > 0)
    assert pipe.unet.conv_in.weight.is_meta and pipe._execution_device == torch.device("cpu")
    np.testing.assert_array_equal(_run(pipe, reference_image, motion16), plain)


def test_low_vram_on_a_cpu_is_a_no_op_with_one_warning(tiny_tree, reference_image, motion16):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_pipeline(pretrained=str(tiny_tree), device="cpu", low_vram=True)
    messages = [str(w.message) for w in caught if "low_vram" in str(w.message)]
    assert len(messages) == 1 and "CPU" in messages[0]
    assert not getattr(pipe, "_all_hooks", None) and pipe.unet.device.type == "cpu"  # no offload hooks
    config = load_config(low_vram=True, decode_chunk_size=8, context_batch_size=3)
    assert call_arguments(config, pipe) == pipeline_arguments(config)


def test_low_vram_on_an_accelerator_takes_the_least_memory_call_settings():
    """Over the user's own values: one frame per decode call, one window per UNet call."""
    config = load_config(low_vram=True, decode_chunk_size=8, context_batch_size=3, steps=7)
    on_gpu = SimpleNamespace(_execution_device=torch.device("cuda", 0))
    arguments = call_arguments(config, on_gpu)
    assert arguments == {**pipeline_arguments(config), **LOW_VRAM_CALL}
    assert arguments["decode_chunk_size"] == 1 and arguments["context_batch_size"] == 1
    assert arguments["num_inference_steps"] == 7
    assert call_arguments(load_config(decode_chunk_size=8), on_gpu)["decode_chunk_size"] == 8  # off: untouched
