"""The training loop: accelerate for devices, mixed precision, gradient accumulation, several processes and
checkpoints; diffusers' training utilities for EMA and min-SNR; peft for LoRA.

One optimizer step sums the gradients of ``batch_size x gradient_accumulation_steps`` samples per process, one
forward and backward pass at a time (accelerate's gradient accumulation: the memory of one sample, gradients synced
across processes once per step). Each sample's reference attention is its own reference image, so samples do not
share a UNet call; the samples of a step are numbered so that the run sees the same ones however many processes
share it (:class:`~.dataset.SampleStream`).
"""

import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch

from ..errors import InputError
from . import checkpoints as ckpt
from .config import require

log = logging.getLogger("magicanimate")


def weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def resolve_mixed_precision(setting: str, cpu: bool) -> str:
    """``auto``: bf16 on a GPU that has it, else fp16; none on a CPU (its half-precision kernels are slow)."""
    if setting != "auto":
        return setting
    if cpu or not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def check_run(config) -> Path | None:
    """Check the settings and the files a run needs before any model loads; returns the checkpoint to resume from.

    Raises:
        InputError / SettingError: a missing setting, no data, no usable pretrained tree, or a run folder that
            already holds checkpoints while ``resume`` is not given.
        CheckpointError: the pretrained tree lacks pieces.
    """
    from ..weights import incomplete_tree_error, missing_weights
    from .manifest import read_manifest

    require(config, "stage", "data", "pretrained", "output")
    read_manifest(config.data)
    root = Path(config.pretrained)
    if not root.is_dir():
        raise InputError(f"pretrained tree not found: {root}")
    if not (root / "model_index.json").is_file() and (missing := missing_weights(root)):
        raise incomplete_tree_error(root, missing)
    if config.optimizer == "adamw_8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise InputError(
                "optimizer adamw_8bit needs bitsandbytes (pip install bitsandbytes); or use adamw"
            ) from None
    run = Path(config.output)
    if run.exists() and not run.is_dir():
        raise InputError(f"the run folder {run} is a file; choose another -o")
    resume = ckpt.resume_folder(run, config.resume)
    if resume is None and ckpt.list_checkpoints(run):
        raise InputError(
            f"{run} already holds checkpoints; pass --resume latest to continue that run, or choose another -o"
        )
    if resume is not None and ckpt.read_state(resume)["stage"] != config.stage:
        raise InputError(
            f"{resume} is a stage {ckpt.read_state(resume)['stage']} checkpoint, not stage "
            f"{config.stage}; export it and pass the exported tree as --pretrained to train stage "
            f"{config.stage} on it"
        )
    return resume


def load_training_pipeline(config):
    """The pipeline of the pretrained tree with the stage's trainable parameters unfrozen (LoRA injected for
    ``lora``), gradient checkpointing as configured; on the CPU, float32."""
    from ..loading import quiet_loading
    from ..pipelines import MagicAnimatePipeline
    from .lora import add_lora
    from .model import select_trainable

    with quiet_loading():
        pipe = MagicAnimatePipeline.from_pretrained(config.pretrained, fusion_blocks=config.fusion_blocks)
    pipe.set_progress_bar_config(disable=True)
    if config.stage == "lora":
        add_lora(pipe, config.lora_rank, config.lora_alpha)
    select_trainable(pipe, config.stage)
    if config.gradient_checkpointing:
        for name in ("unet", "appearance_encoder", "controlnet"):
            getattr(pipe, name).enable_gradient_checkpointing()
    return pipe


def trained_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The parameters that train, by name (``unet.``, ``appearance_encoder.``, ``controlnet.`` prefixes)."""
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def make_optimizer(params, config):
    if config.optimizer == "adamw_8bit":
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def train(config) -> Path | None:
    """Run (or resume) one training run as ``config`` (from :func:`~.config.load_train_config`) says; returns the
    last checkpoint. Under ``accelerate launch`` / ``torchrun`` every process runs this."""
    return Trainer(config).run()


class Trainer:
    """One training run: everything set up (accelerator, models, optimizer, data, EMA, resume) when constructed,
    the steps taken by :meth:`run`.

    Attributes: ``accelerator``, ``pipe`` (the pipeline whose models train), ``model`` (the prepared
    :class:`~.model.TrainingModel`), ``params`` (the trained parameters by name), ``data``, ``step``.
    """

    def __init__(self, config):
        from accelerate import Accelerator, DistributedDataParallelKwargs
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel, cast_training_params

        from .dataset import TrainingData
        from .manifest import read_manifest
        from .model import TrainingModel

        self.config = config
        resume = check_run(config)
        self.run_folder = Path(config.output)
        cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
        if config.device == "cuda" and not torch.cuda.is_available():
            raise InputError("device cuda: no usable CUDA GPU; use --device cpu, or install the CUDA build of torch")
        mixed_precision = resolve_mixed_precision(config.mixed_precision, cpu)
        self.per_step = config.batch_size * config.gradient_accumulation_steps
        self.accelerator = accelerator = Accelerator(
            gradient_accumulation_steps=self.per_step,
            mixed_precision=mixed_precision,
            cpu=cpu,
            log_with=config.report_to,
            project_dir=str(self.run_folder),
            # The appearance encoder gets no gradient from a sample without the reference.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        set_seed(config.seed)  # the same LoRA initialisation on every process
        self.data = TrainingData(config.data, config)
        self.validation_entries = [e for e in read_manifest(config.data) if e.split == "val" and e.kind == "video"]
        if config.validate_every and not self.validation_entries:
            log.info(f"no validation clip in {config.data} (split val): validation is off")

        self.pipe = pipe = load_training_pipeline(config)
        if self.data.cached:
            check_latents_vae(self.data, pipe.vae, config.pretrained)
        dtype = weight_dtype(mixed_precision)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):  # torch's .to: diffusers' warns about fp32 modules: []
                torch.nn.Module.to(component, accelerator.device, dtype)
        model = TrainingModel(pipe, config.stage, snr_gamma=config.snr_gamma).to(accelerator.device)
        cast_training_params(model, dtype=torch.float32)  # trained weights (and their gradients) stay float32
        self.params = trained_parameters(model)
        optimizer = make_optimizer(list(self.params.values()), config)
        schedule = get_scheduler(
            config.lr_scheduler,
            optimizer,
            num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=config.max_steps * accelerator.num_processes,
        )
        self.ema = EMAModel(list(self.params.values()), decay=config.ema_decay) if config.ema else None
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)
        self.model, self.optimizer, self.schedule = accelerator.prepare(model, optimizer, schedule)
        if self.ema is not None:
            self.ema.to(accelerator.device)
        self.step = 0
        self.last_checkpoint = resume
        if resume is not None:
            accelerator.load_state(str(resume))
            self.step = ckpt.read_state(resume)["step"]
            log.info(f"resumed from {resume} (step {self.step})")

    # accelerate's save_state/load_state hooks: only the trained weights (and their EMA), by name.

    def _save_hook(self, models, weights, output_dir):
        if self.accelerator.is_main_process:
            ckpt.save_weights(Path(output_dir) / ckpt.TRAINED_FILE, self.params)
            if self.ema is not None:
                shadow = dict(zip(self.params, self.ema.shadow_params, strict=True))
                ckpt.save_weights(Path(output_dir) / ckpt.EMA_FILE, shadow)
        weights.clear()  # not accelerate's copy of the whole model: only what trains (above)

    def _load_hook(self, models, input_dir):
        load_trained(self.params, ckpt.read_weights(input_dir), input_dir)
        if self.ema is not None:
            shadow = ckpt.read_weights(input_dir, ema=True)
            with torch.no_grad():
                for name, tensor in zip(self.params, self.ema.shadow_params, strict=True):
                    tensor.copy_(shadow[name])
            self.ema.optimization_step = ckpt.read_state(input_dir)["step"]
        models.clear()

    def loader(self):
        """This process's samples from the current step on (see :class:`~.dataset.SampleStream`)."""
        from .dataset import SampleStream, keep_sample

        accelerator, config = self.accelerator, self.config
        stream = SampleStream(
            len(self.data), config.seed, self.per_step, accelerator.process_index, accelerator.num_processes, self.step
        )
        return torch.utils.data.DataLoader(
            self.data,
            sampler=stream,
            batch_size=None,
            collate_fn=keep_sample,
            num_workers=config.dataloader_workers,
            persistent_workers=config.dataloader_workers > 0,
        )

    def train_step(self, samples) -> float:
        """One optimizer step on ``samples`` (this process's ``batch_size x gradient_accumulation_steps`` of them):
        one forward and backward pass each, the gradients summed (and, across processes, averaged), clipped, and
        applied; then the EMA. Returns the mean loss over all processes."""
        accelerator, params = self.accelerator, list(self.params.values())
        if len(samples) != self.per_step:
            raise ValueError(f"a step takes {self.per_step} samples per process, got {len(samples)}")
        losses = []
        for sample in samples:
            with accelerator.accumulate(self.model):
                loss = self.model(sample)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise InputError(
                        f"the loss became {value} at step {self.step + 1}; lower --learning-rate, or use "
                        "--mixed-precision bf16 instead of fp16"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, self.config.max_grad_norm)
                self.optimizer.step()
                self.schedule.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(value)
        assert accelerator.sync_gradients, "the last sample of a step must apply the summed gradients"
        self.step += 1
        if self.ema is not None:
            self.ema.step(params)
        mean = torch.tensor(sum(losses) / len(losses), device=accelerator.device)
        return float(accelerator.reduce(mean, "mean"))

    def run(self, stop_at: int | None = None) -> Path | None:
        """Train up to ``max_steps`` (or pause after step ``stop_at``: the schedule still ends at ``max_steps``, and
        a later run with ``resume`` continues), checkpointing and validating on the way; returns the last
        checkpoint."""
        from tqdm.auto import tqdm

        accelerator, config, run = self.accelerator, self.config, self.run_folder
        if accelerator.is_main_process:
            run.mkdir(parents=True, exist_ok=True)
            (run / "train_config.json").write_text(json.dumps(dict(config), indent=2), encoding="utf-8")
            accelerator.init_trackers(
                "magicanimate-train", config={k: v for k, v in dict(config).items() if v is not None}
            )
        progress = tqdm(
            total=config.max_steps,
            initial=self.step,
            desc=f"train stage {config.stage}",
            unit="step",
            disable=not accelerator.is_local_main_process,
        )
        self.model.train()
        samples = iter(self.loader())
        end = config.max_steps if stop_at is None else min(stop_at, config.max_steps)
        cuda = accelerator.device.type == "cuda"
        while self.step < end:
            start = time.perf_counter()
            loss = self.train_step([next(samples) for _ in range(self.per_step)])
            logs = {"loss": loss, "lr": self.schedule.get_last_lr()[0], "seconds": time.perf_counter() - start}
            if cuda:  # what the step needed at most: the number to compare with a GPU's memory
                logs["peak_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
            progress.update()
            progress.set_postfix(loss=f"{loss:.4f}")
            if accelerator.is_main_process:
                with open(run / "log.jsonl", "a", encoding="utf-8") as file:
                    file.write(json.dumps({"step": self.step, **logs}) + "\n")
            accelerator.log(logs, step=self.step)
            last = self.step == config.max_steps
            if self.step % config.checkpoint_every == 0 or last:
                self.last_checkpoint = save_checkpoint(accelerator, run, self.step, config, self.ema is not None)
            if config.validate_every and self.validation_entries and (self.step % config.validate_every == 0 or last):
                self.validate()
        progress.close()
        accelerator.end_training()
        return self.last_checkpoint

    def validate(self) -> None:
        """Validate on the main process (with the EMA weights when there are some); the others wait."""
        from .validation import validate

        accelerator, params = self.accelerator, list(self.params.values())
        if accelerator.is_main_process:
            if self.ema is not None:
                self.ema.store(params)
                self.ema.copy_to(params)
            try:
                metrics = validate(
                    self.pipe,
                    Path(self.config.data),
                    self.validation_entries[0],
                    self.config,
                    self.step,
                    self.run_folder,
                    accelerator.autocast,
                )
            finally:
                if self.ema is not None:
                    self.ema.restore(params)
            log.info(f"step {self.step}: validation PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}")
            accelerator.log({"val_psnr": metrics["psnr"], "val_ssim": metrics["ssim"]}, step=self.step)
        accelerator.wait_for_everyone()


def check_latents_vae(data, vae, pretrained) -> None:
    """Refuse cached latents that another VAE than the training tree's made (their clip named): the model would
    learn to denoise latents its own VAE never produces."""
    from ..settings import SettingError
    from .latents import vae_fingerprint

    own = vae_fingerprint(vae)
    for name, fingerprint in data.vae_fingerprints.items():
        if fingerprint != own:
            raise SettingError(
                "cached_latents",
                f"the cached latents of clip {name} come from another VAE than {pretrained}'s; rerun prepare-data "
                f"with --cache-latents --pretrained {pretrained} (it re-encodes them), or use --no-cached-latents",
            )


def load_trained(params: dict, weights: dict, source) -> None:
    """Copy a checkpoint's trained weights into ``params`` (every name must be there, with its shape)."""
    from ..errors import CheckpointError

    missing = sorted(set(params) - set(weights))
    extra = sorted(set(weights) - set(params))
    if missing or extra:
        keys = ", ".join((missing or extra)[:3])
        raise CheckpointError(
            f"{source} does not fit this run's trainable weights ({'missing' if missing else 'extra'}"
            f" {keys}); was it written with other settings (stage, lora_rank)?"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])


def save_checkpoint(accelerator, run: Path, step: int, config, ema: bool) -> Path:
    """Write ``RUN/checkpoint-STEP/`` (every process takes part; the main one renames it into place and prunes)."""
    temp, final = ckpt.partial_folder(run, step), ckpt.final_folder(run, step)
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt.write_state(temp, {"step": step, "stage": config.stage, "ema": ema, "config": dict(config)})
        if final.exists():
            shutil.rmtree(final)
        temp.rename(final)
        ckpt.prune(run, config.checkpoints_total_limit)
    accelerator.wait_for_everyone()
    return final
