#!/usr/bin/env bash
# One prepared GPU run of the Triton backend, for a CUDA machine with this repository checked
# out, no network and nothing installed from it (torch, triton and pytest must be importable).
#
#   bash benchmarks/gpu_check.sh OUTDIR            # on the GPU machine (at most ~8 minutes)
#   bash benchmarks/gpu_check.sh OUTDIR --dry-run  # on a CPU: tiny sizes, Triton interpreter
#
# Steps, under one hard cap (CAP seconds, default 470, for the whole script):
#   1. environment: python, torch, triton, GPU (exit 2 if no CUDA, unless --dry-run)
#   2. gpu_check.py run: correctness checks first (OUTDIR/checks.json rewritten after each),
#      then the timings by priority (one line each in OUTDIR/results.jsonl, written at once);
#      its own deadline leaves time for steps 3-4, and `timeout` kills it 20 s after that
#   3. the agreement and switch test files compiled on cuda tensors, with what time is left
#      (not in --dry-run: the test suite runs them in the interpreter already)
#   4. OUTDIR/summary.json and OUTDIR/summary.md from whatever is on disk
# Exit status: 0 when every check and step 3 pass, 1 when one fails, 2 when the machine cannot
# run them. gpu_check.py's docstring says what is measured and how.
#
# The package is not installed: a throwaway directory under /tmp holds bio_transformations/ as
# symlinks to the repository's files plus bio_transformations/kernels -> kernels/ (the mapping
# pyproject.toml makes), and goes first on PYTHONPATH. Set PYTHON to choose the interpreter.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 || ($# -eq 2 && "$2" != "--dry-run") ]]; then
    echo "usage: $0 OUTDIR [--dry-run]" >&2
    exit 2
fi
DRY=0
[[ $# -eq 2 ]] && DRY=1

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
PY="${PYTHON:-python3}"
START=$SECONDS
CAP=${CAP:-470} # seconds for the whole script
remaining() { echo $((CAP - (SECONDS - START))); }

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
unset BIO_BACKEND BIO_RNG
if [[ $DRY -eq 1 ]]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
    unset TRITON_INTERPRET
fi
cd "$WORK" # never the repository root: its bio_transformations/ lacks kernels/

: >"$OUT/steps.tsv"
record() { # name status seconds detail
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$OUT/steps.tsv"
    printf '==> %-12s %s (%s s) %s\n' "$1" "$2" "$3" "$4"
}
summary() { timeout -k 5 30 "$PY" "$REPO/benchmarks/gpu_check.py" summary "$OUT" >/dev/null || true; }

# 1. environment ---------------------------------------------------------------------------------
echo "==> environment"
if ! DRY=$DRY "$PY" - >"$OUT/env.txt" 2>&1 <<'EOF'; then
import os, platform, sys
import torch
import bio_transformations
from bio_transformations import kernels
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = None
print("python", platform.python_version(), "| torch", torch.__version__, "| triton", tv)
print("package", bio_transformations.__file__)
print("cuda", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("triton backend imports:", kernels.triton_available(), "| dry run:", os.environ["DRY"] == "1")
if os.environ["DRY"] == "1":
    sys.exit(0)
sys.exit(0 if torch.cuda.is_available() and kernels.triton_available() else 3)
EOF
    cat "$OUT/env.txt"
    record environment fail 0 "no CUDA device, or torch/triton/the package does not import"
    summary
    exit 2
fi
cat "$OUT/env.txt"
command -v nvidia-smi >/dev/null && nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
record environment pass $((SECONDS - START)) "$(head -n 1 "$OUT/env.txt")"

FAILED=0

# 2. checks, then timings by priority -------------------------------------------------------------
# Leaves 90 s for the compiled tests and the summary (20 s in a dry run).
reserve=$([[ $DRY -eq 1 ]] && echo 20 || echo 90)
budget=$(($(remaining) - reserve))
echo "==> gpu_check.py run (deadline ${budget} s)"
t0=$SECONDS
rc=0
args=(run "$OUT" --budget "$budget")
[[ $DRY -eq 1 ]] && args+=(--dry-run)
timeout -k 10 $((budget + 20)) "$PY" "$REPO/benchmarks/gpu_check.py" "${args[@]}" 2>&1 |
    tee "$OUT/run.log" || rc=${PIPESTATUS[0]}
if [[ $rc -eq 0 ]]; then
    record run pass $((SECONDS - t0)) "checks.json, results.jsonl"
else
    record run fail $((SECONDS - t0)) "exit $rc (124: killed at the deadline); see run.log"
    FAILED=1
fi

# 3. agreement and switch tests, compiled, with the time left -------------------------------------
left=$(($(remaining) - 15))
if [[ $DRY -eq 1 ]]; then
    record agreement skip 0 "dry run (the test suite runs these in the interpreter)"
elif [[ $left -lt 45 ]]; then
    record agreement skip 0 "only ${left} s left"
else
    echo "==> agreement tests (compiled kernels on cuda tensors, at most ${left} s)"
    t0=$SECONDS
    rc=0
    timeout -k 5 "$left" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -ra -x \
        "$REPO/tests/test_backend_agreement.py" "$REPO/tests/test_backend_switch.py" \
        --junitxml "$OUT/agreement.xml" 2>&1 | tee "$OUT/agreement.log" || rc=${PIPESTATUS[0]}
    last="$(grep -E '(passed|failed|error)' "$OUT/agreement.log" | tail -n 1 || true)"
    if [[ $rc -eq 0 ]]; then
        record agreement pass $((SECONDS - t0)) "$last"
    elif [[ $rc -eq 124 ]]; then # out of time: informative, the in-process agreement check ran
        record agreement timeout $((SECONDS - t0)) "stopped after ${left} s; $last"
    else
        record agreement fail $((SECONDS - t0)) "exit $rc: $last"
        FAILED=1
    fi
fi

# 4. summary -------------------------------------------------------------------------------------
echo "==> summary ($((SECONDS - START)) s in all)"
"$PY" "$REPO/benchmarks/gpu_check.py" summary "$OUT" || FAILED=1
exit $FAILED
