"""Speed, memory and work of the MagicAnimate pipeline at real model sizes (random weights).

    python benchmarks/bench_pipeline.py --device cuda --mode parity --frames 16 32 64
    python benchmarks/bench_pipeline.py --device cuda --mode fast --frames 64 256 1024
    python benchmarks/bench_pipeline.py --flops-only --mode fast --frames 64      # no GPU needed (meta device)
    python benchmarks/bench_pipeline.py --flops-only --preset fast --frames 64    # a preset's call settings
    python benchmarks/bench_pipeline.py --device cpu --reduced --frames 16 32     # CPU proxy, same topology
    python benchmarks/bench_pipeline.py --flops-only --frames 64 --refine-size 768  # with the refine pass

Settings are the performance anchor's (shared/docs/performance-anchor.md): 512x512, 25 DDIM steps, guidance 7.5,
16-frame windows overlapping by 4, fp16 on CUDA. ``parity`` runs the original's schedule (wrap-around windows, one
window per UNet call); ``fast`` adds every lever that trades exactness for speed (non-wrapping windows with
weighted fusion, several windows per UNet call, channels_last, optionally ``--compile``). Levers that keep parity
(appearance encoder at batch 1, reference keys/values projected once per step, no reference work on unconditional
rows, ControlNet streamed in chunks, batched decode) are on in both modes.
"""

import argparse
import ctypes
import gc
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

from magicanimate.loading import apply_speed_settings, compile_models
from magicanimate.models import VideoUNet, magicanimate_motion_adapter
from magicanimate.models.shallow_controlnet import shallow_controlnet_residuals
from magicanimate.pipelines import MagicAnimatePipeline, context_windows, magicanimate_scheduler
from magicanimate.pipelines.feature_cache import FeatureCache
from magicanimate.pipelines.schedulers import scheduler_for_call
from magicanimate.settings import PRESETS, load_config, pipeline_arguments
from magicanimate.stages.refine import refine_steps_run, refine_video

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
args = None  # the command line's options, set by main()
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


class HostMemory:
    """Peak resident memory (RSS) of this process over a stretch of a run, above what it held at the start (Linux).

    :meth:`start` hands freed heap back to the system (glibc ``malloc_trim``), so memory freed by earlier runs
    neither hides growth nor counts as it, and resets the kernel's high-water mark (``/proc/self/clear_refs``);
    :meth:`phase` reads the mark (exact, not sampled: short peaks count) and resets it for the next phase. On other
    systems every figure is None.
    """

    def __init__(self):
        self.available = Path("/proc/self/clear_refs").exists()
        self.base_kib = None

    @staticmethod
    def _status_kib(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def _reset_peak(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")

    def start(self) -> None:
        if not self.available:
            return
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self._reset_peak()
        self.base_kib = self._status_kib("VmRSS")

    def phase(self) -> float | None:
        """MiB above the start at the highest point since the last call (or :meth:`start`)."""
        if not self.available:
            return None
        peak = self._status_kib("VmHWM")
        self._reset_peak()
        return (peak - self.base_kib) / 1024


def call_settings(mode: str, steps: int | None = None, preset: str | None = None) -> tuple[dict, str]:
    """``(pipeline call keywords, scheduler name)`` of a run: the defaults with ``mode``'s windows, or with ``preset``
    that preset's call settings instead (its steps, scheduler, guidance interval, windows); ``steps`` wins if given."""
    config = load_config(preset=preset) if preset is not None else load_config(**MODES[mode])
    call = pipeline_arguments(config)
    call.pop("share_down_path", None)  # the bench's own --share-down-path decides
    if steps is not None:
        call["num_inference_steps"] = steps
    if getattr(args, "cache_interval", None) is not None:
        call["cache_interval"] = args.cache_interval
    return call, config.scheduler


def timed_run(pipe, frames, mode, steps, device, count_flops=False):
    """One pipeline call: wall / denoise / decode seconds, peak memory, calls per network, and optionally FLOPs."""
    reference, motion = inputs(frames, sizes(args.reduced)["px"])
    decode_time = [0.0]
    decode = pipe.decode_latents
    memory, denoise_rss = HostMemory(), []

    def timed_decode(*args, **kwargs):
        synchronize(device)
        denoise_rss.append(memory.phase())
        start = time.perf_counter()
        out = decode(*args, **kwargs)
        synchronize(device)
        decode_time[0] += time.perf_counter() - start
        return out

    pipe.decode_latents = timed_decode
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    flops = FlopCounterMode(display=False) if count_flops else None
    call, scheduler = call_settings(mode, steps, args.preset)
    if not args.share_down_path:
        call["share_down_path"] = False
    if args.decode_chunk_size is not None:
        call["decode_chunk_size"] = args.decode_chunk_size
    with call_counter(pipe) as counts:
        synchronize(device)
        memory.start()
        start = time.perf_counter()
        with flops or torch.no_grad(), scheduler_for_call(pipe, scheduler):
            first = pipe(reference, motion, generator=torch.Generator(device).manual_seed(0), **call).frames
            refine_s = None
            if args.refine_size:  # the refine pass of `animate --refine-size`, on the first pass's frames
                synchronize(device)
                refine_start = time.perf_counter()
                refine_video(pipe, first, reference, motion, height=args.refine_size, width=args.refine_size,
                             strength=args.refine_strength, steps=call["num_inference_steps"],
                             generator=torch.Generator(device).manual_seed(0), **call)  # fmt: skip
                synchronize(device)
                refine_s = time.perf_counter() - refine_start
        synchronize(device)
        wall = time.perf_counter() - start
    decode_rss = memory.phase()  # the decode and the conversion of the frames to the output type
    del pipe.decode_latents
    cuda = device.startswith("cuda")
    return {
        "frames": frames,
        "mode": mode if args.preset is None else f"{mode}, preset {args.preset}",
        "device": device,
        "wall_s": wall,
        "s_per_frame": wall / frames,
        "denoise_s": wall - decode_time[0],
        "decode_s": decode_time[0],
        "refine_s": refine_s,  # within wall_s (its decode also within decode_s)
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "peak_rss_mib": max(denoise_rss[0], decode_rss) if memory.available else None,
        "peak_rss_denoise_mib": denoise_rss[0] if memory.available else None,
        "peak_rss_decode_mib": decode_rss,
        "calls": dict(counts),
        "tflop": flops.get_total_flops() / 1e12 if flops else None,
    }


def count_flops_meta(
    frames: int,
    mode: str,
    steps: int | None,
    reduced: bool,
    share_down_path: bool = True,
    preset: str | None = None,
    px: int | None = None,
    run_steps: int | None = None,
) -> dict:
    """Work of a whole call at full size, without running it: each network call is counted once on the meta device
    (FlopCounterMode needs shapes only) and multiplied by how often the pipeline makes it. Steps outside the guidance
    interval run the conditional branch alone.

    A refine pass is such a call at its own ``px`` that runs ``run_steps`` of the schedule and first VAE-encodes the
    upscaled frames (``run_steps`` given)."""
    pipe = build_pipeline(reduced, device="meta")
    px = px or sizes(reduced)["px"]
    h = px // 8
    padded = -(-frames // 16) * 16
    call, _ = call_settings(mode, steps, preset)
    steps = call["num_inference_steps"] if run_steps is None else run_steps
    windows = context_windows(padded, 16, 4, call["context_schedule"])
    per_call = call["context_batch_size"]
    call_sizes = [min(per_call, len(windows) - first) for first in range(0, len(windows), per_call)]

    def flops(fn):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        return counter.get_total_flops() / 1e12

    # Each step is guided or not, and (with cache_interval) full or reusing the cached deep features: the same
    # decision as the pipeline's (FeatureCache), so the same counts.
    interval = call.get("cache_interval", 1)
    cache = FeatureCache(interval) if interval > 1 else None
    kinds = []
    for i in range(steps):
        branches = (False, True) if call["guidance_start"] <= i / steps < call["guidance_end"] else (True,)
        reuse = cache is not None and cache.reuses(i, list(branches))
        if cache is not None and not reuse:
            cache.start_full_step(list(branches))
        kinds.append((branches, reuse))

    with torch.device("meta"):
        text = torch.empty(1, 77, pipe.text_encoder.config.hidden_size)
        latent = torch.empty(1, 4, h, h)
        work = {"text_encoder": flops(lambda: pipe.text_encoder(torch.zeros(1, 77, dtype=torch.long)))}
        work["vae_encode"] = flops(lambda: pipe.vae.encode(torch.empty(1, 3, px, px)))
        work["appearance_encoder"] = steps * flops(lambda: pipe.encode_appearance(latent, 1, text))
        control_input = (torch.empty(16, 4, h, h), 1, text.expand(16, -1, -1), torch.empty(16, 3, px, px))
        down, mid = pipe.controlnet(*control_input, return_dict=False)
        shallow = shallow_controlnet_residuals(pipe.controlnet, *control_input, 1.0, 1)
        control = {
            False: flops(lambda: pipe.controlnet(*control_input)),
            True: flops(lambda: shallow_controlnet_residuals(pipe.controlnet, *control_input, 1.0, 1)),
        }
        work["controlnet"] = (padded // 16) * sum(control[reuse] for _, reuse in kinds)

        def unet_call(windows_in_call, first, branches, reuse):
            if first:  # the first call of a step also projects the reference keys/values
                pipe.reference_control.load_reference()
            residuals = [r.repeat(windows_in_call, 1, 1, 1) for r in (shallow if reuse else (*down, mid))]
            call_cache = None
            if cache is not None:  # a full call fills the cache the reuse call reads
                call_cache = FeatureCache(interval)
                if reuse:
                    full = [r.repeat(windows_in_call, 1, 1, 1) for r in (*down, mid)]
                    pipe.denoise_windows(torch.empty(1, 4, padded, h, h), 1, text, windows[:windows_in_call], full,
                                         list(branches), share_down_path=share_down_path, cache=call_cache)  # fmt: skip
            return flops(
                lambda: pipe.denoise_windows(
                    torch.empty(1, 4, padded, h, h),
                    1,
                    text,
                    windows[:windows_in_call],
                    residuals,
                    list(branches),
                    share_down_path=share_down_path,
                    cache=call_cache,
                    reuse=reuse,
                )
            )

        pipe.encode_appearance(latent, 1, text)
        per_step = {}
        for kind in set(kinds):
            first = unet_call(call_sizes[0], True, *kind)
            others = {size: unet_call(size, False, *kind) for size in set(call_sizes[1:])}
            per_step[kind] = first + sum(others[size] for size in call_sizes[1:])
        work["unet"] = sum(per_step[kind] for kind in kinds)
        work["vae_decode"] = frames * flops(lambda: pipe.vae.decode(torch.empty(1, 4, h, h)))
        if run_steps is not None:  # a refine pass starts from the encoded frames
            work["vae_encode"] += frames * flops(lambda: pipe.vae.encode(torch.empty(1, 3, px, px)))
    return {
        "frames": frames,
        "mode": mode if preset is None else f"{mode}, preset {preset}",
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
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 25, or the preset's)")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="the preset's call settings (steps, scheduler, guidance interval, windows) instead of the mode's "
        "windows; the mode still picks the speed switches",
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reduced", action="store_true", help="narrow widths and 128 px (a CPU proxy)")
    parser.add_argument("--flops-only", action="store_true", help="count work at full size on the meta device")
    parser.add_argument("--flops", action="store_true", help="also count FLOPs of the timed run (slower)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the video UNet and the ControlNet")
    parser.add_argument("--compile-mode", default="default", choices=("default", "max-autotune", "reduce-overhead"))
    parser.add_argument("--motion-attention", choices=("sdpa", "bmm"), default="sdpa", help="motion-module attention")
    parser.add_argument("--json", action="store_true", help="one JSON object per line and run")
    parser.add_argument(
        "--share-down-path",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one UNet down path for both guidance branches (the pipeline's default; --no-share-down-path: two)",
    )
    parser.add_argument("--decode-chunk-size", type=int, help="frames per VAE decode call (default: the pipeline's)")
    parser.add_argument("--refine-size", type=int, help="add the refine pass at this (square) size, as animate does")
    parser.add_argument("--refine-strength", type=float, default=0.4, help="the refine pass's strength (0.4)")
    parser.add_argument("--cache-interval", type=int, help="feature reuse: a full UNet step every N (default: 1)")
    args = parser.parse_args()

    if args.flops_only:
        rows = [
            count_flops_meta(n, args.mode, args.steps, args.reduced, args.share_down_path, args.preset)
            for n in args.frames
        ]
        if args.refine_size:  # the whole animation: the first pass, then the refine pass (its own counts)
            run = refine_steps_run(call_settings(args.mode, args.steps, args.preset)[0]["num_inference_steps"],
                                   args.refine_strength)  # fmt: skip
            for row in rows:
                refine = count_flops_meta(row["frames"], args.mode, args.steps, args.reduced, args.share_down_path,
                                          args.preset, px=args.refine_size, run_steps=run)  # fmt: skip
                row.update(refine_tflop=refine["tflop"], refine_calls=refine["calls"])
                row["tflop"] += refine["tflop"]
    else:
        dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
        pipe = build_pipeline(args.reduced, args.device, dtype).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        apply_speed_settings(pipe, load_config(motion_attention=args.motion_attention))
        if args.mode == "fast":
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.controlnet.to(memory_format=torch.channels_last)
        if args.compile:  # as `--compile` does: the video UNet and the ControlNet
            compile_models(pipe, args.compile_mode)
        timed_run(pipe, 16, args.mode, 2, args.device)  # warm-up
        rows = []
        for n in args.frames:
            runs = [
                timed_run(pipe, n, args.mode, args.steps, args.device, args.flops and i == 0)
                for i in range(args.repeats)
            ]
            medians = ("wall_s", "denoise_s", "decode_s", "peak_rss_mib", "peak_rss_denoise_mib", "peak_rss_decode_mib")
            medians += ("refine_s",)
            row = {**runs[0], **{k: statistics.median(r[k] for r in runs) for k in medians if runs[0][k] is not None}}
            row.update(s_per_frame=row["wall_s"] / n, runs_s=[round(r["wall_s"], 3) for r in runs])
            row["tflop_per_s"] = row["tflop"] / row["wall_s"] if row["tflop"] else None
            rows.append(row)
    for row in rows:
        row.setdefault("wall_s", None)
        row.setdefault("s_per_frame", None)
        row.setdefault("peak_alloc_gib", None)
        row.setdefault("peak_rss_mib", None)
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
        "peak_rss_mib",
        "peak_rss_denoise_mib",
        "peak_rss_decode_mib",
        "tflop",
        "tflop_per_s",
        "calls",
    ]
    if args.refine_size:  # the refine pass's share of the time and work (the totals include it)
        columns[columns.index("decode_s") + 1 : columns.index("decode_s") + 1] = ["refine_s"]
        columns[columns.index("tflop") + 1 : columns.index("tflop") + 1] = ["refine_tflop"]
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
