#!/usr/bin/env bash
# The GPU table of issue 10, in one run (about 10 minutes on an H100-class GPU): parity mode, fast mode and
# `--preset fast` at 16, 64 and 256 frames, eager and with --compile, plus the long-clip memory check at 1024 frames.
# Prints one JSON line per run and a table per command; paste the tables into benchmarks/RESULTS.md with the device
# and the date. Usage: bash benchmarks/gpu_table.sh [cuda]
set -euo pipefail
cd "$(dirname "$0")/.."
device="${1:-cuda}"
run() { python benchmarks/bench_pipeline.py --device "$device" --repeats 1 "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
run --mode parity --frames 16 64 256
run --mode fast --frames 16 64 256
run --preset fast --frames 16 64 256
run --preset fast --frames 64 --cache-interval 2
run --mode parity --frames 64 --compile
run --preset fast --frames 64 --compile
run --mode parity --frames 1024 --steps 2   # peak memory of a long clip: within +5% of 64 frames' is the target
