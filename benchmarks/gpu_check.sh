#!/usr/bin/env bash
# GPU check: the CUDA tests (kernels, tiny models, `packtune train` on every engine) and the
# quick benchmark, within 5 minutes on one GPU.
#
#     bash benchmarks/gpu_check.sh            # from anywhere in this checkout, on a CUDA machine
#
# Needs no network and installs nothing: it runs against the torch and transformers already
# there, with this checkout's src/ first on PYTHONPATH. When that Python has no pytest, the
# pure-Python wheels carried in benchmarks/wheels/ (pytest and its dependencies) are unpacked
# into a temporary folder put on PYTHONPATH. Optional packages that are missing (flash-attn,
# DeepSpeed, bitsandbytes) skip their parts, each with a line saying so.
#
# Results are written as they come, so a timeout keeps what finished:
#   benchmarks/results-gpu-tests.txt   one line per test (pytest -v), then pytest's summary
#   benchmarks/results-gpu.md          the benchmark table, row by row (.json at the end)
# Exits non-zero if a test or the benchmark fails (or runs out of its time).
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
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT="${OUT:-benchmarks/results-gpu.md}"
TESTS_OUT="${TESTS_OUT:-benchmarks/results-gpu-tests.txt}"
BUDGET="${BUDGET:-290}"         # seconds for everything
BENCH_MIN="${BENCH_MIN:-75}"    # seconds kept for the benchmark whatever the tests took
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
left() { local l=$(( BUDGET - $(elapsed) )); echo $(( l > 20 ? l : 20 )); }

echo "== GPU"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
else
    echo "nvidia-smi not found"
fi
"$PYTHON" - <<'PY' || { echo "FAIL: torch sees no CUDA device"; exit 2; }
import importlib.util, sys, torch, transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}")
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
major, minor = torch.cuda.get_device_capability()
print(f"device: {torch.cuda.get_device_name()}, compute capability {major}.{minor}, "
      f"native bf16 {torch.cuda.is_bf16_supported(including_emulation=False)}")
try:
    from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    print("torch.nn.attention.varlen: available")
except ImportError:
    print("torch.nn.attention.varlen: not in this torch (the torch backend's tests are skipped)")
for name, what in (("flash_attn", "the flash_attn backend"), ("deepspeed", "the ZeRO-2 run"),
                   ("bitsandbytes", "the QLoRA run"), ("peft", "the LoRA runs")):
    found = importlib.util.find_spec(name) is not None
    print(f"{name}: {'installed' if found else f'not installed ({what} is skipped)'}")
PY

status=0
echo "== pytest"
if ! "$PYTHON" -c "import pytest" >/dev/null 2>&1; then
    carried="$(mktemp -d)"
    trap 'rm -rf "$carried"' EXIT
    "$PYTHON" - "$carried" benchmarks/wheels/*.whl <<'PY'
import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
PY
    export PYTHONPATH="$PYTHONPATH:$carried"
    echo "no pytest for $PYTHON: using the carried wheels ($(ls benchmarks/wheels | tr '\n' ' '))"
fi
if ! "$PYTHON" -c "import pytest; print('pytest', pytest.__version__)"; then
    echo "FAIL: pytest cannot be imported, even from benchmarks/wheels"
    status=1
else
    # Only the files that hold gpu tests: the others may import packages (hypothesis,
    # DeepSpeed) that a bare GPU machine lacks, and a collection error would hide the results.
    gpu_files=$(grep -l "pytest.mark.gpu" tests/test_*.py 2>/dev/null | tr '\n' ' ')
    echo "files: $gpu_files"
    : > "$TESTS_OUT"
    test_budget=$(( $(left) - BENCH_MIN ))
    # shellcheck disable=SC2086
    timeout --kill-after=10 "$(( test_budget > 60 ? test_budget : 60 ))" \
        "$PYTHON" -m pytest -v -rs --tb=short -m gpu -p no:cacheprovider --durations=10 $gpu_files 2>&1 | tee -a "$TESTS_OUT"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "FAIL: the gpu tests ran out of time after $(elapsed) s (finished lines are in $TESTS_OUT)" | tee -a "$TESTS_OUT"
        status=1
    elif [ "$rc" -eq 5 ]; then
        echo "FAIL: no test is marked gpu"
        status=1
    elif [ "$rc" -ne 0 ]; then
        echo "FAIL: gpu tests (exit $rc)"
        status=1
    fi
fi

echo "== benchmark (--quick --device cuda), $(left) s left"
timeout --kill-after=10 "$(left)" "$PYTHON" benchmarks/bench.py --quick --device cuda --out "$OUT"
rc=$?
if [ "$rc" -ne 0 ]; then
    echo "FAIL: benchmark (exit $rc; rows that finished are in $OUT)"
    status=1
fi

# Sequence parallelism (issue 11): its gpu tests (the all-to-alls on NCCL) ran above with the
# other gpu-marked files; here bench_sp.py on CUDA with the sp sizes the cards allow.
echo "== sequence-parallel benchmark, $(left) s left"
cards=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
sp_sizes="1"
[ "$cards" -ge 2 ] && sp_sizes="1 2"
[ "$cards" -ge 4 ] && sp_sizes="1 2 4"
# shellcheck disable=SC2086
if ! timeout --kill-after=10 "$(left)" "$PYTHON" benchmarks/bench_sp.py --device cuda --sizes $sp_sizes --repeats 2 --out benchmarks/results-sp-gpu.md; then
    echo "FAIL: bench_sp.py"
    status=1
fi

# Chunked loss head (issue 11): its gpu tests ran above with the other gpu-marked files; here its
# benchmark at the issue's size (16,384 tokens, hidden 1,024, vocabulary 151,936), fp32 then bf16.
echo "== chunked loss head benchmark, $(left) s left"
if ! timeout --kill-after=10 "$(left)" "$PYTHON" benchmarks/bench_loss_head.py --device cuda --out benchmarks/results-loss-head-gpu.md \
        || ! timeout --kill-after=10 "$(left)" "$PYTHON" benchmarks/bench_loss_head.py --device cuda --autocast; then
    echo "FAIL: chunked loss head benchmark"
    status=1
fi

echo "== done in $(elapsed) s, status $status"
exit $status
