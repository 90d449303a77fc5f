#!/usr/bin/env bash
# Issue #8, seventh run (prepared, not yet run): what run 6 could not finish, on ONE GPU, two lanes sharing it.
# The pure-Hedgehog fine-tuning row beside the hybrid in the same run, other windows, and a second seed of the
# window-64 rows.
#
#   bash benchmarks/gpt_conversion/run7.sh RUNS [SECONDS]     # repo root, .data/pydocs carried; SECONDS: budget (560)
#
# Same budgets, rates and distillation as runs 4 and 6 (fine-tuning at lr 1e-3). Rows in order of importance; a row
# that would start after the budget is skipped.
source "$(dirname "$0")/lanes.sh" "$@"

(row 0 scratch_softmax train $SCRATCH --attention softmax --save-dtype float16
 row 0 ft_softmax_lr1e-3 finetune $FT --attention softmax --lr 1e-3
 row 0 ft_hedgehog_w16_lr1e-3 finetune $FT --attention hedgehog $DIST --lr 1e-3 --window 16
 row 0 ft_softmax_lr1e-3_s1 finetune $FT --attention softmax --lr 1e-3 --seed 1
 row 0 scratch_hedgehog_w16 train $SCRATCH --attention hedgehog --window 16) &
(wait_ckpt; row 0 ft_hedgehog_lr1e-3 finetune $FT --attention hedgehog $DIST --lr 1e-3
 row 0 ft_hedgehog_w128_lr1e-3 finetune $FT --attention hedgehog $DIST --lr 1e-3 --window 128
 row 0 ft_hedgehog_w64_lr1e-3_s1 finetune $FT --attention hedgehog $DIST --lr 1e-3 --window 64 --seed 1) &
wait
pack
