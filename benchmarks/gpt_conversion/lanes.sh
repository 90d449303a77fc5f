# Shared by run3.sh and run4.sh: schedule `hhfft gpt` rows on the GPUs of one host under a wall-clock budget.
# The caller sets runs, budget, start and GPT.
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

