# Sourced by run3.sh, run4.sh and run5.sh with their arguments (RUNS [SECONDS]): the common set-up and the helpers
# that schedule `hhfft gpt` rows on the GPUs of one host under a wall-clock budget.
set -u
runs=${1:?usage: run<N>.sh RUNS [SECONDS]}
budget=${2:-560}
start=$(date +%s)
mkdir -p "$runs"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
GPT="python3 -m hhfft.cli gpt"
D=".data/pydocs"
SCRATCH="--data $D --seed 0 --tokens 54460416"
FT="--data $D --seed 0 --init $runs/scratch_softmax --tokens 69664768"
DIST="--distill-steps 1000 --distill-context 1024"

row() {  # row GPU NAME ARGS...: run one row under what is left of the budget
  local gpu=$1 name=$2; shift 2
  local left=$((budget - ($(date +%s) - start)))
  [ "$left" -le 10 ] && { echo "[$name] skipped: no time left"; return; }
  echo "[$name] $GPT $* --out $runs/$name   (GPU $gpu, limit ${left}s)"
  CUDA_VISIBLE_DEVICES=$gpu timeout -k 5 "$left" $GPT "$@" --out "$runs/$name" >"$runs/$name.log" 2>&1
  echo "[$name] exit $? after $(( $(date +%s) - start ))s"
}
wait_ckpt() {  # until the softmax checkpoint exists, or the budget is gone
  while [ ! -f "$runs/scratch_softmax/result.json" ] && [ $(($(date +%s) - start)) -lt "$budget" ]; do sleep 2; done
}
pack() {  # RUNS.tgz beside RUNS: logs and results, no weights
  tar czf "$runs.tgz" --exclude='*.safetensors' -C "$(dirname "$runs")" "$(basename "$runs")"
}
