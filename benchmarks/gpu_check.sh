#!/usr/bin/env bash
# GPU check of the Triton backend, for a CUDA machine with this repository checked out, no network
# and nothing installed from it (torch, triton and pytest must already be importable).
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Steps (about 8 minutes at most; each has its own time limit):
#   1. environment: python, torch, triton, GPU                             (fatal if no CUDA)
#   2. agreement + switch tests compiled for real on cuda tensors (TRITON_INTERPRET unset)
#   3. gpu_check.py checks: no host sync (sync debug mode "error"), CUDA graph capture and
#      replay of a model-level bio_step(), one launch per group, bio_step_ timing
#   4. GPU benchmarks from benchmarks/ when present (informative; never fails the run)
#   5. OUTDIR/summary.json and OUTDIR/summary.md
# Exit status: 0 when steps 2 and 3 pass, 1 when one fails, 2 when the machine cannot run them.
#
# The package is not installed: a throwaway directory under /tmp holds bio_transformations/ as
# symlinks to the repository's files plus bio_transformations/kernels -> kernels/ (the mapping
# pyproject.toml makes), and goes first on PYTHONPATH. Set PYTHON to choose the interpreter.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
PY="${PYTHON:-python3}"
START=$SECONDS
BUDGET=470 # seconds for the whole run

WORK="$(mktemp -d /tmp/bio_gpu_check.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/bio_transformations"
for entry in "$REPO"/bio_transformations/*; do
    name="$(basename "$entry")"
    [[ "$name" == "kernels" || "$name" == "__pycache__" ]] && continue
    ln -s "$entry" "$WORK/bio_transformations/$name"
done
ln -s "$REPO/kernels" "$WORK/bio_transformations/kernels"

export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
export TRITON_CACHE_DIR="$WORK/triton-cache"
unset TRITON_INTERPRET BIO_BACKEND BIO_RNG
cd "$WORK" # never the repository root: its bio_transformations/ lacks kernels/

: >"$OUT/steps.tsv"
record() { # name status seconds detail
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$OUT/steps.tsv"
    printf '==> %-12s %s (%s s) %s\n' "$1" "$2" "$3" "$4"
}
remaining() { echo $((BUDGET - (SECONDS - START))); }

# 1. environment ---------------------------------------------------------------------------------
echo "==> environment"
if ! "$PY" - >"$OUT/env.txt" 2>&1 <<'EOF'; then
import platform, sys
import torch, triton
import bio_transformations
from bio_transformations import kernels
print("python", platform.python_version(), "| torch", torch.__version__, "| triton", triton.__version__)
print("package", bio_transformations.__file__)
print("cuda", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("triton backend imports:", kernels.triton_available())
sys.exit(0 if torch.cuda.is_available() and kernels.triton_available() else 3)
EOF
    cat "$OUT/env.txt"
    record environment fail 0 "no CUDA device, or torch/triton/the package does not import"
    "$PY" "$REPO/benchmarks/gpu_check.py" summary "$OUT" >/dev/null || true
    exit 2
fi
cat "$OUT/env.txt"
command -v nvidia-smi >/dev/null && nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
record environment pass 0 "$(head -n 1 "$OUT/env.txt")"

FAILED=0

# 2. agreement and switch tests, compiled ----------------------------------------------------------
echo "==> agreement tests (compiled kernels on cuda tensors; the first calls compile)"
t0=$SECONDS
rc=0
timeout -k 10 300 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -ra \
    "$REPO/tests/test_backend_agreement.py" "$REPO/tests/test_backend_switch.py" \
    --junitxml "$OUT/agreement.xml" 2>&1 | tee "$OUT/agreement.log" || rc=${PIPESTATUS[0]}
last="$(grep -E '(passed|failed|error)' "$OUT/agreement.log" | tail -n 1 || true)"
if [[ $rc -eq 0 ]]; then
    record agreement pass $((SECONDS - t0)) "$last"
else
    [[ $rc -eq 124 ]] && last="timed out after 300 s; $last"
    record agreement fail $((SECONDS - t0)) "exit $rc: $last"
    FAILED=1
fi

# 3. device-only checks --------------------------------------------------------------------------
echo "==> gpu_check.py checks"
t0=$SECONDS
rc=0
timeout -k 10 150 "$PY" "$REPO/benchmarks/gpu_check.py" checks "$OUT" 2>&1 |
    tee "$OUT/checks.log" || rc=${PIPESTATUS[0]}
if [[ $rc -eq 0 ]]; then
    record checks pass $((SECONDS - t0)) "see checks.json"
else
    record checks fail $((SECONDS - t0)) "exit $rc (124: timed out); see checks.log"
    FAILED=1
fi

# 4. GPU benchmarks (informative) -----------------------------------------------------------------
left=$(remaining)
if [[ ! -f "$REPO/benchmarks/test_bench.py" ]]; then
    record benchmarks skip 0 "no benchmarks/test_bench.py"
elif ! "$PY" -c "import pytest_benchmark" 2>/dev/null; then
    record benchmarks skip 0 "pytest-benchmark is not installed"
elif [[ $left -lt 60 ]]; then
    record benchmarks skip 0 "only ${left} s left of the ${BUDGET} s budget"
else
    echo "==> GPU benchmarks (at most $((left - 15)) s)"
    opts=(-k gpu)
    conf="$REPO/benchmarks/conftest.py"
    grep -q -- '--bio-device' "$conf" 2>/dev/null && opts+=(--bio-device gpu)
    grep -q -- '--bio-quick' "$conf" 2>/dev/null && opts+=(--bio-quick)
    grep -q -- '--bio-contenders' "$conf" 2>/dev/null && opts+=(--bio-contenders ours)
    t0=$SECONDS
    rc=0
    (cd "$REPO/benchmarks" && timeout -k 10 $((left - 15)) "$PY" -m pytest -q -p no:cacheprovider \
        -o addopts="" "${opts[@]}" --benchmark-json "$OUT/bench.json" .) 2>&1 |
        tee "$OUT/bench.log" || rc=${PIPESTATUS[0]}
    last="$(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT/bench.log" | tail -n 1 || true)"
    # Informative only: a benchmark failure or timeout is reported, not fatal.
    record benchmarks "$([[ $rc -eq 0 ]] && echo pass || echo "warn")" $((SECONDS - t0)) \
        "exit $rc: $last (options: ${opts[*]})"
fi

# 5. summary -------------------------------------------------------------------------------------
echo "==> summary ($((SECONDS - START)) s in all)"
"$PY" "$REPO/benchmarks/gpu_check.py" summary "$OUT" || FAILED=1
exit $FAILED
