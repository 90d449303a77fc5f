#!/usr/bin/env bash
# Every kernel family's GPU check and timing in one device call: one lane per GPU, lanes in parallel.
#
#   bash benchmarks/gpu_all.sh OUT_DIR [SECONDS]      # repo root, on the GPU machine; SECONDS: wall budget (540)
#   LANE_GPUS=2 bash benchmarks/gpu_all.sh ...        # use GPUs 0 and 1 only (the others left to other work)
#   ONLY="0 1" bash benchmarks/gpu_all.sh ...         # run only these lanes (indices into LANES)
#   LA_BENCH_ARGS="--lengths 8192 --methods hhfft fla" ...   # extra arguments of the linear-attention benchmark
#   PROFILE_ARGS="--cases fft-16384" ...              # extra arguments of benchmarks/profile_kernels.py
#
# Lanes: 0 linear-attention, decode and AdaHessian (step and peak-memory) tests; 1 linear_attention.py; 2 the 16K demo and adahessian.py;
# 3 converted-model and fftconv tests; 4 profile_kernels.py (per-kernel times); 5 fftconv.py (the headline table).
#
# Each lane runs its commands in order, each under `timeout` (its own limit, cut to what is left of the budget),
# and logs to OUT_DIR/work/laneN.log; everything ends packed in OUT_DIR/gpu_all.tgz (the device tool returns at most
# 8 files). Lanes share GPUs round robin when there are fewer GPUs than lanes (then they run one after another).
# Optional wheels (fla-core, pytorch_optimizer) are installed from .whl/ when present.
set -u
out=${1:?usage: gpu_all.sh OUT_DIR [SECONDS]}
budget=${2:-540}
start=$(date +%s)
work=$out/work
mkdir -p "$work"
export PYTHONUNBUFFERED=1 LA_BENCH_ARGS=${LA_BENCH_ARGS:-} PROFILE_ARGS=${PROFILE_ARGS:-}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=.:tests:/tmp/site
else
  export PYTHONPATH=.:tests
fi
{ nvidia-smi -L; python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
  git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20; } >"$work/env.txt" 2>&1
gpus=${LANE_GPUS:-$(nvidia-smi -L | wc -l)}

# tests compile many shapes and time nothing: one Triton config per kernel; the benchmarks autotune, as users do
PYTEST="HHFFT_TRITON_AUTOTUNE=0 python3 -m pytest -v --tb=short -p no:cacheprovider -m gpu"
LANES=(
  "240|$PYTEST -n 12 --dist loadgroup tests/gpu/test_linear_attention_gpu.py;;120|$PYTEST -n 8 tests/gpu/test_decode_gpu.py;;120|$PYTEST tests/gpu/test_adahessian_cuda.py tests/gpu/test_adahessian_memory_gpu.py"
  "480|python3 benchmarks/linear_attention.py --out $work/la_bench --method-timeout 150 --graphs $LA_BENCH_ARGS"
  "270|python3 -m hhfft.cli demo --device cuda --length 16384 --batch 1 --amp bf16 --steps 10 --modes default reduce-overhead;;290|python3 benchmarks/adahessian.py --out $work/adahessian --budget-s 400"
  "150|$PYTEST -n 3 tests/gpu/test_converted_models_gpu.py;;300|$PYTEST -n 8 tests/gpu/test_fftconv_gpu.py"
  "300|python3 benchmarks/profile_kernels.py --out $work/profile $PROFILE_ARGS"
  "300|python3 benchmarks/fftconv.py --out $work/fftconv"
)

lane() {  # lane INDEX GPU "limit|command;;limit|command..."
  local i=$1 gpu=$2 spec=$3 item limit cmd left
  local IFS=$'\n'
  for item in $(printf '%s\n' "$spec" | sed 's/;;/\n/g'); do
    limit=${item%%|*}; cmd=${item#*|}
    left=$((budget - ($(date +%s) - start)))
    [ "$left" -lt "$limit" ] && limit=$left
    [ "$limit" -le 5 ] && { echo "### skipped (no time left): $cmd"; continue; }
    echo "### GPU $gpu, limit ${limit}s: $cmd"
    CUDA_VISIBLE_DEVICES=$gpu timeout -k 5 "$limit" bash -c "$cmd"
    echo "### exit $? after $(( $(date +%s) - start ))s"
  done >>"$work/lane$i.log" 2>&1
}

only=" ${ONLY:-${!LANES[*]}} "
for g in $(seq 0 $((gpus - 1))); do
  (for i in "${!LANES[@]}"; do
     [ $((i % gpus)) -eq "$g" ] && [[ "$only" == *" $i "* ]] && lane "$i" "$g" "${LANES[$i]}"
   done) &
done
wait
tail -n 3 "$work"/lane*.log
tar czf "$out/gpu_all.tgz" -C "$work" .
