"""The latent noise prior (``noise_prior``): the initial noise's mean moves towards the reference image's latent,
``x = s * a * z + sqrt(1 - s^2 a^2) * noise`` with ``a = sqrt(alphas_cumprod[first timestep])``.

0 must be today's start exactly; 1 must be the reference latent noised to the first timestep (``q_sample``); the
initial latents' correlation with the reference latent must grow with the strength, in a real call.
"""

import numpy as np
import pytest
import torch
from conftest import load_tiny_pipeline, tiny_latents

from magicanimate.errors import InputError
from magicanimate.pipelines.schedulers import scheduler_for_call

STEPS = 4


def _run(pipe, reference, motion, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("latents", tiny_latents(len(motion), seed=2))
    return pipe(reference, motion, **kwargs).frames


def _initial_latents(pipe, reference, motion, **kwargs) -> torch.Tensor:
    """The latents the first UNet call of the run receives (DDIM's scale_model_input is the identity)."""
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()) if not seen else None)
    try:
        _run(pipe, reference, motion, **kwargs)
    finally:
        hook.remove()
    return seen[0][:1]  # (1, 4, frames, h, w): the first window's (unconditional) rows


def test_zero_is_the_original_start(tiny_pipe, reference_image, motion16):
    np.testing.assert_array_equal(
        _run(tiny_pipe, reference_image, motion16, noise_prior=0.0), _run(tiny_pipe, reference_image, motion16)
    )


@pytest.fixture(scope="module")
def unit_latent_pipe(tiny_tree, reference_image):
    """The tiny models with SD-like latent statistics: the random tiny VAE's latents have a std of ~0.04 where
    sd-vae-ft-mse's (times 0.18215) have ~1, which the prior assumes; its quant_conv's mean half is rescaled so."""
    pipe = load_tiny_pipeline(tiny_tree)
    with torch.no_grad():
        scale = 1 / float(pipe.encode_reference(np.asarray(reference_image)).std())
        pipe.vae.quant_conv.weight[:4] *= scale
        pipe.vae.quant_conv.bias[:4] *= scale
    return pipe


def test_correlation_with_the_reference_latent_grows_with_the_strength(unit_latent_pipe, reference_image, motion16):
    """Expected about ``s * a`` for unit-variance latents (``a = sqrt(alphas_cumprod[751]) = 0.149`` at 4 steps)."""
    pipe = unit_latent_pipe
    with torch.no_grad():
        reference = pipe.encode_reference(np.asarray(reference_image))
    correlations = []
    for strength in (0.0, 0.25, 0.5, 1.0):
        latents = _initial_latents(pipe, reference_image, motion16, noise_prior=strength)
        z = reference[:, :, None].expand_as(latents)
        correlations.append(float(torch.corrcoef(torch.stack([latents.flatten(), z.flatten()]))[0, 1]))
    print("correlation with the reference latent at strength 0, 0.25, 0.5, 1:", [f"{c:.3f}" for c in correlations])
    assert abs(correlations[0]) < 0.05
    assert correlations == sorted(correlations) and correlations[-1] > correlations[0] + 0.08


def test_full_strength_is_the_reference_noised_to_the_first_timestep(unit_latent_pipe, reference_image, motion16):
    """``noise_prior=1`` starts from ``scheduler.add_noise(z, noise, t0)`` (float32 rounding apart)."""
    pipe = unit_latent_pipe
    noise = tiny_latents(16, seed=2)
    latents = _initial_latents(pipe, reference_image, motion16, noise_prior=1.0, latents=noise)
    with torch.no_grad():
        z = pipe.encode_reference(np.asarray(reference_image))
    pipe.scheduler.set_timesteps(STEPS)
    t0 = pipe.scheduler.timesteps[:1]
    expected = pipe.scheduler.add_noise(z[:, :, None].expand_as(noise), noise, t0)
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-6)


def test_a_sigma_space_sampler_gets_a_scaled_start(tiny_pipe, reference_image, motion16):
    """Euler starts at sigma_max-scaled latents; the prior is scaled like the plain start, and the run stays finite."""
    with scheduler_for_call(tiny_pipe, "euler"):
        frames = _run(tiny_pipe, reference_image, motion16, noise_prior=0.5)
        plain = _run(tiny_pipe, reference_image, motion16)
    assert np.isfinite(frames).all() and not np.array_equal(frames, plain)


def test_out_of_range_strength_is_refused(tiny_pipe, reference_image, motion16):
    with pytest.raises(InputError, match="noise_prior must be a number from 0 to 1"):
        _run(tiny_pipe, reference_image, motion16, noise_prior=1.5)


def test_the_setting_reaches_the_pipeline(tiny_tree, tiny_pipe, reference_image, motion16):
    from magicanimate import animate

    common = dict(pipeline=tiny_pipe, steps=2, size=64)
    plain = animate(reference_image, motion16, **common).frames
    prior = animate(reference_image, motion16, noise_prior=0.8, **common).frames
    assert prior.shape == plain.shape and not np.array_equal(prior, plain)


def test_the_cli_flag_and_a_batch_key(tiny_tree, tmp_path):
    """``--noise-prior`` from the command line and ``noise_prior:`` in a manifest go through the settings schema."""
    from PIL import Image
    from test_cli import run_cli
    from tiny_models import make_motion, make_reference

    from magicanimate.batch import job_configs, read_manifest
    from magicanimate.io import write_video

    Image.fromarray(make_reference(64)).save(tmp_path / "ref.png")
    write_video(tmp_path / "motion.mp4", make_motion(8, 64), fps=25)
    result = run_cli("animate", "--reference", tmp_path / "ref.png", "--motion", tmp_path / "motion.mp4", "-o",
                     tmp_path / "out.mp4", "--pretrained", tiny_tree, "--steps", 1, "--size", 64,
                     "--context-frames", 8, "--noise-prior", 0.5)  # fmt: skip
    assert result.returncode == 0, result.stderr
    bad = run_cli("animate", "--reference", tmp_path / "ref.png", "--motion", tmp_path / "motion.mp4", "-o",
                  tmp_path / "bad.mp4", "--noise-prior", 2)  # fmt: skip
    assert bad.returncode == 2 and "--noise-prior" in bad.stderr and "Traceback" not in bad.stderr
    manifest = tmp_path / "jobs.yaml"
    manifest.write_text("jobs:\n  - {reference: ref.png, driving: motion.mp4, output: o.mp4, noise_prior: 0.25}\n")
    _, configs = job_configs(read_manifest(manifest))
    assert [config.noise_prior for config in configs.values()] == [0.25]
