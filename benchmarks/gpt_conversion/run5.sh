#!/usr/bin/env bash
# Issue #8, fifth run: fine-tuning variants from run 4's softmax checkpoint (carried as .data/ckpt4, the
# `model-*.safetensors` + `gpt_config.json` that run 4 wrote), on GPUs 2 and 3 of a 4-GPU host while the kernel
# checks use GPUs 0 and 1: more map capacity (feature dim 128: 256 features per head) and a higher fine-tuning rate
# (2e-3, for the softmax row too); and Hedgehog from scratch with feature dim 128. Compare with run 4's seed-0 rows,
# which start from the same checkpoint (and, from scratch, with run 3's rows).
#
#   bash benchmarks/gpt_conversion/run5.sh RUNS [SECONDS]     # repo root, .data/pydocs and .data/ckpt4 carried
#
# The logged run (benchmarks/gpt_conversion/run5/) had SECONDS = 340: it stopped the last row of each GPU.
source "$(dirname "$0")/lanes.sh" "$@"
FT="--data $D --seed 0 --init .data/ckpt4 --tokens 69664768"  # run 4's checkpoint

(row 2 ft_hedgehog_fd128_lr1e-3 finetune $FT --attention hedgehog $DIST --feature-dim 128 --lr 1e-3
 row 2 ft_elu1_fd128_lr1e-3 finetune $FT --attention elu1 $DIST --feature-dim 128 --lr 1e-3) &
(row 3 ft_softmax_lr2e-3 finetune $FT --attention softmax --lr 2e-3
 row 3 ft_hedgehog_lr2e-3 finetune $FT --attention hedgehog $DIST --lr 2e-3
 row 3 scratch_hedgehog_fd128 train $SCRATCH --attention hedgehog --feature-dim 128) &
wait
pack
