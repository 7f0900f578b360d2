#!/usr/bin/env bash
# Every GPU check of this repository in one call, for a short lease on a CUDA machine.
#
#   here (CPU), once:  python bench/bench_plaid_gpu.py prepare --dataset scifact --out bench/.gpu/scifact
#   there:             OUT=/some/dir bash bench/run_gpu.sh [SECONDS]
#
# Steps, most wanted first, each cut off so that the whole stays inside SECONDS (default 500):
#   1. bench_codes_gpu.py    stage 4 scored from codes vs decompress + MaxSim (synthetic store)
#   2. bench_plaid_gpu.py    PLAID search on SciFact, GPU (fused and decompressing stage 4) and CPU
#   3. pytest on CUDA        the Triton kernels compiled (tests/test_kernel_codes.py, test_kernels.py)
#   4. bench_maxsim_gpu.py   the MaxSim kernels against naive torch and the copy bandwidth
# The machine may lack faiss (the product codec's k-means needs it): a file .whl/faiss.tar.xz
# (an unpacked faiss-cpu wheel, tar + xz) is unpacked into /tmp/site and put on PYTHONPATH.
# Output under $OUT: one log and the JSON files the benches wrote (plots are drawn afterwards).
set -u
OUT=${OUT:-/tmp/colengine-gpu}
mkdir -p "$OUT"
BUDGET=${1:-500}
START=$(date +%s)
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG="$OUT/run_gpu.log"
touch /tmp/run_gpu.marker
mkdir -p /tmp/site
if [ -f .whl/faiss.tar.xz ]; then tar -xJf .whl/faiss.tar.xz -C /tmp/site; fi
# colengine as installed (kernels/ becomes colengine.kernels) without pip: a copy on PYTHONPATH
rm -rf /tmp/site/colengine && cp -r colengine /tmp/site/colengine && cp -r kernels /tmp/site/colengine/kernels
export PYTHONPATH=/tmp/site
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton, numpy, faiss; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'faiss', faiss.__version__)"
  git rev-parse --short HEAD 2>/dev/null
} >>"$LOG" 2>&1

step() {   # step NAME MAX_SECONDS COMMAND...
  local name=$1 lim=$2 left; shift 2
  left=$(( BUDGET - ($(date +%s) - START) ))
  (( lim > left )) && lim=$left
  if (( lim < 20 )); then echo "== $name: skipped, ${left}s left" | tee -a "$LOG"; return; fi
  echo "== $name (limit ${lim}s): $*" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout "$lim" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
  find bench/results -name '*.json' -newer /tmp/run_gpu.marker -exec cp {} "$OUT"/ \;
}

step codes 120 $PY bench/bench_codes_gpu.py
step plaid 240 $PY bench/bench_plaid_gpu.py run --data bench/.gpu/scifact --stage4 fused,decompress \
  --cpu-settings default --repeats 2 --single 50
step tests 150 env COLENGINE_TEST_DEVICE=cuda $PY -P -m pytest -q -p no:cacheprovider \
  tests/test_kernel_codes.py tests/test_kernels.py
step maxsim 200 $PY bench/bench_maxsim_gpu.py --compile-mode default
grep -E "^== |passed|failed|error|Error|^\{" "$LOG" | tail -n 60
