#!/usr/bin/env bash
# Every GPU check of docs/benchmarks.md in one run, for a short lease of a GPU machine.
#
# Usage (from the repository root; the machine needs torch, numpy, scipy, h5py,
# scikit-image and pytest, not Flower):
#
#   OUT=/path/to/logs BUDGET=330 bash benchmarks/gpu_checks.sh
#
# Steps, most important first; each runs under its own time limit and is skipped when
# less than that limit is left of BUDGET seconds, so the script ends inside the budget:
#
#   env          device, driver, versions
#   tests        pytest test/test_cuda_equivalence.py test/test_speed.py
#   faz          FedICRA step, faz 256x256, batch 12, float32, with the sequential
#                reference design and the 5-client round of 10 iterations each
#   losses       bench_losses on the GPU (tree loss against the U-Net, both designs)
#   faz_amp      the same step under bf16 autocast, with the amp agreement check
#   odoc         the fundus size, 384x384x3, batch 12
#   layout       channels-last, then torch.compile (tensor path only)
#
# Each step writes OUT/<step>.log (at most 7 files). STEPS="faz losses" runs only the steps
# named. QUICK=1 runs the same steps at toy sizes on the CPU, to check the script itself
# without a GPU (test/test_gpu_checks.py does).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-results/gpu_checks}
BUDGET=${BUDGET:-330}
PY=${PYTHON:-python3}
QUICK=${QUICK:-0}
STEPS=${STEPS:-tests faz losses faz_amp odoc layout}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if [[ "$QUICK" == 1 ]]; then
    TRAIN="--device cpu --size 32 --batch 2 --steps 1 --warmup 0 --breakdown-steps 1 --cases 2 --round-iters 1"
    ROUND="--clients 2"
    LOSSES="--device cpu --quick --rows loss --tree-stats 0"
    TESTS="test/test_cuda_equivalence.py"
else
    TRAIN="--device cuda --batch 12"
    ROUND=""
    LOSSES="--device cuda --repeats 5"
    TESTS="test/test_cuda_equivalence.py test/test_speed.py"
fi

# step NAME LIMIT_SECONDS COMMAND...
step() {
    local name=$1 limit=$2
    shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    local left=$((BUDGET - SECONDS))
    if ((left < limit)); then
        echo "== $name: skipped ($left s left of the budget, needs $limit)" | tee -a "$OUT/summary.log"
        return
    fi
    echo "== $name: $* (limit $limit s)" | tee -a "$OUT/summary.log"
    local start=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc $rc, $((SECONDS - start)) s" | tee -a "$OUT/summary.log"
    tail -n 40 "$OUT/$name.log"
}

: >"$OUT/summary.log"
{
    date -u
    git rev-parse HEAD 2>/dev/null || true
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import sys, torch, numpy, scipy; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__, 'scipy', scipy.__version__); print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu only')"
    nproc
} >>"$OUT/summary.log" 2>&1
cat "$OUT/summary.log"

step tests 90 "$PY" -m pytest -q -p no:cacheprovider $TESTS
# shellcheck disable=SC2086  # the flag strings are meant to split
step faz 150 "$PY" -m benchmarks.bench_train_step --task faz $TRAIN $ROUND
step losses 90 "$PY" -m benchmarks.bench_losses $LOSSES
step faz_amp 45 "$PY" -m benchmarks.bench_train_step --task faz $TRAIN --amp --no-reference --clients 0
step odoc 90 "$PY" -m benchmarks.bench_train_step --task odoc $TRAIN --no-reference $ROUND
step layout 120 bash -c "$PY -m benchmarks.bench_train_step --task faz $TRAIN --no-reference --clients 0 --channels-last && $PY -m benchmarks.bench_train_step --task faz $TRAIN --no-reference --clients 0 --compile"
echo "== done in $SECONDS s" | tee -a "$OUT/summary.log"
