"""Speed, memory and work of the MagicAnimate pipeline at real model sizes (random weights).

    python benchmarks/bench_pipeline.py --device cuda --mode parity --frames 16 32 64
    python benchmarks/bench_pipeline.py --device cuda --mode fast --frames 64 256 1024
    python benchmarks/bench_pipeline.py --flops-only --mode fast --frames 64      # no GPU needed (meta device)
    python benchmarks/bench_pipeline.py --device cpu --reduced --frames 16 32     # CPU proxy, same topology

Settings are the performance anchor's (shared/docs/performance-anchor.md): 512x512, 25 DDIM steps, guidance 7.5,
16-frame windows overlapping by 4, fp16 on CUDA. ``parity`` runs the original's schedule (wrap-around windows, one
window per UNet call); ``fast`` adds every lever that trades exactness for speed (non-wrapping windows with
weighted fusion, several windows per UNet call, channels_last, optionally ``--compile``). Levers that keep parity
(appearance encoder at batch 1, reference keys/values projected once per step, no reference work on unconditional
rows, ControlNet streamed in chunks, batched decode) are on in both modes.
"""

import argparse
import json
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from magicanimate.loading import apply_speed_settings
from magicanimate.models import VideoUNet, magicanimate_motion_adapter
from magicanimate.pipelines import MagicAnimatePipeline, context_windows, magicanimate_scheduler
from magicanimate.settings import load_config

SD15_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
}
SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "norm_num_groups": 32,
}
CLIP_L14 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
MODES = {
    "parity": {"context_schedule": "uniform", "context_batch_size": 1},
    "fast": {"context_schedule": "sliding", "context_batch_size": 4},
}


def sizes(reduced: bool) -> dict:
    """Model configs and resolution: SD 1.5 sizes, or the same topology narrowed for a CPU proxy."""
    if not reduced:
        return {"unet": SD15_UNET, "vae": SD_VAE, "clip": CLIP_L14, "controlnet_embed": (16, 32, 96, 256), "px": 512}
    unet = {**SD15_UNET, "block_out_channels": (32, 64, 128, 128), "cross_attention_dim": 64}
    vae = {**SD_VAE, "block_out_channels": (32, 32, 64, 64)}
    clip = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    return {"unet": unet, "vae": vae, "clip": clip, "controlnet_embed": (16, 16, 32, 32), "px": 128}


def offline_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer needing no download (only the empty prompt is ever encoded)."""
    chars = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 256) if c != 173]
    chars += [chr(256 + n) for n in range(256 - len(chars))]
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    folder = Path(tempfile.mkdtemp())
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77
    )


def refill_zero_layers(model: torch.nn.Module) -> None:
    """Give layers that diffusers initialises to zero (ControlNet zero convs, motion proj_out, ...) random weights,
    so no component is a no-op in the measurement."""
    for param in model.parameters():
        if not param.is_meta and param.ndim > 1 and not param.any():
            torch.nn.init.normal_(param, std=param[0].numel() ** -0.5)


def build_pipeline(reduced: bool, device: str = "cpu", dtype=torch.float32) -> MagicAnimatePipeline:
    cfg = sizes(reduced)
    with torch.device(device):
        unet2d = UNet2DConditionModel(**cfg["unet"])
        unet = VideoUNet.from_unet2d(unet2d, magicanimate_motion_adapter(cfg["unet"]["block_out_channels"]))
        controlnet = ControlNetModel(
            **{k: v for k, v in cfg["unet"].items() if k not in ("out_channels", "up_block_types")},
            conditioning_embedding_out_channels=cfg["controlnet_embed"],
        )
        text_config = CLIPTextConfig(
            vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", **cfg["clip"]
        )
        pipe = MagicAnimatePipeline(
            vae=AutoencoderKL(**cfg["vae"]),
            text_encoder=CLIPTextModel(text_config),
            tokenizer=offline_tokenizer(),
            unet=unet,
            appearance_encoder=unet2d,
            controlnet=controlnet,
            scheduler=magicanimate_scheduler(),
        )
    for model in (pipe.unet, pipe.controlnet, pipe.appearance_encoder, pipe.vae):
        refill_zero_layers(model)
    if device != "meta":
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                torch.nn.Module.to(component, dtype=dtype)
    return pipe


def inputs(frames: int, px: int):
    """A DensePose-like motion (viridis part colours on the purple background) and a reference image."""
    rng = np.random.default_rng(0)
    motion = np.empty((frames, px, px, 3), np.uint8)
    motion[:] = (68, 1, 84)
    for f in range(frames):
        x = int(px * (0.3 + 0.2 * np.sin(f / 8)))
        motion[f, px // 4 : 3 * px // 4, x : x + px // 4] = (33, 144, 141)
    reference = rng.integers(0, 255, (px, px, 3), dtype=np.uint8)
    return reference, motion


@contextmanager
def call_counter(pipe):
    """Count forward calls of each network."""
    counts = {"unet": 0, "appearance_encoder": 0, "controlnet": 0, "vae_decode": 0}
    hooks = [
        getattr(pipe, name).register_forward_pre_hook(lambda *_, n=name: counts.__setitem__(n, counts[n] + 1))
        for name in ("unet", "appearance_encoder", "controlnet")
    ]
    hooks.append(
        pipe.vae.decoder.register_forward_pre_hook(
            lambda *_: counts.__setitem__("vae_decode", counts["vae_decode"] + 1)
        )
    )
    try:
        yield counts
    finally:
        for hook in hooks:
            hook.remove()


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_run(pipe, frames, mode, steps, device, count_flops=False):
    """One pipeline call: wall / denoise / decode seconds, peak memory, calls per network, and optionally FLOPs."""
    reference, motion = inputs(frames, sizes(args.reduced)["px"])
    decode_time = [0.0]
    decode = pipe.decode_latents

    def timed_decode(*args, **kwargs):
        synchronize(device)
        start = time.perf_counter()
        out = decode(*args, **kwargs)
        synchronize(device)
        decode_time[0] += time.perf_counter() - start
        return out

    pipe.decode_latents = timed_decode
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    flops = FlopCounterMode(display=False) if count_flops else None
    with call_counter(pipe) as counts:
        synchronize(device)
        start = time.perf_counter()
        with flops or torch.no_grad():
            pipe(
                reference,
                motion,
                num_inference_steps=steps,
                generator=torch.Generator(device).manual_seed(0),
                **MODES[mode],
            )
        synchronize(device)
        wall = time.perf_counter() - start
    del pipe.decode_latents
    cuda = device.startswith("cuda")
    return {
        "frames": frames,
        "mode": mode,
        "device": device,
        "wall_s": wall,
        "s_per_frame": wall / frames,
        "denoise_s": wall - decode_time[0],
        "decode_s": decode_time[0],
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "calls": dict(counts),
        "tflop": flops.get_total_flops() / 1e12 if flops else None,
    }


def count_flops_meta(frames: int, mode: str, steps: int, reduced: bool) -> dict:
    """Work of a whole call at full size, without running it: each network call is counted once on the meta device
    (FlopCounterMode needs shapes only) and multiplied by how often the pipeline makes it."""
    pipe = build_pipeline(reduced, device="meta")
    px = sizes(reduced)["px"]
    h = px // 8
    padded = -(-frames // 16) * 16
    windows = context_windows(padded, 16, 4, MODES[mode]["context_schedule"])
    per_call = MODES[mode]["context_batch_size"]
    call_sizes = [min(per_call, len(windows) - first) for first in range(0, len(windows), per_call)]

    def flops(fn):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        return counter.get_total_flops() / 1e12

    with torch.device("meta"):
        text = torch.empty(1, 77, pipe.text_encoder.config.hidden_size)
        latent = torch.empty(1, 4, h, h)
        work = {"text_encoder": flops(lambda: pipe.text_encoder(torch.zeros(1, 77, dtype=torch.long)))}
        work["vae_encode"] = flops(lambda: pipe.vae.encode(torch.empty(1, 3, px, px)))
        work["appearance_encoder"] = steps * flops(lambda: pipe.encode_appearance(latent, 1, text))
        down, mid = pipe.controlnet(
            torch.empty(16, 4, h, h), 1, text.expand(16, -1, -1), torch.empty(16, 3, px, px), return_dict=False
        )
        work["controlnet"] = (
            steps
            * (padded // 16)
            * flops(
                lambda: pipe.controlnet(
                    torch.empty(16, 4, h, h), 1, text.expand(16, -1, -1), torch.empty(16, 3, px, px)
                )
            )
        )

        def unet_call(windows_in_call, first):
            rows = 2 * windows_in_call
            if first:  # the first call of a step also projects the reference keys/values
                pipe.reference_control.load_reference()
            pipe.reference_control.set_conditional(torch.arange(rows, device="cpu") >= windows_in_call)
            residuals = [r.repeat(rows, 1, 1, 1) for r in (*down, mid)]
            return flops(
                lambda: pipe.unet(
                    torch.empty(rows, 4, 16, h, h),
                    1,
                    text.expand(rows * 16, -1, -1),
                    down_block_additional_residuals=residuals[:-1],
                    mid_block_additional_residual=residuals[-1],
                )
            )

        pipe.encode_appearance(latent, 1, text)
        first = unet_call(call_sizes[0], True)
        others = {size: unet_call(size, False) for size in set(call_sizes[1:])}
        work["unet"] = steps * (first + sum(others[size] for size in call_sizes[1:]))
        work["vae_decode"] = frames * flops(lambda: pipe.vae.decode(torch.empty(1, 4, h, h)))
    return {
        "frames": frames,
        "mode": mode,
        "tflop": sum(work.values()),
        "tflop_by_network": work,
        "calls": {"unet": steps * len(call_sizes), "controlnet": steps * (padded // 16), "appearance_encoder": steps},
    }


def main():
    global args
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mode", choices=sorted(MODES), default="parity")
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reduced", action="store_true", help="narrow widths and 128 px (a CPU proxy)")
    parser.add_argument("--flops-only", action="store_true", help="count work at full size on the meta device")
    parser.add_argument("--flops", action="store_true", help="also count FLOPs of the timed run (slower)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the video UNet (fast mode)")
    parser.add_argument("--motion-attention", choices=("sdpa", "bmm"), default="sdpa", help="motion-module attention")
    parser.add_argument("--json", action="store_true", help="one JSON object per line and run")
    args = parser.parse_args()

    if args.flops_only:
        rows = [count_flops_meta(n, args.mode, args.steps, args.reduced) for n in args.frames]
    else:
        dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
        pipe = build_pipeline(args.reduced, args.device, dtype).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        apply_speed_settings(pipe, load_config(motion_attention=args.motion_attention))
        if args.mode == "fast":
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.controlnet.to(memory_format=torch.channels_last)
            if args.compile:
                pipe.unet = torch.compile(pipe.unet)
        timed_run(pipe, 16, args.mode, min(args.steps, 2), args.device)  # warm-up
        rows = []
        for n in args.frames:
            runs = [
                timed_run(pipe, n, args.mode, args.steps, args.device, args.flops and i == 0)
                for i in range(args.repeats)
            ]
            row = {**runs[0], **{k: statistics.median(r[k] for r in runs) for k in ("wall_s", "denoise_s", "decode_s")}}
            row.update(s_per_frame=row["wall_s"] / n, runs_s=[round(r["wall_s"], 3) for r in runs])
            row["tflop_per_s"] = row["tflop"] / row["wall_s"] if row["tflop"] else None
            rows.append(row)
    for row in rows:
        row.setdefault("wall_s", None)
        row.setdefault("s_per_frame", None)
        row.setdefault("peak_alloc_gib", None)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    columns = [
        "frames",
        "mode",
        "wall_s",
        "s_per_frame",
        "denoise_s",
        "decode_s",
        "peak_alloc_gib",
        "peak_reserved_gib",
        "tflop",
        "tflop_per_s",
        "calls",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [row.get(c) for c in columns]
        print(
            "| "
            + " | ".join(f"{c:.3f}" if isinstance(c, float) else "-" if c is None else str(c) for c in cells)
            + " |"
        )


if __name__ == "__main__":
    main()
