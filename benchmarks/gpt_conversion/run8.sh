#!/usr/bin/env bash
# Issue #8, eighth run (prepared, not yet run): run 7's 128-byte window fine-tuned again on a fresh checkpoint (its
# +2.95% was 0.05 points inside the target), beside 1+ELU with the same window (does Hedgehog's map still matter
# when the window carries the near keys?), and the softmax fine-tuning of seed 1 for the seed that follows. ONE GPU,
# two lanes sharing it (rows compared on tokens, not time).
#
#   bash benchmarks/gpt_conversion/run8.sh RUNS [SECONDS]     # repo root, .data/pydocs carried; SECONDS: budget (560)
#
# Same budgets, rates, distillation and seed as runs 4, 6 and 7 (fine-tuning at lr 1e-3). Table:
# hhfft gpt table --runs RUNS --suffix _lr1e-3
source "$(dirname "$0")/lanes.sh" "$@"

(row 0 scratch_softmax train $SCRATCH --attention softmax --save-dtype float16
 row 0 ft_softmax_lr1e-3 finetune $FT --attention softmax --lr 1e-3
 row 0 ft_elu1_w128_lr1e-3 finetune $FT --attention elu1 $DIST --lr 1e-3 --window 128) &
(wait_ckpt; row 0 ft_hedgehog_w128_lr1e-3 finetune $FT --attention hedgehog $DIST --lr 1e-3 --window 128
 row 0 ft_softmax_lr1e-3_s1 finetune $FT --attention softmax --lr 1e-3 --seed 1) &
wait
pack
