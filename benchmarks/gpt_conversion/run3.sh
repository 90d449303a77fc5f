#!/usr/bin/env bash
# Issue #8, third run: every row with fixed token budgets on a 4-GPU host (one row per GPU at a time), with 1000-step
# distillation at the full context (run 1 had 150 steps at 512) and a fine-tuning learning-rate variant.
#
#   bash benchmarks/gpt_conversion/run3.sh RUNS [SECONDS]     # repo root, .data/pydocs carried; SECONDS: budget (560)
#
# Each line below is one row's whole command (`hhfft gpt ...`, its seed in it); the lanes only schedule them. Rows
# that need the softmax checkpoint wait for it. Logs: RUNS/<row>/log.txt and RUNS/<row>.log (save this script's output
# as RUNS/driver.log: the table reads a stopped row's command from it); table: `hhfft gpt table --runs RUNS
# --suffix SUFFIX` (SUFFIX: the fine-tuning rows' suffix, e.g. _lr1e-3; --png-dir draws the PNGs).
source "$(dirname "$0")/lanes.sh" "$@"

(row 0 scratch_softmax train $SCRATCH --attention softmax --save-dtype float16
 row 0 ft_softmax finetune $FT --attention softmax
 row 0 ft_t2r finetune $FT --attention t2r $DIST) &
(row 1 scratch_hedgehog train $SCRATCH --attention hedgehog
 wait_ckpt; row 1 ft_identity finetune $FT --attention identity) &
(wait_ckpt; row 2 ft_hedgehog finetune $FT --attention hedgehog $DIST --picture-layer 2
 row 2 ft_elu1 finetune $FT --attention elu1 $DIST) &
(wait_ckpt; row 3 ft_hedgehog_lr1e-3 finetune $FT --attention hedgehog $DIST --lr 1e-3
 row 3 ft_elu1_lr1e-3 finetune $FT --attention elu1 $DIST --lr 1e-3) &
wait
pack
