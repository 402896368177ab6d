#!/bin/bash
# Everything issue 5 needs from a GPU, in one device call (at most 9.5 minutes; stages have their own limits). First, here:
#   bash tests/bench/gpu_wheels.sh
# then, with the device tool:  run(command="bash tests/bench/gpu_check.sh", carry=[".whl"], timeout_s=590)
# Logs come back in $OUT: env.txt, pytest.log, bench_train.log (images/s b1/b2/b4 for ref/eager/fast/graph, peak
# memory, syncs under set_sync_debug_mode, 50-step weight match), bench_job.log (reference job, memory jobs).
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/lora-studio-gpu-out}
Q=${QUICK:+--quick --device cpu}  # QUICK=1: the same script as a CPU smoke run (tiny models)
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheels missing: run tests/bench/gpu_wheels.sh first and carry .whl"; exit 1; }
export PYTHONPATH=/tmp/site
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    python3 -c "import sys, torch, transformers, numpy; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| numpy', numpy.__version__)"
    git log -1 --format='commit %h %s' 2>/dev/null
} 2>&1 | tee "$OUT/env.txt"
t0=$(date +%s)
stage() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stage "bench_train: steps per second, memory, syncs, weights"
timeout 200 python3 tests/bench/bench_train.py --capture --match $Q 2>&1 | grep -v "Warning" \
    | tee "$OUT/bench_train.log"
stage "bench_job: reference job, memory"
timeout 260 python3 tests/bench/bench_job.py $Q 2>&1 | grep -v "Warning" | tee "$OUT/bench_job.log"
stage "pytest: CUDA tests"
timeout 90 python3 -m pytest -q -x tests/test_train_fastpath.py tests/test_apply_patcher.py -k cuda 2>&1 \
    | tail -25 | tee "$OUT/pytest.log"
stage "done"
