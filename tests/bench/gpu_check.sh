#!/bin/bash
# Everything issue 5 needs from a GPU, in one device call (at most 9.5 minutes; stages have their own limits). First, here:
#   bash tests/bench/gpu_wheels.sh
# then, with the device tool:  run(command="bash tests/bench/gpu_check.sh", carry=[".whl"], timeout_s=590)
# Logs come back in $OUT: env.txt, bench_train.log (images/s b1/b2/b4 for ref/fast/graph, peak
# memory, syncs under set_sync_debug_mode, 50-step weight match), bench_job.log (reference job, memory jobs),
# bench_compile.log (torch.compile + graphs at batch 4), pytest.log.
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
BUDGET=${BUDGET:-560}  # seconds for all stages: the device call is limited to 600
stage() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
left() { local l=$(( BUDGET - ($(date +%s) - t0) )); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
stage "bench_train: images/s b1 b2 b4 (plain reference, fast, CUDA graphs), peak memory, syncs, 50-step weights"
timeout "$(left 150)" python3 tests/bench/bench_train.py --modes fast,graph --match $Q 2>&1 | grep -v "Warning" \
    | tee "$OUT/bench_train.log"
stage "bench_job: the seed's reference job end to end, memory jobs"
timeout "$(left 200)" python3 tests/bench/bench_job.py $Q 2>&1 | grep -v "Warning" | tee "$OUT/bench_job.log"
stage "bench_train: torch.compile + CUDA graphs at batch 4 (cold compile)"
timeout "$(left 200)" python3 tests/bench/bench_train.py --modes fast,cgraph --batches 4 \
    ${QUICK:+--compile-backend aot_eager --modes fast,compile} $Q 2>&1 | grep -v "Warning" | tee "$OUT/bench_compile.log"
stage "pytest: the CUDA tests"
timeout "$(left 90)" python3 -m pytest -q -x tests/test_train_fastpath.py tests/test_apply_patcher.py -k cuda 2>&1 \
    | tail -25 | tee "$OUT/pytest.log"
stage "done"
