#!/usr/bin/env bash
# Issue #8, fourth run: the fine-tuning rows at lr 1e-3 (run 3's better rate for the converted models) for every
# model, softmax included, over two fine-tuning seeds, from a freshly trained softmax checkpoint (as run 3).
#
#   bash benchmarks/gpt_conversion/run4.sh RUNS [SECONDS]     # repo root, .data/pydocs carried; SECONDS: budget (560)
#
# Each line below is one row's whole command (`hhfft gpt ...`, its seed in it); the lanes only schedule them. Rows
# that need the softmax checkpoint wait for it. Logs: RUNS/<row>/log.txt and RUNS/<row>.log (save this script's output
# as RUNS/driver.log: the table reads a stopped row's command from it); table: `hhfft gpt table --runs RUNS
# --suffix SUFFIX` (SUFFIX: the fine-tuning rows' suffix, e.g. _lr1e-3; --png-dir draws the PNGs).
source "$(dirname "$0")/lanes.sh" "$@"

(row 0 scratch_softmax train $SCRATCH --attention softmax --save-dtype float16
 row 0 ft_softmax_lr1e-3 finetune $FT --attention softmax --lr 1e-3
 row 0 ft_softmax_lr1e-3_s1 finetune $FT --attention softmax --lr 1e-3 --seed 1) &
(wait_ckpt; row 1 ft_hedgehog_lr1e-3 finetune $FT --attention hedgehog $DIST --lr 1e-3
 row 1 ft_elu1_lr1e-3_s1 finetune $FT --attention elu1 $DIST --lr 1e-3 --seed 1) &
(wait_ckpt; row 2 ft_elu1_lr1e-3 finetune $FT --attention elu1 $DIST --lr 1e-3
 row 2 ft_identity_lr1e-3 finetune $FT --attention identity --lr 1e-3) &
(wait_ckpt; row 3 ft_hedgehog_lr1e-3_s1 finetune $FT --attention hedgehog $DIST --lr 1e-3 --seed 1
 row 3 ft_t2r_lr1e-3 finetune $FT --attention t2r $DIST --lr 1e-3) &
wait
pack
