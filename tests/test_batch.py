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
from tiny_models import make_motion, make_reference

from magicanimate import InputError
from magicanimate.batch import process_rank, read_manifest, shard
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
    """A reference photo, two DensePose-like clips and a raw (photo-like) clip, 64x64."""
    folder = tmp_path_factory.mktemp("batch-inputs")
    Image.fromarray(make_reference(64)).save(folder / "ref.png")
    write_video(folder / "dance.mp4", make_motion(FRAMES, 64, seed=1), fps=25)
    write_video(folder / "wave.mp4", make_motion(FRAMES, 64, seed=2), fps=25)
    raw = np.stack([np.roll(make_reference(64, seed=3), shift, axis=1) for shift in range(FRAMES)])
    write_video(folder / "raw.mp4", raw, fps=25)
    return folder


def write_manifest(path: Path, jobs: list[dict], defaults: dict | None = None) -> Path:
    data = {"defaults": {"context_frames": FRAMES, "context_overlap": 2, **(defaults or {})}, "jobs": jobs}
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------------------------ manifest rules


def test_csv_manifest_values_and_paths(tmp_path):
    manifest = tmp_path / "jobs.csv"
    manifest.write_text("reference,motion,output,guidance_scale,grid,seed\nref.png,a.mp4,out/a.mp4,5,true,\n")
    defaults, jobs = read_manifest(manifest)
    assert defaults == {}
    (job,) = jobs
    assert job.driving == tmp_path / "a.mp4" and job.output == tmp_path / "out" / "a.mp4"  # relative to manifest
    assert job.settings == {"guidance_scale": 5, "grid": True}  # typed like YAML; the empty seed is the default


@pytest.mark.parametrize(
    ("jobs", "message"),
    [
        ([{"reference": "r.png", "driving": "d.mp4", "output": "o.mp4", "stepz": 3}], "job 1: unknown setting"),
        ([{"reference": "r.png", "driving": "d.mp4", "output": "o.mp4", "dtype": "float16"}], "whole batch"),
        ([{"reference": "r.png", "output": "o.mp4"}], "job 1 has no driving"),
        ([{"reference": "r.png", "driving": "d.mp4", "output": "o.avi"}], "output must end in"),
        ([{"reference": "r.png", "driving": "d.mp4", "output": "o.mp4"}] * 2, "jobs 1 and 2 both write"),
    ],
)
def test_manifest_mistakes_fail_before_any_work(tmp_path, jobs, message):
    manifest = write_manifest(tmp_path / "jobs.yaml", jobs)
    with pytest.raises(InputError, match=message):
        read_manifest(manifest)


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


# ------------------------------------------------------------------------------------------------ end to end


def test_failing_jobs_are_reported_and_the_others_finish(tmp_path, inputs, tiny_tree):
    jobs = [
        {"reference": str(inputs / "ref.png"), "driving": str(inputs / "dance.mp4"), "output": "out/a.mp4"},
        {"reference": str(inputs / "missing.png"), "driving": str(inputs / "dance.mp4"), "output": "out/b.mp4"},
        {"reference": str(inputs / "ref.png"), "driving": str(inputs / "raw.mp4"), "output": "out/c.mp4"},
        {
            "reference": str(inputs / "ref.png"),
            "motion": str(inputs / "wave.mp4"),
            "output": "out/d",
            "size": 32,
            "max_frames": 5,
        },  # fmt: skip
    ]
    manifest = write_manifest(tmp_path / "jobs.yaml", jobs, defaults={"steps": 1, "size": 64})
    result = run_batch(manifest, "--pretrained", tiny_tree, "--report", tmp_path / "report.json")
    assert result.returncode == 1, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert [job["status"] for job in report["jobs"]] == ["done", "failed", "failed", "done"]
    assert "missing.png" in report["jobs"][1]["error"]
    assert "not a DensePose video" in report["jobs"][2]["error"]
    assert report["counts"] == {"done": 2, "skipped": 0, "failed": 2}
    assert all(job["seconds"] is not None for job in report["jobs"])
    assert "Traceback" not in result.stderr  # user errors are one line each
    assert "4 jobs: 2 done, 0 skipped, 2 failed" in result.stdout
    assert frame_count(tmp_path / "out" / "a.mp4") == FRAMES
    pngs = sorted((tmp_path / "out" / "d").iterdir())  # per-job overrides: PNG frames, 5 frames, 32 px
    assert len(pngs) == 5 and Image.open(pngs[0]).size == (32, 32)
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

    def run_until_done(count: int, sig: int) -> subprocess.Popen:
        """Start the batch, wait until the report says `count` jobs are done, then send `sig`."""
        report.unlink(missing_ok=True)  # only this run's report counts
        process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        while done_count() < count:
            assert process.poll() is None, f"batch ended early: {process.communicate()}"
            assert time.monotonic() < deadline, "no job finished in time"
            time.sleep(0.02)
        process.send_signal(sig)
        process.communicate(timeout=60)
        return process

    # Ctrl-C after the first job: exit 130, the report says where it stopped, nothing half-written.
    first = run_until_done(1, signal.SIGINT)
    assert first.returncode == 130
    statuses = [job["status"] for job in json.loads(report.read_text())["jobs"]]
    assert statuses[0] == "done" and "interrupted" in statuses, statuses
    assert not list(out.glob(".*")), "a temporary file was left behind"

    # A hard kill (no cleanup at all) after the next job; then plant what a kill during writing leaves behind.
    killed = run_until_done(1, signal.SIGKILL)
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
