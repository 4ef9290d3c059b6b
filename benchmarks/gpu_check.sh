#!/usr/bin/env bash
# GPU check (benchmarks/gpu_check.py): bf16 DPO, BDHS and evaluation on tiny models with timing and CUDA peak
# memory per stage; writes OUT/gpu_check.json and OUT/gpu_check.md (and OUT/nvidia-smi.txt on a GPU).
#   benchmarks/gpu_check.sh OUT [--dpo-steps 20 ...]        PYTHON=/path/to/python to pick the interpreter
# Also runs on a machine without a GPU (CUDA columns empty). Exit code 1 when a stage failed.
set -euo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT [gpu_check.py options]}
shift
cd "$(dirname "$0")/.."
mkdir -p "$out"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
fi
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
exec "${PYTHON:-python}" benchmarks/gpu_check.py --out "$out" "$@"
