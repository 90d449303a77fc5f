#!/usr/bin/env bash
# Issue #8, ninth run: the from-scratch gap (+5.82% at W = 128 in run 7, target 5%). Two questions on ONE GPU, two
# lanes sharing it (rows compared on tokens, not time):
# - does a wider feature map help the hybrid's far keys (feature dim 128, i.e. 256 features per head, against the
#   head dim's 64)? Compared with run 8's softmax row of seed 0;
# - is +5.82% the seed's or the method's? The softmax and W = 128 rows again with seed 1.
#
#   bash benchmarks/gpt_conversion/run9.sh RUNS [SECONDS]     # repo root, .data/pydocs carried; SECONDS: budget (560)
#
# Same budget, rate and schedule as every from-scratch row since run 3.
source "$(dirname "$0")/lanes.sh" "$@"
S1="--data $D --seed 1 --tokens 54460416"

(row 0 scratch_hedgehog_w128_f128 train $SCRATCH --attention hedgehog --window 128 --feature-dim 128) &
(row 0 scratch_softmax_s1 train $S1 --attention softmax
 row 0 scratch_hedgehog_w128_s1 train $S1 --attention hedgehog --window 128) &
wait
pack
