"""The training benchmark (benchmarks/bench_training.py) runs end to end: a CPU smoke run of its reduced models, so
that the script a GPU session runs for issue 13's table does not rot. It measures nothing here."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_training.py"


def test_the_training_benchmark_runs_each_stage(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    command = [sys.executable, str(BENCH), "--device", "cpu", "--reduced", "--steps", "2", "--frames", "2",
               "--stages", "2", "lora", "--json"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [row["stage"] for row in rows] == ["2", "lora"]
    assert all(row["s_per_step"] > 0 and row["peak_rss_gib"] > 0 for row in rows)
    assert not list(tmp_path.glob("bench-training-*"))  # the scratch tree and data are removed
