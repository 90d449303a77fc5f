#!/usr/bin/env bash
# fftconv on one GPU in one device call: every GPU test of the op, then the timings that decide its defaults, then
# the headline table. Each step under its own time limit; logs and JSON under OUT_DIR.
#
#   bash benchmarks/fftconv_check.sh OUT_DIR      # repo root, on the GPU machine (about 9 minutes on an H100)
#
# 1. tests/gpu/test_fftconv_gpu.py (NaN-poisoned, against fp64 by the 2x rule)
# 2. fftconv_tune.py --four-step: three kernels vs the persistent kernel at 128K-512K; the nested path at 1M and 4M
# 3. fftconv_tune.py --dv-dk: fftconv_dv_dk (du and dk sharing g's transforms) vs the two separate calls
# 4. fftconv.py: the table of benchmarks/RESULTS.md (torch reference, inductor, hhfft; fwd and fwd+bwd; memory)
# 5. fftconv.py --scratch-mb 0 at 4K, 16K, 256K: the whole batch through one scratch (before the batch slices), to
#    weigh the slices' peak memory against their time
set -u
out=${1:?usage: fftconv_check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=.:tests
{ nvidia-smi -L; python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
  git rev-parse HEAD 2>/dev/null; } >"$out/env.txt" 2>&1
step() {  # step LIMIT NAME COMMAND...
  local limit=$1 name=$2; shift 2
  echo "### $name (limit ${limit}s): $*"
  timeout -k 5 "$limit" "$@" >"$out/$name.log" 2>&1
  echo "### $name: exit $?"
  tail -n 25 "$out/$name.log"
}
step 180 tests env HHFFT_TRITON_AUTOTUNE=0 python3 -m pytest -q -m gpu -n 6 tests/gpu/test_fftconv_gpu.py
step 80 four_step python3 benchmarks/fftconv_tune.py --four-step --lengths 65536 131072 262144 1048576 4194304 \
  --out "$out"
step 80 dv_dk python3 benchmarks/fftconv_tune.py --dv-dk --lengths 256 1024 4096 16384 65536 --out "$out"
step 190 table python3 benchmarks/fftconv.py --out "$out"
step 50 whole_batch_scratch python3 benchmarks/fftconv.py --lengths 4096 16384 262144 --no-inductor --scratch-mb 0 \
  --out "$out/whole_batch_scratch"
