"""Many animations in one run: ``magicanimate batch jobs.yaml`` (or ``jobs.csv``).

A manifest lists jobs (``reference`` or ``prompt``, ``driving``, ``output``, and any setting of
``configs/animation.yaml`` to override for that job). The pipeline is loaded once. Nothing is lost: every output is
written under a temporary name and renamed when complete, so a rerun skips the jobs that finished (unless
``--overwrite``) and a crash or Ctrl-C never leaves a half-written file that looks finished; a failing job is
reported and the others go on. A job with a prompt instead of a reference also gets its generated photo,
``NAME.reference.png`` next to its output.

What fails, and when:

* The whole batch, at once, before anything runs (exit 2): a manifest that cannot be read or parsed, unknown keys or
  missing columns, a setting a job cannot take (its keys over ``defaults:``, the flags and ``--config``), two jobs
  writing one file, an output that is one of the batch's inputs (or the manifest, or the report), an output that
  cannot be written. These are mistakes in the manifest: cheaper to fix before hours of work than after.
* One job, also before the models load: a reference or driving video that is missing, unreadable or not an
  image/video, and a video of a person when no DensePose model can be had. The job is reported failed at once and
  the others run.
* One job, while it runs: anything else (out of memory, a broken frame, ...).

A driving video is a DensePose rendering or a raw video of a person, told apart by the check ``animate`` uses
(:func:`magicanimate.densepose.palette.looks_like_densepose`); a raw one goes through ``animate(driving=...)`` with
the DensePose model loaded once for the batch (``--densepose-model``, or ``densepose_model:`` under ``defaults:``).

Under ``torchrun --nproc_per_node=K`` (or ``accelerate launch``), rank ``r`` of ``K`` takes jobs ``r, r+K, ...``:
the shares are disjoint, so each job runs exactly once, on ``cuda:LOCAL_RANK`` when there is a GPU.
"""

import argparse
import csv
import io
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from .errors import InputError, MagicAnimateError, as_user_error
from .io.files import check_readable
from .io.output import atomic_output, check_output, remove_stale_partials, same_file
from .settings import BY_NAME, LOAD_KEYS, SettingError, load_config, read_config_file, settings_from_args, yaml_problem

# Keys of a job that are not settings; "motion" is accepted for "driving" (the CLI's name).
PATH_KEYS = ("reference", "driving", "output")
# Per-job keys that are not settings of configs/animation.yaml either (they may also go under `defaults:`).
JOB_KEYS = ("driving_kind", "align_to_reference")
DRIVING_KINDS = ("auto", "densepose", "raw")
# Batch-wide keys of `defaults:`: the DensePose model is loaded once, like the pipeline.
BATCH_KEYS = ("densepose_model",)
# CSV cells kept as written (a prompt such as "yes" or "a: b" is text, not a YAML value).
TEXT_KEYS = (*BATCH_KEYS, "prompt", "negative_prompt")
CSV_DELIMITERS = (",", ";", "\t")
STATUSES = ("done", "skipped", "failed", "interrupted", "pending")


@dataclass
class Job:
    """One line of the manifest; ``index`` is its 1-based position, ``settings`` its own overrides."""

    index: int
    reference: Path | None  # None: the photo is generated from the job's prompt setting
    driving: Path
    output: Path
    driving_kind: str = "auto"
    align_to_reference: bool = False
    settings: dict = field(default_factory=dict)
    reference_end: Path | None = None  # keyframes: the photo the clip ends at


@dataclass
class Manifest:
    """A read manifest: ``defaults`` are settings for every job; ``densepose_model`` (relative paths resolved
    against the manifest's folder) extracts the motion of raw driving videos."""

    path: Path
    defaults: dict
    jobs: list[Job]
    densepose_model: Path | None = None


@dataclass
class JobResult:
    """What happened to a job, as written to the JSON report."""

    index: int
    reference: str
    driving: str
    output: str
    status: str  # one of STATUSES
    seconds: float | None = None
    error: str | None = None


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the batch; ``results`` say how far it got (the running job: ``interrupted``)."""

    def __init__(self, results: list[JobResult]):
        super().__init__()
        self.results = results


# ---------------------------------------------------------------------------------------------------- manifest


def read_manifest(path: str | Path) -> Manifest:
    """The jobs of a YAML or CSV manifest; relative paths are relative to the manifest's folder.

    YAML: a list of jobs, or a mapping with ``jobs:`` and optional ``defaults:`` (settings for every job). CSV: a
    header row naming the columns (``reference,driving,output`` and any setting), separated by ``,``, ``;`` or tabs;
    empty cells keep the default. Structural problems (unknown keys, missing columns, two jobs writing one file, an
    output that is an input) fail here, before any work.

    Raises:
        InputError: one line naming the manifest (and the job) and what is wrong.
    """
    path = Path(path)
    check_readable(path, "manifest")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".yaml", ".yml"):
        raise InputError(f"manifest must be a .yaml, .yml or .csv file, got {path.name}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"manifest {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as err:
        raise InputError(f"manifest {path} cannot be read: {err.strerror or err}") from None
    defaults, entries = ({}, _parse_csv(text, path)) if suffix == ".csv" else _parse_yaml(text, path)
    if not entries:
        raise InputError(f"manifest {path} lists no jobs")
    defaults = dict(defaults)
    model = defaults.pop("densepose_model", None)
    if model is not None and not isinstance(model, str):
        raise InputError(f"{path.name}: defaults: densepose_model must be a path, got {model!r}")
    job_defaults = {key: defaults.pop(key) for key in JOB_KEYS if key in defaults}
    _check_keys(defaults, where=f"{path.name}: defaults")
    jobs = [_make_job(index, entry, path.parent, job_defaults) for index, entry in enumerate(entries, start=1)]
    _check_outputs(jobs, path)
    return Manifest(path, defaults, jobs, path.parent / Path(model).expanduser() if model else None)


def _parse_yaml(text: str, path: Path) -> tuple[dict, list]:
    try:  # libyaml when present: a manifest of thousands of jobs parses in a blink
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as err:
        raise InputError(f"manifest {path} is not valid YAML: {yaml_problem(err)}") from None
    if isinstance(data, list):
        return {}, data
    if isinstance(data, dict) and set(data) <= {"defaults", "jobs"} and isinstance(data.get("jobs"), list):
        defaults = data.get("defaults") or {}
        if not isinstance(defaults, dict):
            raise InputError(f"{path.name}: 'defaults' must be a mapping of settings")
        return defaults, data["jobs"]
    raise InputError(f"{path.name} must be a list of jobs, or a mapping with 'jobs:' (and optionally 'defaults:')")


def _parse_csv(text: str, path: Path) -> list[dict]:
    text = text.lstrip("\r\n")
    header = text.splitlines()[0] if text else ""
    delimiter = csv_delimiter(header)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        rows = list(reader)
    except csv.Error as err:
        raise InputError(f"manifest {path} is not valid CSV: {err}") from None
    columns = [name.strip() for name in reader.fieldnames or []]
    missing = [] if "reference" in columns or "prompt" in columns else ["reference (or prompt)"]
    missing += [] if "output" in columns else ["output"]
    if "driving" not in columns and "motion" not in columns:
        missing.insert(1, "driving")
    if missing:
        raise InputError(
            f"{path.name} has no {', '.join(missing)} column: its first row must name the columns, e.g. "
            f"reference,driving,output (found: {', '.join(columns) or 'nothing'})"
        )
    entries = []
    for row in rows:
        entry = {}
        for key, value in row.items():
            if key is None or value is None or not value.strip():
                continue  # extra cells without a header, or an empty cell: the default
            key, value = key.strip(), value.strip()
            entry[key] = value if key in (*PATH_KEYS, *TEXT_KEYS, "motion", "driving_kind") else _parse_cell(value)
        if entry:
            entries.append(entry)
    return entries


def csv_delimiter(header: str) -> str:
    """The delimiter of a manifest's header row: the one of ``,`` ``;`` and tab that splits it into the column
    names (spreadsheets in many locales save ``;``-separated CSV), else the one giving the most columns."""

    def cells(delimiter: str) -> list[str]:
        return [cell.strip() for cell in next(csv.reader([header], delimiter=delimiter), [])]

    for delimiter in CSV_DELIMITERS:
        names = set(cells(delimiter))
        if "output" in names and names & {"reference", "prompt"}:
            return delimiter
    return max(CSV_DELIMITERS, key=lambda delimiter: len(cells(delimiter)))


def _parse_cell(value: str):
    """A CSV cell as the YAML scalar it spells (``7.5`` -> float, ``true`` -> bool, ``uniform`` -> str)."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _check_keys(settings: dict, where: str) -> None:
    unknown = sorted(str(key) for key in settings if key not in BY_NAME)
    if unknown:
        raise InputError(
            f"{where}: unknown setting(s) {', '.join(unknown)}; the names are those of configs/animation.yaml"
        )


def _make_job(index: int, entry, root: Path, job_defaults: dict) -> Job:
    if not isinstance(entry, dict):
        raise InputError(f"job {index} must be a mapping with reference, driving and output")
    entry = dict(entry)
    if "motion" in entry:
        if "driving" in entry:
            raise InputError(f"job {index} gives both 'driving' and 'motion'; they are the same thing, keep one")
        entry["driving"] = entry.pop("motion")
    missing = [key for key in PATH_KEYS if entry.get(key) in (None, "") and key != "reference"]
    if missing:
        raise InputError(f"job {index} has no {', '.join(missing)}")
    paths = {"reference": None}  # without one, the job's prompt setting makes the photo (checked in job_configs)
    for key in PATH_KEYS:
        value = entry.pop(key, None)
        if key == "reference" and value in (None, ""):
            continue
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise InputError(f"job {index}: {key} must be a path, got {value!r}")
        paths[key] = root / Path(str(value)).expanduser()
    end = entry.pop("reference_end", None)
    if end not in (None, ""):
        if not isinstance(end, (str, int)) or isinstance(end, bool):
            raise InputError(f"job {index}: reference_end must be a path, got {end!r}")
        paths["reference_end"] = root / Path(str(end)).expanduser()
    options = {**job_defaults, **{key: entry.pop(key) for key in JOB_KEYS if key in entry}}
    kind = options.get("driving_kind") or "auto"
    if kind not in DRIVING_KINDS:
        raise InputError(f"job {index}: driving_kind must be one of {', '.join(DRIVING_KINDS)}, got {kind!r}")
    align = options.get("align_to_reference", False)
    if not isinstance(align, bool):
        raise InputError(f"job {index}: align_to_reference must be true or false, got {align!r}")
    per_batch = sorted(set(entry) & {*LOAD_KEYS, *BATCH_KEYS})
    if per_batch:
        raise InputError(
            f"job {index} sets {', '.join(per_batch)}, which apply to the whole batch (the models are loaded "
            "once); put them under 'defaults:' or on the command line"
        )
    _check_keys(entry, where=f"job {index}")
    return Job(index=index, driving_kind=kind, align_to_reference=align, settings=entry, **paths)


def _check_outputs(jobs: list[Job], manifest: Path) -> None:
    """Refuse outputs that would destroy an input (the job's own, another job's, the manifest), that two jobs
    share, or that cannot be written. Outputs may exist: finished jobs are skipped, ``--overwrite`` redoes them."""
    inputs: dict[Path, tuple[int, str]] = {}
    for job in jobs:
        if job.reference is not None:
            inputs.setdefault(job.reference.resolve(), (job.index, "reference"))
        if job.reference_end is not None:
            inputs.setdefault(job.reference_end.resolve(), (job.index, "reference_end"))
        inputs.setdefault(job.driving.resolve(), (job.index, "driving video"))
    outputs: dict[Path, int] = {}
    for job in jobs:
        try:
            check_output(job.output, inputs=[job.reference, job.reference_end, job.driving, manifest], overwrite=True)
        except InputError as err:
            raise InputError(f"job {job.index}: {err}") from None
        resolved = job.output.resolve()
        if resolved in inputs:
            other, what = inputs[resolved]
            raise InputError(
                f"job {job.index} writes {job.output}, which is job {other}'s {what}; choose another output"
            )
        first = outputs.setdefault(resolved, job.index)
        if first != job.index:
            raise InputError(f"jobs {first} and {job.index} both write {job.output}; give each job its own output")


# ---------------------------------------------------------------------------------------------------- settings


def job_configs(manifest: Manifest, config: str | Path | None = None, flags: dict | None = None) -> tuple[dict, dict]:
    """``(base, configs)``: the batch-wide settings (``--config``, then ``defaults:``, then the flags) and every
    job's validated settings over them (``DictConfig`` by job index). All of them are checked here, so a bad value
    in the last job fails at once.

    Raises:
        InputError: names the layer the bad value came from (the job, ``defaults:``, the config file).
        SettingError: a flag's value (the CLI names the flag).
    """
    layers = {"config": read_config_file(config) if config is not None else {}}
    _check_keys(layers["config"], where=f"config file {config}")
    layers["defaults"] = manifest.defaults
    layers["flags"] = {key: value for key, value in (flags or {}).items() if value is not None}
    base = {**layers["config"], **layers["defaults"], **layers["flags"]}
    configs, seen = {}, {}
    for job in manifest.jobs:
        key = repr(sorted(job.settings.items()))  # most jobs share their settings: check each combination once
        if key not in seen:
            try:
                seen[key] = load_config({**base, **job.settings})
                if seen[key].frame_stride > 1:  # an interpolator that cannot be found fails the batch now
                    from .interpolation import find_interpolator

                    find_interpolator(seen[key].interpolator)
            except SettingError as err:
                raise _attribute(err, job, layers, config) from None
        configs[job.index] = seen[key]
    _check_reference_sources(manifest, configs, layers, config)
    return base, configs


def _check_reference_sources(manifest: Manifest, configs: dict, layers: dict, config) -> None:
    """Every job has exactly one of a reference photo and a prompt (its own ``prompt:``, or one from ``defaults:``,
    the flags or ``--config``); the photo a prompt makes goes next to the output (``NAME.reference.png``), which
    must be writable and not one of the batch's inputs or outputs."""
    from .stages.prompt_reference import reference_output_path

    taken = {job.output.resolve(): job.index for job in manifest.jobs}
    for job in manifest.jobs:
        taken.update({path.resolve(): job.index for path in (job.reference, job.driving) if path is not None})
    for job in manifest.jobs:
        prompt = configs[job.index].prompt
        if job.reference is None and prompt is None:
            raise InputError(f"job {job.index} has no reference (a photo) or prompt (a description to generate one)")
        if job.reference is not None and prompt is not None:
            where = "its own"
            if "prompt" not in job.settings:  # the layer it comes from, highest first
                named = (("flags", "--prompt"), ("defaults", "defaults:"), ("config", f"config file {config}"))
                where = next(f"from {name}" for key, name in named if "prompt" in layers[key])
            raise InputError(f"job {job.index} has both a reference and a prompt ({where}); give each job one")
        if prompt is None:
            continue
        if job.align_to_reference:
            raise InputError(
                f"job {job.index}: align_to_reference needs a reference photo; a prompt's photo is generated to fit "
                "the motion instead"
            )
        photo = reference_output_path(job.output)
        if photo.resolve() in taken:
            raise InputError(
                f"job {job.index} writes its generated photo to {photo}, which is job {taken[photo.resolve()]}'s "
                "input or output; rename the output"
            )
        try:
            check_output(photo, inputs=[manifest.path], overwrite=True, suffixes=(".png",))
        except InputError as err:
            raise InputError(f"job {job.index}: {err}") from None


def _attribute(err: SettingError, job: Job, layers: dict, config) -> Exception:
    """The setting's error, prefixed with where its value came from (the last layer that sets it)."""
    if err.key in job.settings:
        return InputError(f"job {job.index}: {err}")
    if err.key in layers["flags"]:
        return err  # the CLI adds the flag's name
    if err.key in layers["defaults"]:
        return InputError(f"defaults: {err}")
    if err.key in layers["config"]:
        return InputError(f"config file {config}: {err}")
    return InputError(f"job {job.index}: {err}")


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


def shard(jobs: list, rank: int, world: int) -> list:
    """This rank's share: every ``world``-th job from ``rank`` on (disjoint, and balanced when jobs are alike)."""
    return jobs[rank::world]


# ---------------------------------------------------------------------------------------------------- checking


def is_finished(output: Path) -> bool:
    """Outputs appear only when complete (atomic rename), so one that exists is finished."""
    if output.suffix == "":  # a folder of PNG frames
        return output.is_dir() and any(output.iterdir())
    return output.is_file()


def inspect_job(job: Job, config) -> str:
    """Check a job's input files before any model loads; return ``"densepose"`` or ``"raw"``: what its driving
    video is (as declared by ``driving_kind``, else by the DensePose check ``animate`` makes; with
    ``check_motion: false`` a video is taken as DensePose).

    Raises:
        InputError: a missing, unreadable or undecodable reference or driving video.
    """
    from PIL import Image

    from .densepose.palette import looks_like_densepose, sample_video
    from .io.video import probe_fps

    for photo in (job.reference, job.reference_end):  # no reference: the photo comes from the job's prompt
        if photo is None:
            continue
        check_readable(photo, "image file")
        try:
            with Image.open(photo):  # the header only: full decoding waits for the job
                pass
        except (OSError, SyntaxError, ValueError):
            raise InputError(
                f"cannot read image {photo}: not an image or corrupted; pass a PNG, JPEG or WebP file"
            ) from None
    check_readable(job.driving, "video file")
    if job.driving_kind != "auto" or not config.check_motion:
        probe_fps(job.driving)  # at least a video
        kind = "raw" if job.driving_kind == "raw" else "densepose"
    else:
        kind = "densepose" if looks_like_densepose(sample_video(job.driving, config.max_frames)) else "raw"
    if kind == "densepose" and job.align_to_reference:
        raise InputError(
            f"align_to_reference works on a video of a person, and {job.driving} is a DensePose video; remove it "
            "from this job (or set driving_kind: raw if the video is of a person)"
        )
    return kind


RAW_WITHOUT_MODEL = (
    "{path} is not a DensePose video, and extracting its DensePose needs the DensePose model: {reason}; if it is a "
    "DensePose video after all, set driving_kind: densepose for this job"
)


def find_densepose_model(model: str | Path | None) -> Path:
    """The DensePose TorchScript file raw driving videos need (``model``, ``$MAGICANIMATE_DENSEPOSE_MODEL``, the
    Hugging Face cache or, online, the hub), found before any model loads; offline this fails at once."""
    from .densepose.extractor import resolve_model_path

    return resolve_model_path(model, flag="--densepose-model")


# ---------------------------------------------------------------------------------------------------- running


@dataclass
class Report:
    """The JSON report at ``path`` (``None``: no report), replaced atomically on every write; ``writes`` counts
    the writes (one per job that ran, one after the check when a job failed it, one at the end)."""

    path: Path | None
    writes: int = 0

    def write(self, data: dict) -> None:
        if self.path is None:
            return
        with atomic_output(self.path) as temp:
            temp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        self.writes += 1


@dataclass
class Models:
    """What the jobs share, loaded once, when the first job that needs it runs: the pipeline, and the DensePose
    extractor for raw driving videos (``extractor_error``: why it could not be loaded, for every such job)."""

    pipeline: object = None
    extractor: object = None
    extractor_error: MagicAnimateError | None = None

    def load(self, settings: dict, raw: bool, densepose_model=None, label_cap: int | None = None) -> None:
        """The pipeline for ``settings``; for a ``raw`` job the extractor of ``densepose_model`` too."""
        if self.pipeline is None:
            self.pipeline = load_batch_pipeline(settings)
        if not raw or self.extractor is not None or self.extractor_error is not None:
            return
        from .densepose import load_extractor

        try:
            path = find_densepose_model(densepose_model)
            self.extractor = load_extractor(path, device=str(self.pipeline.device), label_cap=label_cap)
        except MagicAnimateError as err:
            self.extractor_error = err


def load_batch_pipeline(settings: dict):
    """The pipeline, loaded once (``device: auto`` is ``cuda:LOCAL_RANK`` on each rank of a multi-GPU run)."""
    from .loading import load_pipeline

    pipeline = load_pipeline(load_config(settings))
    pipeline.set_progress_bar_config(disable=True)  # our own step bar replaces it
    return pipeline


def run_job(job: Job, kind: str, config, models: Models, on_step: Callable[[int, int], None]) -> None:
    """Animate one job and save it atomically: DensePose driving as ``motion``, a raw video as ``driving`` (its
    DensePose extracted with the batch's extractor)."""
    from .api import animate

    if kind == "raw":
        if models.extractor_error is not None:
            raise models.extractor_error
        source = {
            "driving": job.driving,
            "densepose_model": models.extractor,
            "align_to_reference": job.align_to_reference,
        }
    else:
        source = {"motion": job.driving}
    if job.reference_end is not None:
        source["reference_end"] = job.reference_end
    video = animate(job.reference, pipeline=models.pipeline, config=dict(config), progress=on_step, **source)
    if video.reference is not None:  # a photo generated from the prompt: saved first, the output marks the job done
        from .stages.prompt_reference import save_reference

        save_reference(video.reference, job.output)
    video.save(job.output, crf=config.crf)


def run_batch(
    manifest: str | Path,
    *,
    config: str | Path | None = None,
    settings: dict | None = None,
    overwrite: bool = False,
    report: str | Path | Report | None = None,
    pipeline=None,
    densepose_model: str | Path | None = None,
) -> list[JobResult]:
    """Run this process's share of ``manifest``; return one result per job of the share.

    ``settings`` (the command line's flags) override the manifest's ``defaults:``; each job's own keys override
    both. Every job's settings, outputs and input files are checked before the models load. The JSON ``report``
    (a path, or a :class:`Report`) is written after every job that ran, and when the batch ends or is stopped, so
    it is current even if the run is killed, and resuming a long finished batch does not rewrite it per job.

    Raises:
        InputError: a structural problem of the manifest or the settings (nothing ran).
        BatchInterrupted: Ctrl-C or SIGTERM; its ``results`` include the interrupted job.
    """
    from tqdm.auto import tqdm

    plan = read_manifest(manifest)
    base, configs = job_configs(plan, config, settings)
    rank, world, _ = process_rank()
    if not isinstance(report, Report):
        report = Report(_rank_report_path(report, rank, world))
    check_report_path(report.path, plan, config)
    model = densepose_model or plan.densepose_model
    if model is not None:
        check_readable(model, "DensePose model")  # given but wrong: a mistake in the command, not in a job
    mine = shard(plan.jobs, rank, world)
    results = [JobResult(job.index, _reference_name(job), str(job.driving), str(job.output), "pending") for job in mine]
    kinds = _check_jobs(mine, results, configs, overwrite, model, tqdm)
    if any(result.status == "failed" for result in results):
        report.write(_report_data(manifest, rank, world, results))  # known now, not only after the first job
    # DensePose labels are kept at the largest output size among the raw jobs: lossless for all of them.
    label_cap = max((configs[index].size or 512 for index, kind in kinds.items() if kind == "raw"), default=None)
    label = f"rank {rank}/{world}" if world > 1 else "jobs"
    bar = tqdm(total=len(mine), desc=label, unit="job", position=0, dynamic_ncols=True)
    bar.update(sum(result.status != "pending" for result in results))
    models, current = Models(pipeline=pipeline), None
    try:
        for job, result in zip(mine, results, strict=True):
            if result.status != "pending":
                continue
            current = result
            models.load(base, kinds[job.index] == "raw", model, label_cap)
            _run_one(job, result, kinds[job.index], configs[job.index], models, tqdm)
            current = None
            report.write(_report_data(manifest, rank, world, results))
            bar.update(1)
    except KeyboardInterrupt:
        if current is not None:
            current.status, current.error = "interrupted", "stopped by the user; rerun to resume"
        raise BatchInterrupted(results) from None
    finally:
        bar.close()
        report.write(_report_data(manifest, rank, world, results))
    return results


def _check_jobs(jobs, results, configs, overwrite, model, tqdm) -> dict[int, str]:
    """Skip finished jobs, check the inputs of the others (before any model loads) and find the DensePose model if
    a raw driving video needs it; failures are reported at once. Returns each job's driving kind."""
    kinds = {}
    for job, result in zip(jobs, results, strict=True):
        if is_finished(job.output) and not overwrite:
            result.status = "skipped"
            continue
        try:
            kinds[job.index] = inspect_job(job, configs[job.index])
        except InputError as err:
            _fail(job, result, str(err), tqdm)
    if "raw" in kinds.values():
        try:
            find_densepose_model(model)
        except MagicAnimateError as err:
            for job, result in zip(jobs, results, strict=True):
                if kinds.get(job.index) == "raw" and result.status == "pending":
                    _fail(job, result, RAW_WITHOUT_MODEL.format(path=job.driving, reason=err), tqdm)
    counts = {status: sum(r.status == status for r in results) for status in ("pending", "skipped", "failed")}
    tqdm.write(
        f"{len(jobs)} jobs checked: {counts['pending']} to run, {counts['skipped']} finished earlier (skipped), "
        f"{counts['failed']} failed",
        file=sys.stderr,
    )
    return kinds


def _reference_name(job: Job) -> str:
    """The report's reference: the photo given, or the one the job's prompt makes next to its output."""
    if job.reference is not None:
        return str(job.reference)
    from .stages.prompt_reference import reference_output_path

    return str(reference_output_path(job.output))


def _fail(job: Job, result: JobResult, error: str, tqdm) -> None:
    result.status, result.error = "failed", error
    tqdm.write(f"job {job.index} failed: {error}", file=sys.stderr)


def _run_one(job: Job, result: JobResult, kind: str, config, models: Models, tqdm) -> None:
    from .api import denoising_steps

    remove_stale_partials(job.output)
    step_bar = tqdm(total=denoising_steps(config), desc=f"job {job.index}", unit="step", position=1, leave=False)
    start = time.perf_counter()
    try:
        run_job(job, kind, config, models, lambda step, total: step_bar.update(step - step_bar.n))
        result.status = "done"
    except Exception as err:  # noqa: BLE001 - one broken job must not stop the others
        error = as_user_error(err)
        result.status = "failed"
        result.error = str(error) if error is not None else f"{type(err).__name__}: {err}"
        if error is None:  # a bug: keep its traceback
            tqdm.write(traceback.format_exc(), file=sys.stderr)
    finally:
        result.seconds = round(time.perf_counter() - start, 2)
        step_bar.close()
    if result.status == "failed":
        tqdm.write(f"job {job.index} failed: {result.error}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- reporting


def check_report_path(path: Path | None, manifest: Manifest, config) -> None:
    """Refuse a report that would replace the manifest, the config file or any job's input or output."""
    if path is None:
        return
    for other, what in ((manifest.path, "the manifest"), (config, "the config file")):
        if other is not None and same_file(path, other):
            raise InputError(f"the report {path} is {what}; choose another --report path")
    if Path(path).is_dir():
        raise InputError(f"the report {path} is a folder; give a file name such as {Path(path) / 'report.json'}")
    resolved = Path(path).resolve()
    for job in manifest.jobs:
        for key in PATH_KEYS:
            if getattr(job, key) is not None and getattr(job, key).resolve() == resolved:
                raise InputError(f"the report {path} is job {job.index}'s {key}; choose another --report path")
    check_output(path, overwrite=True, suffixes=None)


def _rank_report_path(report: str | Path | None, rank: int, world: int) -> Path | None:
    """``report.json``, or ``report.rank1.json`` for rank 1 of a sharded run (each rank writes its own)."""
    if report is None:
        return None
    report = Path(report)
    return report if world == 1 else report.with_name(f"{report.stem}.rank{rank}{report.suffix or '.json'}")


def count_statuses(results: list[JobResult]) -> dict[str, int]:
    return {status: sum(r.status == status for r in results) for status in STATUSES}


def _report_data(manifest, rank: int, world: int, results: list[JobResult]) -> dict:
    return {
        "manifest": str(manifest),
        "rank": rank,
        "world_size": world,
        "counts": count_statuses(results),
        "jobs": [asdict(r) for r in results],
    }


def summary_table(results: list[JobResult]) -> str:
    """A plain-text table of the results (every job, the interrupted one and those not started included) and a
    one-line count."""
    lines = [f"{'job':>4}  {'status':<11} {'seconds':>8}  output"]
    for r in results:
        seconds = "-" if r.seconds is None else f"{r.seconds:.1f}"
        line = f"{r.index:>4}  {r.status:<11} {seconds:>8}  {r.output}"
        lines.append(line + (f"  ({r.error})" if r.error else ""))
    counts = count_statuses(results)
    shown = [status for status in STATUSES if counts[status] or status in ("done", "skipped", "failed")]
    lines.append(f"{len(results)} jobs: " + ", ".join(f"{counts[status]} {status}" for status in shown))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- command


def add_parser(commands, add_setting_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``magicanimate batch``; every setting is a flag that applies to all jobs."""
    batch = commands.add_parser(
        "batch",
        help="animate every job of a YAML or CSV manifest (resumable)",
        description="Animate every job of a manifest. Rerunning skips finished outputs; see the README for the format. "
        "Mistakes in the manifest fail the batch before anything runs; a job whose input files are missing or "
        "unreadable fails at once, before the models load, and the others run.",
    )
    batch.add_argument("manifest", help="jobs.yaml or jobs.csv: reference, driving, output and per-job settings")
    batch.add_argument("--overwrite", action="store_true", help="redo jobs whose output already exists")
    batch.add_argument("--report", default=None, help="write a JSON report (per rank: NAME.rankR.json)")
    batch.add_argument("--config", default=None, help="YAML file of settings for every job")
    batch.add_argument(
        "--densepose-model",
        default=None,
        help="DensePose TorchScript file for jobs whose driving video is a video of a person (default: "
        "densepose_model: under the manifest's defaults, $MAGICANIMATE_DENSEPOSE_MODEL, else the hub file)",
    )
    batch.add_argument("--debug", action="store_true", help="show tracebacks")
    add_setting_flags(batch)
    batch.set_defaults(run=batch_command)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a scheduler, torchrun) cleans up like Ctrl-C


def batch_command(args) -> int:
    """Exit status: 0 when every job is done or skipped, 1 when any failed, 130 when interrupted."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
    rank, world, _ = process_rank()
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    try:
        results = run_batch(
            args.manifest,
            config=args.config,
            settings=settings_from_args(args),
            overwrite=args.overwrite,
            report=args.report,
            densepose_model=args.densepose_model,
        )
    except BatchInterrupted as stop:
        print("\n".join(prefix + line for line in summary_table(stop.results).splitlines()))
        print(f"{prefix}interrupted: finished outputs are kept, no partial ones; rerun to resume", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"{prefix}interrupted before any job ran", file=sys.stderr)
        return 130
    print("\n".join(prefix + line for line in summary_table(results).splitlines()))
    return 1 if any(r.status == "failed" for r in results) else 0
