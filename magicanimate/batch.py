"""Many animations in one run: ``magicanimate batch jobs.yaml`` (or ``jobs.csv``).

A manifest lists jobs (``reference``, ``driving``, ``output``, and any setting of ``configs/animation.yaml`` to
override for that job). The pipeline is loaded once. Nothing is lost: every output is written under a temporary name
and renamed when complete, so a rerun skips the jobs that finished (unless ``--overwrite``) and a crash or Ctrl-C
never leaves a half-written file that looks finished; a failing job is reported and the others go on.

Under ``torchrun --nproc_per_node=K`` (or ``accelerate launch``), rank ``r`` of ``K`` takes jobs ``r, r+K, ...``:
the shares are disjoint, so each job runs exactly once, on ``cuda:LOCAL_RANK`` when there is a GPU.
"""

import argparse
import csv
import glob
import json
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from .config import load_config
from .errors import InputError, MagicAnimateError

# Keys of a job that are not settings; "motion" is accepted for "driving" (the CLI's name).
PATH_KEYS = ("reference", "driving", "output")
DRIVING_KINDS = ("auto", "densepose", "raw")
# Settings that shape the loaded pipeline: they can be set for the whole batch, not per job.
LOAD_KEYS = (
    "pretrained",
    "pretrained_model_path",
    "pretrained_vae_path",
    "pretrained_appearance_encoder_path",
    "pretrained_controlnet_path",
    "motion_module",
    "motion_only",
    "fusion_blocks",
    "device",
    "dtype",
    "channels_last",
    "motion_attention",
    "compile",
)


@dataclass
class Job:
    """One line of the manifest; ``index`` is its 1-based position, ``settings`` its own overrides."""

    index: int
    reference: Path
    driving: Path
    output: Path
    driving_kind: str = "auto"
    settings: dict = field(default_factory=dict)


@dataclass
class JobResult:
    """What happened to a job, as written to the JSON report."""

    index: int
    reference: str
    driving: str
    output: str
    status: str  # done | skipped | failed | interrupted
    seconds: float | None = None
    error: str | None = None


# ---------------------------------------------------------------------------------------------------- manifest


def read_manifest(path: str | Path) -> tuple[dict, list[Job]]:
    """``(defaults, jobs)`` from a YAML or CSV manifest; relative paths are relative to the manifest's folder.

    YAML: a list of jobs, or a mapping with ``jobs:`` and optional ``defaults:`` (settings for every job). CSV: a
    header row naming the columns (``reference,driving,output`` and any setting); empty cells keep the default.
    Structural problems (unknown keys, missing columns, two jobs writing one file) fail here, before any work.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest not found: {path}")
    if path.suffix.lower() == ".csv":
        defaults, entries = {}, _read_csv(path)
    elif path.suffix.lower() in (".yaml", ".yml"):
        defaults, entries = _read_yaml(path)
    else:
        raise InputError(f"manifest must be a .yaml, .yml or .csv file, got {path.name}")
    if not entries:
        raise InputError(f"{path.name} lists no jobs")
    _check_settings(defaults, where="defaults")
    jobs = [_make_job(index, entry, path.parent) for index, entry in enumerate(entries, start=1)]
    outputs: dict[Path, int] = {}
    for job in jobs:
        first = outputs.setdefault(job.output.resolve(), job.index)
        if first != job.index:
            raise InputError(f"jobs {first} and {job.index} both write {job.output}; give each job its own output")
    return defaults, jobs


def _read_yaml(path: Path) -> tuple[dict, list]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise InputError(f"{path.name} is not valid YAML: {str(err).splitlines()[0]}") from None
    if isinstance(data, list):
        return {}, data
    if isinstance(data, dict) and set(data) <= {"defaults", "jobs"} and isinstance(data.get("jobs"), list):
        defaults = data.get("defaults") or {}
        if not isinstance(defaults, dict):
            raise InputError(f"{path.name}: 'defaults' must be a mapping of settings")
        return defaults, data["jobs"]
    raise InputError(f"{path.name} must be a list of jobs, or a mapping with 'jobs:' (and optionally 'defaults:')")


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    entries = []
    for row in rows:
        entry = {}
        for key, value in row.items():
            if key is None or value is None or not value.strip():
                continue  # extra cells without a header, or an empty cell: the default
            key, value = key.strip(), value.strip()
            entry[key] = value if key in (*PATH_KEYS, "motion", "driving_kind") else _parse_cell(value)
        if entry:
            entries.append(entry)
    return entries


def _parse_cell(value: str):
    """A CSV cell as the YAML scalar it spells (``7.5`` -> float, ``true`` -> bool, ``uniform`` -> str)."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _check_settings(settings: dict, where: str) -> None:
    try:
        load_config(None, **settings)
    except InputError as err:
        raise InputError(f"{where}: {err}") from None


def _make_job(index: int, entry, root: Path) -> Job:
    if not isinstance(entry, dict):
        raise InputError(f"job {index} must be a mapping with reference, driving and output")
    entry = dict(entry)
    if "motion" in entry:
        if "driving" in entry:
            raise InputError(f"job {index} gives both 'driving' and 'motion'; they are the same thing, keep one")
        entry["driving"] = entry.pop("motion")
    missing = [key for key in PATH_KEYS if not entry.get(key)]
    if missing:
        raise InputError(f"job {index} has no {', '.join(missing)}")
    paths = {key: root / Path(str(entry.pop(key))).expanduser() for key in PATH_KEYS}
    kind = str(entry.pop("driving_kind", None) or "auto")
    if kind not in DRIVING_KINDS:
        raise InputError(f"job {index}: driving_kind must be one of {', '.join(DRIVING_KINDS)}, got {kind!r}")
    per_batch = sorted(set(entry) & set(LOAD_KEYS))
    if per_batch:
        raise InputError(
            f"job {index} sets {', '.join(per_batch)}, which apply to the whole batch (the pipeline is loaded "
            "once); put them under 'defaults:' or on the command line"
        )
    _check_settings(entry, where=f"job {index}")
    from .api import check_output_path

    check_output_path(paths["output"])
    return Job(index=index, driving_kind=kind, settings=entry, **paths)


# ---------------------------------------------------------------------------------------------------- sharding


def process_rank() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the environment torchrun and ``accelerate launch`` set."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise InputError("RANK, WORLD_SIZE and LOCAL_RANK must be integers when set") from None
    if not 0 <= rank < world:
        raise InputError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, local_rank


def shard(jobs: list[Job], rank: int, world: int) -> list[Job]:
    """This rank's share: every ``world``-th job from ``rank`` on (disjoint, and balanced when jobs are alike)."""
    return jobs[rank::world]


# ---------------------------------------------------------------------------------------------------- running


def remove_stale_partials(output: Path) -> None:
    """Delete temporary files a killed earlier run left for ``output`` (``.NAME.xxxxxxxx.partial...``)."""
    pattern = f".{glob.escape(output.name)}.????????.partial*"
    for stale in output.parent.glob(pattern):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def is_finished(output: Path) -> bool:
    """Outputs appear only when complete (atomic rename), so one that exists is finished."""
    if output.suffix == "":  # a folder of PNG frames
        return output.is_dir() and any(output.iterdir())
    return output.is_file()


RAW_DRIVING = (
    "{path} looks like a raw video of a person, not a DensePose video; convert it first with `magicanimate densepose "
    "{name} -o MOTION.mp4` (needs the DensePose model densepose_r50_fpn_dl.torchscript), or, if it is a DensePose "
    "video, set driving_kind: densepose for this job"
)


def check_driving(job: Job, max_frames: int | None) -> None:
    """Refuse a raw (non-DensePose) driving video with a clear message instead of animating noise."""
    if job.driving_kind == "densepose":
        return
    from .api import looks_like_densepose
    from .io import read_video

    frames, _ = read_video(job.driving, max_frames=min(8, max_frames or 8))
    if job.driving_kind == "raw" or not looks_like_densepose(frames):
        raise InputError(RAW_DRIVING.format(path=job.driving, name=job.driving.name))


def run_job(job: Job, pipeline, base: dict, config_file: str | None, on_step: Callable[[int, int], None]) -> None:
    """Animate one job and save it atomically (the pipeline's settings ``base``, then the job's own)."""
    from .api import animate

    settings = {**base, **job.settings}
    config = load_config(config_file, **settings)
    check_driving(job, config.max_frames)
    video = animate(job.reference, job.driving, pipeline=pipeline, config=config_file, progress=on_step, **settings)
    video.save(job.output, crf=config.crf)


def load_batch_pipeline(config_file: str | None, base: dict, local_rank: int, world: int):
    """The pipeline, loaded once; each rank of a multi-GPU run takes its own GPU."""
    import torch

    from .api import load_pipeline

    settings = dict(base)
    if world > 1 and load_config(config_file, **base).device == "auto" and torch.cuda.is_available():
        settings["device"] = f"cuda:{local_rank % torch.cuda.device_count()}"
    pipeline = load_pipeline(load_config(config_file, **settings))
    pipeline.set_progress_bar_config(disable=True)  # our own step bar replaces it
    return pipeline


def run_batch(
    manifest: str | Path,
    *,
    config: str | None = None,
    settings: dict | None = None,
    overwrite: bool = False,
    report: str | Path | None = None,
    pipeline=None,
) -> list[JobResult]:
    """Run this process's share of ``manifest``; return one result per job of the share.

    ``settings`` (the command line's flags) override the manifest's ``defaults:``; each job's own keys override
    both. The JSON ``report`` is rewritten after every job, so it is current even if the run is killed.
    """
    from tqdm.auto import tqdm

    defaults, jobs = read_manifest(manifest)
    base = {**defaults, **{k: v for k, v in (settings or {}).items() if v is not None}}
    load_config(config, **base)  # a bad --config or flag fails before any work
    rank, world, local_rank = process_rank()
    mine = shard(jobs, rank, world)
    results = [JobResult(job.index, str(job.reference), str(job.driving), str(job.output), "pending") for job in mine]
    report_path = _rank_report_path(report, rank, world)
    label = f"rank {rank}/{world}" if world > 1 else "jobs"
    bar = tqdm(total=len(mine), desc=label, unit="job", position=0, dynamic_ncols=True)
    current = None
    try:
        for job, result in zip(mine, results, strict=True):
            current = result
            if is_finished(job.output) and not overwrite:
                result.status = "skipped"
            else:
                if pipeline is None:
                    pipeline = load_batch_pipeline(config, base, local_rank, world)
                _run_one(job, result, pipeline, base, config, tqdm)
            bar.update(1)
            _write_report(report_path, manifest, rank, world, results)
        current = None
    except KeyboardInterrupt:
        if current is not None:
            current.status, current.error = "interrupted", "stopped by the user; rerun to resume"
        _write_report(report_path, manifest, rank, world, results)
        raise
    finally:
        bar.close()
    return results


def _run_one(job: Job, result: JobResult, pipeline, base: dict, config: str | None, tqdm) -> None:
    remove_stale_partials(job.output)
    steps = load_config(config, **{**base, **job.settings}).steps
    step_bar = tqdm(total=steps, desc=f"job {job.index}", unit="step", position=1, leave=False, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        run_job(job, pipeline, base, config, lambda step, total: step_bar.update(step - step_bar.n))
        result.status = "done"
    except MagicAnimateError as err:
        result.status, result.error = "failed", str(err)
    except Exception as err:  # noqa: BLE001 - one broken job must not stop the others
        result.status, result.error = "failed", f"{type(err).__name__}: {err}"
        tqdm.write(traceback.format_exc(), file=sys.stderr)
    finally:
        result.seconds = round(time.perf_counter() - start, 2)
        step_bar.close()
    if result.status == "failed":
        tqdm.write(f"job {job.index} failed: {result.error}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- reporting


def _rank_report_path(report: str | Path | None, rank: int, world: int) -> Path | None:
    """``report.json``, or ``report.rank1.json`` for rank 1 of a sharded run (each rank writes its own)."""
    if report is None:
        return None
    report = Path(report)
    return report if world == 1 else report.with_name(f"{report.stem}.rank{rank}{report.suffix or '.json'}")


def _write_report(path: Path | None, manifest, rank: int, world: int, results: list[JobResult]) -> None:
    if path is None:
        return
    counts = {status: sum(r.status == status for r in results) for status in ("done", "skipped", "failed")}
    data = {
        "manifest": str(manifest),
        "rank": rank,
        "world_size": world,
        "counts": counts,
        "jobs": [asdict(r) for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.partial")
    temp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(temp, path)


def summary_table(results: list[JobResult]) -> str:
    """A plain-text table of the results and a one-line count."""
    lines = [f"{'job':>4}  {'status':<11} {'seconds':>8}  output"]
    for r in results:
        seconds = "-" if r.seconds is None else f"{r.seconds:.1f}"
        line = f"{r.index:>4}  {r.status:<11} {seconds:>8}  {r.output}"
        lines.append(line + (f"  ({r.error})" if r.error else ""))
    counts = {status: sum(r.status == status for r in results) for status in ("done", "skipped", "failed")}
    lines.append(f"{len(results)} jobs: " + ", ".join(f"{n} {status}" for status, n in counts.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- command


def add_parser(commands, add_setting_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``magicanimate batch``; every setting is a flag that applies to all jobs."""
    batch = commands.add_parser(
        "batch",
        help="animate every job of a YAML or CSV manifest (resumable)",
        description="Animate every job of a manifest. Rerunning skips finished outputs; see the README for the format.",
    )
    batch.add_argument("manifest", help="jobs.yaml or jobs.csv: reference, driving, output and per-job settings")
    batch.add_argument("--overwrite", action="store_true", help="redo jobs whose output already exists")
    batch.add_argument("--report", default=None, help="write a JSON report (per rank: NAME.rankR.json)")
    batch.add_argument("--pretrained", default=None, help="root of the weights tree (see pretrained/README.md)")
    batch.add_argument("--config", default=None, help="YAML file of settings for every job")
    batch.add_argument("--debug", action="store_true", help="show tracebacks")
    add_setting_flags(batch)
    batch.set_defaults(run=batch_command)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a scheduler, torchrun) cleans up like Ctrl-C


def batch_command(args) -> int:
    """Exit status: 0 when every job is done or skipped, 1 when any failed, 130 when interrupted."""
    from .config import default_config

    settings = {k: v for k, v in vars(args).items() if k in default_config() and v is not None}
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
    rank, world, _ = process_rank()
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    try:
        results = run_batch(
            args.manifest, config=args.config, settings=settings, overwrite=args.overwrite, report=args.report
        )
    except KeyboardInterrupt:
        print(f"{prefix}interrupted: finished outputs are kept, no partial ones; rerun to resume", file=sys.stderr)
        return 130
    print("\n".join(prefix + line for line in summary_table(results).splitlines()))
    return 1 if any(r.status == "failed" for r in results) else 0
