"""``magicanimate batch``: manifests, failure isolation, resume after a kill, and sharding across ranks.

The end-to-end tests run the installed command in subprocesses on the tiny random-weight tree (built in code), so
they need nothing from ../shared.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import yaml
from PIL import Image
from test_densepose import faint_densepose, save_stand_in, scene, walking_video
from tiny_models import make_motion, make_reference

from magicanimate import CheckpointError, InputError
from magicanimate.batch import JobResult, Report, process_rank, read_manifest, shard, summary_table
from magicanimate.batch import run_batch as run_batch_here
from magicanimate.densepose.extractor import MODEL_ENV
from magicanimate.io import write_video

FRAMES = 8  # one 8-frame window per job keeps each job short


def batch_command(*args) -> list[str]:
    return [sys.executable, "-m", "magicanimate.cli", "batch", *map(str, args)]


# One thread: the tiny models gain nothing from more, and lose a lot to contention on a loaded 2-core runner.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_batch(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(batch_command(*args), capture_output=True, text=True, env=ENV, timeout=timeout)


def frame_count(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A reference photo, two DensePose-like clips, a faint one, a raw (photo-like) clip, all 64x64, and a walking
    person for the stand-in DensePose model (160x120)."""
    folder = tmp_path_factory.mktemp("batch-inputs")
    Image.fromarray(make_reference(64)).save(folder / "ref.png")
    write_video(folder / "dance.mp4", make_motion(FRAMES, 64, seed=1), fps=25)
    write_video(folder / "wave.mp4", make_motion(FRAMES, 64, seed=2), fps=25)
    write_video(folder / "faint.mp4", faint_densepose(FRAMES), fps=25)
    walking_video(folder / "walk.mp4", frames=FRAMES, fps=25.0)
    Image.fromarray(scene(width=64, height=64, red=(20, 10, 44, 60))).save(folder / "person.png")
    raw = np.stack([np.roll(make_reference(64, seed=3), shift, axis=1) for shift in range(FRAMES)])
    write_video(folder / "raw.mp4", raw, fps=25)
    return folder


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    return save_stand_in(tmp_path_factory.mktemp("batch-densepose-model") / "stand_in.torchscript")


def write_manifest(path: Path, jobs: list[dict], defaults: dict | None = None) -> Path:
    data = {"defaults": {"context_frames": FRAMES, "context_overlap": 2, **(defaults or {})}, "jobs": jobs}
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------------------------ manifest rules


def test_csv_manifest_values_and_paths(tmp_path):
    manifest = tmp_path / "jobs.csv"
    manifest.write_text("reference,motion,output,guidance_scale,grid,seed\nref.png,a.mp4,out/a.mp4,5,true,\n")
    plan = read_manifest(manifest)
    assert plan.defaults == {}
    (job,) = plan.jobs
    assert job.driving == tmp_path / "a.mp4" and job.output == tmp_path / "out" / "a.mp4"  # relative to manifest
    assert job.settings == {"guidance_scale": 5, "grid": True}  # typed like YAML; the empty seed is the default


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_csv_delimiter_is_sniffed(tmp_path, delimiter):
    """Spreadsheets in many locales save ``;``-separated CSV; tabs come from copying cells."""
    manifest = tmp_path / "jobs.csv"
    rows = [["reference", "driving", "output", "guidance_scale"], ["r.png", "d.mp4", "o.mp4", "5"]]
    manifest.write_text("\n".join(delimiter.join(row) for row in rows) + "\n")
    (job,) = read_manifest(manifest).jobs
    assert (job.reference.name, job.driving.name, job.output.name) == ("r.png", "d.mp4", "o.mp4")
    assert job.settings == {"guidance_scale": 5}
    manifest.write_text("reference;output\nr.png;o.mp4\n")
    with pytest.raises(InputError, match=r"jobs.csv has no driving column.*found: reference, output"):
        read_manifest(manifest)


def test_unreadable_manifests_are_named(tmp_path):
    with pytest.raises(InputError, match="manifest not found"):
        read_manifest(tmp_path / "missing.yaml")
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        read_manifest(tmp_path / "folder.yaml")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("reference,driving,output\nb\xe9b\xe9.png,d.mp4,o.mp4\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        read_manifest(latin)
    broken = tmp_path / "broken.yaml"
    broken.write_text("jobs:\n  - reference: r.png\n    driving: [d.mp4\n    output: o.mp4\n")
    with pytest.raises(InputError, match=r"broken.yaml is not valid YAML: line \d+, column \d+"):
        read_manifest(broken)
    if os.geteuid() != 0:  # root reads anything
        locked = write_manifest(tmp_path / "locked.yaml", [{"reference": "r.png", "driving": "d.mp4", "output": "o"}])
        locked.chmod(0)
        with pytest.raises(InputError, match="permission denied"):
            read_manifest(locked)


@pytest.mark.parametrize(
    ("jobs", "message"),
    [
        ([{"reference": "r.png", "driving": "d.mp4", "output": "o.mp4", "stepz": 3}], "job 1: unknown setting"),
        ([{"reference": "r.png", "driving": "d.mp4", "output": "o.mp4", "dtype": "float16"}], "whole batch"),
        ([{"reference": "r.png", "driving": "d.mp4", "output": "o.mp4", "densepose_model": "m"}], "whole batch"),
        ([{"reference": "r.png", "output": "o.mp4"}], "job 1 has no driving"),
        ([{"reference": "r.png", "driving": "d.mp4", "output": "o.avi"}], "must end in"),
        ([{"reference": "r.png", "driving": "d.mp4", "output": "o.mp4"}] * 2, "jobs 1 and 2 both write"),
        ([{"reference": "r.png", "driving": "d.mp4", "output": "d.mp4"}], "is one of the inputs"),
        ([{"reference": "frames", "driving": "d.mp4", "output": "./frames"}], "is one of the inputs"),
        (
            [
                {"reference": "r.png", "driving": "d.mp4", "output": "a.mp4"},
                {"reference": "r.png", "driving": "a.mp4", "output": "b.mp4"},
            ],
            "job 1 writes .*a.mp4, which is job 2's driving video",
        ),  # fmt: skip
        ([{"reference": "r.png", "driving": "d.mp4", "output": "o.mp4", "driving_kind": "pose"}], "driving_kind"),
    ],
)
def test_manifest_mistakes_fail_before_any_work(tmp_path, jobs, message):
    manifest = write_manifest(tmp_path / "jobs.yaml", jobs)
    with pytest.raises(InputError, match=message):
        read_manifest(manifest)


def test_output_over_an_existing_input_is_refused_and_kept(tmp_path, inputs):
    """Data loss: a job whose output is its own driving video would replace it (with --overwrite, or a rerun)."""
    driving = tmp_path / "dance.mp4"
    driving.write_bytes((inputs / "dance.mp4").read_bytes())
    manifest = write_manifest(
        tmp_path / "jobs.yaml",
        [{"reference": str(inputs / "ref.png"), "driving": "dance.mp4", "output": "./dance.mp4"}],
    )
    before = driving.read_bytes()
    with pytest.raises(InputError, match="is one of the inputs"):
        run_batch_here(manifest, overwrite=True)
    assert driving.read_bytes() == before


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        ("defaults", {"guidance_scale": float("nan")}, r"^defaults: setting guidance_scale must be"),
        ("defaults", {"steps": float("inf")}, r"^defaults: setting steps must be"),
        ("job", {"steps": 0}, r"^job 2: setting steps must be an integer from 1"),
        ("job", {"steps": 2.5}, r"^job 2: setting steps must be an integer"),
        ("job", {"size": 10**9}, r"^job 2: setting size must be"),
        ("job", {"guidance_scale": -1}, r"^job 2: setting guidance_scale must be"),
        ("job", {"context_overlap": 8}, r"^job 2: setting context_overlap \(8\) must be smaller than context_frames"),
        ("flags", {"decode_chunk_size": 0}, r"^setting decode_chunk_size must be"),
        ("config", {"crf": 99}, r"^config file .*settings.yaml: setting crf must be"),
    ],
)
def test_bad_settings_fail_at_once_in_one_line(tmp_path, where, value, message):
    """Manifest defaults, a job's keys, flags and --config all go through the settings schema before any work (no
    weights exist here: getting past the check would fail differently)."""
    jobs = [{"reference": "r.png", "driving": "d.mp4", "output": f"o{i}.mp4"} for i in range(3)]
    if where == "job":
        jobs[1].update(value)
    manifest = write_manifest(tmp_path / "jobs.yaml", jobs, defaults=value if where == "defaults" else None)
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump(value if where == "config" else {}))
    with pytest.raises(InputError, match=message) as caught:
        run_batch_here(manifest, config=config, settings=value if where == "flags" else None)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("target", ["manifest", "driving", "output", "folder"])
def test_report_may_not_replace_the_manifest_or_a_job_file(tmp_path, inputs, target):
    manifest = write_manifest(
        tmp_path / "jobs.yaml",
        [{"reference": str(inputs / "ref.png"), "driving": str(inputs / "dance.mp4"), "output": "out/a.mp4"}],
    )
    report = {
        "manifest": manifest,
        "driving": inputs / "dance.mp4",
        "output": tmp_path / "out" / "a.mp4",
        "folder": inputs,
    }[target]
    before = {path: path.read_bytes() for path in (manifest, inputs / "dance.mp4")}
    with pytest.raises(InputError, match=f"the report {report} is"):
        run_batch_here(manifest, report=report)
    assert all(path.read_bytes() == data for path, data in before.items())


def test_shards_are_disjoint_and_complete(monkeypatch):
    jobs = list(range(7))
    shares = [shard(jobs, rank, 3) for rank in range(3)]
    assert sorted(sum(shares, [])) == jobs
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert process_rank() == (1, 2, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(InputError, match="outside WORLD_SIZE"):
        process_rank()


# ------------------------------------------------------------------------------------------------ before the models


def test_inputs_are_checked_before_the_models_load(tmp_path, inputs, monkeypatch, capsys):
    """Every job's files are checked first: a missing reference in the last job fails at once, not after the
    others ran. The checkpoint tree is empty here, so the models fail to load right after the check; the report
    then shows what the check found."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.delenv(MODEL_ENV, raising=False)
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("not a video")
    jobs = [
        {"reference": str(inputs / "ref.png"), "driving": str(inputs / "dance.mp4"), "output": "out/1.mp4"},
        {"reference": str(inputs / "ref.png"), "driving": str(inputs / "faint.mp4"), "output": "out/2.mp4"},
        {"reference": str(inputs / "ref.png"), "driving": str(not_a_video), "output": "out/3.mp4"},
        {"reference": str(inputs / "ref.png"), "driving": str(inputs / "raw.mp4"), "output": "out/4.mp4"},
        {"reference": str(inputs / "dance.mp4"), "driving": str(inputs / "dance.mp4"), "output": "out/5.mp4"},
        {"reference": str(inputs / "missing.png"), "driving": str(inputs / "dance.mp4"), "output": "out/6.mp4"},
    ]
    manifest = write_manifest(tmp_path / "jobs.yaml", jobs, defaults={"pretrained": str(tmp_path / "no-weights")})
    report = tmp_path / "report.json"
    with pytest.raises(CheckpointError, match="incomplete checkpoint tree"):
        run_batch_here(manifest, report=report)
    statuses = {job["index"]: (job["status"], job["error"]) for job in json.loads(report.read_text())["jobs"]}
    assert statuses[1] == ("pending", None)
    assert statuses[2] == ("pending", None)  # a faint (small, blurred) DensePose clip is DensePose, as for animate
    assert statuses[3][0] == "failed" and "cannot read video" in statuses[3][1]
    assert statuses[4][0] == "failed" and "not a DensePose video" in statuses[4][1]
    assert "--densepose-model" in statuses[4][1] and MODEL_ENV in statuses[4][1]  # how to get the model
    assert statuses[5][0] == "failed" and "cannot read image" in statuses[5][1]
    assert statuses[6][0] == "failed" and "image file not found" in statuses[6][1]
    err = capsys.readouterr().err
    assert "job 6 failed: image file not found" in err
    assert "6 jobs checked: 2 to run, 0 finished earlier (skipped), 4 failed" in err


def test_resuming_a_finished_batch_writes_the_report_once(tmp_path):
    """Resuming 300 finished jobs: no model loads, no input is read, and the report is written once (at the end),
    not once per skipped job (which made resuming a long batch quadratic)."""
    jobs = [{"reference": "r.png", "driving": "d.mp4", "output": f"out/{i}.mp4"} for i in range(300)]
    manifest = write_manifest(tmp_path / "jobs.yaml", jobs)
    (tmp_path / "out").mkdir()
    for i in range(300):
        (tmp_path / "out" / f"{i}.mp4").write_bytes(b"finished earlier")
    report = Report(tmp_path / "report.json")
    results = run_batch_here(manifest, report=report)
    assert [r.status for r in results] == ["skipped"] * 300
    assert report.writes == 1
    data = json.loads(report.path.read_text())
    assert data["counts"] == {"done": 0, "skipped": 300, "failed": 0, "interrupted": 0, "pending": 0}
    inode = report.path.stat().st_ino
    run_batch_here(manifest, report=report)
    assert report.writes == 2 and report.path.stat().st_ino != inode  # replaced whole, once more


def test_summary_table_shows_the_interrupted_job():
    results = [
        JobResult(1, "r.png", "a.mp4", "out/1.mp4", "done", 3.0),
        JobResult(2, "r.png", "b.mp4", "out/2.mp4", "interrupted", 1.5, "stopped by the user; rerun to resume"),
        JobResult(3, "r.png", "c.mp4", "out/3.mp4", "pending"),
    ]
    table = summary_table(results).splitlines()
    assert any("interrupted" in line and "out/2.mp4" in line for line in table)
    assert any("pending" in line and "out/3.mp4" in line for line in table)
    assert table[-1] == "3 jobs: 1 done, 0 skipped, 0 failed, 1 interrupted, 1 pending"


# ------------------------------------------------------------------------------------------------ end to end


def test_failing_jobs_are_reported_and_the_others_finish(tmp_path, inputs, tiny_tree, stand_in):
    """DensePose clips (a faint one too) animate as motion, a video of a person through the DensePose model, per-job
    overrides apply; a missing file fails in the check, a video without a person while running; the rest finish."""
    ref = str(inputs / "ref.png")
    jobs = [
        {"reference": ref, "driving": str(inputs / "dance.mp4"), "output": "out/a.mp4"},
        {"reference": str(inputs / "missing.png"), "driving": str(inputs / "dance.mp4"), "output": "out/b.mp4"},
        {"reference": ref, "driving": str(inputs / "raw.mp4"), "output": "out/c.mp4"},  # nobody in it
        {"reference": ref, "motion": str(inputs / "wave.mp4"), "output": "out/d", "size": 32, "max_frames": 5},
        {
            "reference": str(inputs / "person.png"),
            "driving": str(inputs / "walk.mp4"),
            "output": "out/e.mp4",
            "align_to_reference": True,
        },
        {"reference": ref, "driving": str(inputs / "faint.mp4"), "output": "out/f.gif"},
    ]
    manifest = write_manifest(tmp_path / "jobs.yaml", jobs, defaults={"steps": 1, "size": 64})
    report = tmp_path / "report.json"
    result = run_batch(manifest, "--pretrained", tiny_tree, "--report", report, "--densepose-model", stand_in)
    assert result.returncode == 1, result.stderr
    report = json.loads(report.read_text())
    assert [job["status"] for job in report["jobs"]] == ["done", "failed", "failed", "done", "done", "done"]
    assert "image file not found" in report["jobs"][1]["error"] and "missing.png" in report["jobs"][1]["error"]
    assert report["jobs"][1]["seconds"] is None  # failed in the check: never ran
    assert "no person" in report["jobs"][2]["error"]
    assert report["counts"] == {"done": 4, "skipped": 0, "failed": 2, "interrupted": 0, "pending": 0}
    assert all(job["seconds"] is not None for job in report["jobs"] if job["status"] == "done")
    assert "Traceback" not in result.stderr  # user errors are one line each
    assert "6 jobs: 4 done, 0 skipped, 2 failed" in result.stdout
    assert frame_count(tmp_path / "out" / "a.mp4") == FRAMES
    pngs = sorted((tmp_path / "out" / "d").iterdir())  # per-job overrides: PNG frames, 5 frames, 32 px
    assert len(pngs) == 5 and Image.open(pngs[0]).size == (32, 32)
    with av.open(str(tmp_path / "out" / "e.mp4")) as container:  # extracted at the checkpoints' 25 fps
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == FRAMES and frames[0].shape == (64, 64, 3)
    assert frame_count(tmp_path / "out" / "f.gif") == FRAMES
    assert not (tmp_path / "out" / "b.mp4").exists() and not (tmp_path / "out" / "c.mp4").exists()


def test_killed_batch_resumes_without_partial_outputs(tmp_path, inputs, tiny_tree):
    out = tmp_path / "out"
    jobs = [
        {"reference": str(inputs / "ref.png"), "driving": str(inputs / name), "output": f"out/{index}.mp4"}
        for index, name in enumerate(["dance.mp4", "wave.mp4"] * 2)
    ]
    manifest = write_manifest(tmp_path / "jobs.yaml", jobs, defaults={"steps": 1, "size": 64})
    report = tmp_path / "report.json"
    command = batch_command(manifest, "--pretrained", tiny_tree, "--report", report)

    def done_count() -> int:
        try:  # the report is replaced atomically after every job
            return [job["status"] for job in json.loads(report.read_text())["jobs"]].count("done")
        except FileNotFoundError:
            return 0

    def run_until_done(count: int, sig: int) -> tuple[subprocess.Popen, str]:
        """Start the batch, wait until the report says `count` jobs are done, then send `sig`; return the process
        and what it printed."""
        report.unlink(missing_ok=True)  # only this run's report counts
        process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        while done_count() < count:
            assert process.poll() is None, f"batch ended early: {process.communicate()}"
            assert time.monotonic() < deadline, "no job finished in time"
            time.sleep(0.02)
        process.send_signal(sig)
        stdout, _ = process.communicate(timeout=60)
        return process, stdout

    # Ctrl-C after the first job: exit 130, the report and the table say where it stopped, nothing half-written.
    first, printed = run_until_done(1, signal.SIGINT)
    assert first.returncode == 130
    statuses = [job["status"] for job in json.loads(report.read_text())["jobs"]]
    assert statuses[0] == "done" and "interrupted" in statuses, statuses
    stopped = statuses.index("interrupted")
    assert any("interrupted" in line and f"{stopped}.mp4" in line for line in printed.splitlines()), printed
    assert "1 interrupted" in printed.splitlines()[-1]
    assert not list(out.glob(".*")), "a temporary file was left behind"

    # A hard kill (no cleanup at all) after the next job; then plant what a kill during writing leaves behind.
    killed, _ = run_until_done(1, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    finished = sorted(out.glob("*.mp4"))
    assert 2 <= len(finished) < len(jobs), "the kill came too late to test resuming"
    assert all(frame_count(path) == FRAMES for path in finished)  # what exists is complete
    stale = out / f".{len(jobs) - 1}.mp4.deadbeef.partial.mp4"
    stale.write_bytes(b"half a video")
    mtimes = {path: path.stat().st_mtime_ns for path in finished}

    rerun = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    statuses = [job["status"] for job in json.loads(report.read_text())["jobs"]]
    assert statuses == ["skipped"] * len(finished) + ["done"] * (len(jobs) - len(finished))
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in mtimes.items())  # finished jobs untouched
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{i}.mp4" for i in range(len(jobs)))  # no leftovers
    assert all(frame_count(out / f"{i}.mp4") == FRAMES for i in range(len(jobs)))


def test_torchrun_ranks_share_the_jobs(tmp_path, inputs, tiny_tree):
    jobs = [
        {"reference": str(inputs / "ref.png"), "driving": str(inputs / "dance.mp4"), "output": f"out/{i}.mp4"}
        for i in range(4)
    ]
    manifest = write_manifest(tmp_path / "jobs.yaml", jobs, defaults={"steps": 1, "size": 64})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "magicanimate.cli", "batch", str(manifest), "--pretrained", str(tiny_tree),
               "--report", str(tmp_path / "report.json")]  # fmt: skip
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "report.json").exists()  # each rank writes its own report
    done = {}
    for rank in range(2):
        report = json.loads((tmp_path / f"report.rank{rank}.json").read_text())
        assert (report["rank"], report["world_size"]) == (rank, 2)
        assert all(job["status"] == "done" for job in report["jobs"])
        done[rank] = [job["index"] for job in report["jobs"]]
    assert done == {0: [1, 3], 1: [2, 4]}  # disjoint shares that cover every job: each job ran exactly once
    assert all(frame_count(tmp_path / "out" / f"{i}.mp4") == FRAMES for i in range(4))
