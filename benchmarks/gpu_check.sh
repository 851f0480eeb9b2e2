#!/usr/bin/env bash
# One command for a lent GPU (issue 25): every GPU figure the CPU cannot give, in one run of at most
# 8 minutes: one JSON file ($OUT/gpu_check.json, default gpu_check/) and a table on stdout. The parts,
# their time limits and what each measures: benchmarks/gpu_check.py. Run from anywhere:
#   bash benchmarks/gpu_check.sh [--out DIR] [--reference DIR] [--parts a,b,...] [--tiny]
# --reference (or $CYCLEGAN_REFERENCE): a checkout of junyanz/pytorch-CycleGAN-and-pix2pix; without it
# that part is skipped with a line. Each part has its own time limit and process group: a part that
# fails or hangs is reported and the others go on. Without CUDA it says so in one line, runs the parts
# that need no GPU and exits 0. $PY overrides the interpreter command (default: uv run --frozen python).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PY:-}" ]; then
  read -ra py <<< "$PY"
elif command -v uv >/dev/null 2>&1; then
  py=(uv run --frozen python)
else
  py=(python3)
fi
exec "${py[@]}" benchmarks/gpu_check.py "$@"
