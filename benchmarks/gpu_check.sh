#!/usr/bin/env bash
# GPU readiness check: the CUDA-only tests and the quick benchmark, in under 5 minutes.
#
#     bash benchmarks/gpu_check.sh            # from the repository root, on a CUDA machine
#
# Installs nothing (the GPU machine may have no network): it runs against the torch and
# transformers already installed, with this checkout's src/ first on PYTHONPATH. Backends
# that are not installed (flash-attn) are skipped by the tests and left out of the table.
# Writes benchmarks/results-gpu.md (and .json); exits non-zero if a test or the benchmark fails.
set -uo pipefail

cd "$(dirname "$0")/.."
# The interpreter: $PYTHON, else the first of python3 / python / .venv/bin/python whose torch sees CUDA.
if [ -z "${PYTHON:-}" ]; then
    for candidate in python3 python .venv/bin/python; do
        if "$candidate" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
            PYTHON="$candidate"
            break
        fi
    done
fi
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results-gpu.md}"
BUDGET="${BUDGET:-290}"   # seconds for everything; each step gets what is left
start=$(date +%s)
left() { local l=$(( BUDGET - ($(date +%s) - start) )); echo $(( l > 30 ? l : 30 )); }

echo "== GPU"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
    echo "nvidia-smi not found"
fi
"$PYTHON" - <<'PY' || { echo "FAIL: torch sees no CUDA device"; exit 2; }
import sys, torch, transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}")
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print("device:", torch.cuda.get_device_name())
try:
    import flash_attn
    print("flash-attn", flash_attn.__version__)
except ImportError:
    print("flash-attn not installed: its backend is skipped")
try:
    from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    print("torch.nn.attention.varlen available")
except ImportError:
    print("torch.nn.attention.varlen not available in this torch")
PY

status=0
echo "== pytest -m gpu"
# Only the files that hold gpu tests: the others may import packages (hypothesis, peft) that
# a bare GPU machine lacks, and a collection error there would hide the GPU results.
gpu_files=$(grep -l "mark.gpu" tests/test_*.py 2>/dev/null | tr '\n' ' ')
if ! "$PYTHON" -c "import pytest" >/dev/null 2>&1; then
    echo "FAIL: pytest is not installed for $PYTHON"
    status=1
elif [ -z "$gpu_files" ]; then
    echo "WARNING: no test is marked gpu"
else
    echo "files: $gpu_files"
    # shellcheck disable=SC2086
    timeout "$(( $(left) / 2 ))" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider $gpu_files
    rc=$?
    if [ $rc -eq 5 ]; then
        echo "WARNING: no test is marked gpu"
    elif [ $rc -ne 0 ]; then
        echo "FAIL: gpu tests (exit $rc)"
        status=1
    fi
fi

echo "== benchmark (--quick --device cuda)"
if ! timeout "$(left)" "$PYTHON" benchmarks/bench.py --quick --device cuda --out "$OUT"; then
    echo "FAIL: benchmark"
    status=1
fi

# --- chunked loss head (issue 11, section 2) -----------------------------------------------
# Its own block, independent of the ones above: the gpu tests of the chunked head (fp32 and
# bf16 autocast against the plain head) and its benchmark at the issue's size (16,384 tokens,
# hidden 1,024, vocabulary 151,936, fp32), then the same under bf16 autocast.
echo "== chunked loss head: gpu tests"
if ! timeout 300 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/test_loss_head_gpu.py; then
    echo "FAIL: chunked loss head gpu tests"
    status=1
fi
echo "== chunked loss head: benchmark (--device cuda)"
if ! timeout 300 "$PYTHON" benchmarks/bench_loss_head.py --device cuda --out benchmarks/results-loss-head-gpu.md \
        || ! timeout 300 "$PYTHON" benchmarks/bench_loss_head.py --device cuda --autocast; then
    echo "FAIL: chunked loss head benchmark"
    status=1
fi

echo "== done in $(( $(date +%s) - start )) s, status $status"
exit $status
