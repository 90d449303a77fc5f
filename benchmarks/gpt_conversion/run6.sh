#!/usr/bin/env bash
# Issue #8, sixth run: the LoLCATs hybrid (HedgehogConfig(window=W): softmax over the last W bytes, Hedgehog beyond),
# fine-tuned from a fresh softmax checkpoint and trained from scratch, beside the softmax and pure-Hedgehog rows of
# the same run, on ONE GPU (two lanes share it; rows are compared on tokens, not time).
#
#   bash benchmarks/gpt_conversion/run6.sh RUNS [SECONDS]     # repo root, .data/pydocs carried; SECONDS: budget (560)
#
# Same budgets, rates and distillation as run 4 (fine-tuning at lr 1e-3, seed 0). Rows in order of importance: a row
# that would start after the budget is skipped. Table: the rows' result.json (val_ppl) against ft_softmax_lr1e-3 and
# scratch_softmax of this run.
source "$(dirname "$0")/lanes.sh" "$@"

(row 0 scratch_softmax train $SCRATCH --attention softmax --save-dtype float16
 row 0 ft_softmax_lr1e-3 finetune $FT --attention softmax --lr 1e-3
 row 0 scratch_hedgehog_w64 train $SCRATCH --attention hedgehog --window 64
 row 0 scratch_hedgehog_w16 train $SCRATCH --attention hedgehog --window 16) &
(wait_ckpt; row 0 ft_hedgehog_w64_lr1e-3 finetune $FT --attention hedgehog $DIST --lr 1e-3 --window 64
 row 0 ft_hedgehog_lr1e-3 finetune $FT --attention hedgehog $DIST --lr 1e-3
 row 0 ft_hedgehog_w16_lr1e-3 finetune $FT --attention hedgehog $DIST --lr 1e-3 --window 16) &
wait
pack
