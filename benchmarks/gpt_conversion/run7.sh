#!/usr/bin/env bash
# Issue #8, seventh run (ran 2026-12-08: run7/ and RESULTS.md): a wider window (128 bytes, about 30 BPE tokens:
# LoLCATs uses 64 tokens) fine-tuned and from scratch, and the pure-Hedgehog fine-tuning row beside them in the same
# run, on ONE GPU (two lanes share it; rows are compared on tokens, not time).
#
#   bash benchmarks/gpt_conversion/run7.sh RUNS [SECONDS]     # repo root, .data/pydocs carried; SECONDS: budget (560)
#
# Same budgets, rates, distillation and seed as runs 4 and 6 (fine-tuning at lr 1e-3). Rows in order of importance;
# a row that would start after the budget is skipped.
source "$(dirname "$0")/lanes.sh" "$@"

(row 0 scratch_softmax train $SCRATCH --attention softmax --save-dtype float16
 row 0 ft_softmax_lr1e-3 finetune $FT --attention softmax --lr 1e-3
 row 0 ft_hedgehog_w128_lr1e-3 finetune $FT --attention hedgehog $DIST --lr 1e-3 --window 128) &
(row 0 scratch_hedgehog_w128 train $SCRATCH --attention hedgehog --window 128
 wait_ckpt; row 0 ft_hedgehog_lr1e-3 finetune $FT --attention hedgehog $DIST --lr 1e-3) &
wait
pack
