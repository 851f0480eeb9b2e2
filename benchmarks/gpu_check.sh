#!/usr/bin/env bash
# The GPU figures CI cannot measure, in one run of < 8 minutes on one CUDA GPU; JSON (and the
# printed tables) go to $OUT (default ./gpu_check). Run from the project root: bash benchmarks/gpu_check.sh
#   1. gradient check: one step's gradients in every memory format × batch arrangement vs float64
#   2. bf16 vs fp32 loss curves over 300 steps (max relative difference of the mean losses)
#   3. train throughput at 256 px, ngf/ndf 64, 9 blocks: ref-structured, eager, batched,
#      batched+compile, batched+bf16 (ratios to ref-structured), max_memory_allocated
#   4. StyleGAN2 synthesis: the official one-seed loop vs batched
set -uo pipefail
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
PY=${PY:-uv run python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
step() {   # name, time limit in seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name" >&2
  timeout "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"; echo "$name exit $?" >> "$OUT/status.txt"
}
step grads 60 $PY benchmarks/gpu_check.py grads
step bf16 120 $PY benchmarks/gpu_check.py bf16 --steps 300
step throughput 210 $PY benchmarks/train_throughput.py --device cuda --steps 100 \
  --variants ref-structured,eager,batched,batched+compile,batched+bf16 --json "$OUT/throughput.json"
step stylegan 60 $PY benchmarks/stylegan.py --device cuda --count 256 --batch 32
$PY - "$OUT" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def read(name):
    try:
        return json.loads((out / f"{name}.out").read_text())
    except Exception:
        return None
summary = {"gpu": (out / "gpu.csv").read_text(), "status": (out / "status.txt").read_text().splitlines(),
           "grads": read("grads"), "bf16": read("bf16"),
           "throughput": json.loads((out / "throughput.json").read_text()) if (out / "throughput.json").exists() else None,
           "stylegan": (out / "stylegan.out").read_text() if (out / "stylegan.out").exists() else None}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
PYEOF
