#!/bin/sh
# Issue 25's grid, one `nhle bench unlearning` per setting, one process at a time (their time
# ratios are quoted). Partial results land in docs/bench/issue25/<setting>/runs.jsonl as they come;
# --resume keeps finished cases if the script is started again. The recipes of the fallback list
# and the second default (nhle_shipped_weight_1) were measured on the small CNN by the previous
# grid (smallcnn_digits_shipped_weight_1/: its `nhle` rows are nhle_shipped_weight_1); the third default
# (nhle_all_entries) by smallcnn_digits_all_entries/, the fourth (nhle_forget_batch_32) by the
# *_forget_batch_32/ folders, the fifth (nhle_fine_tuned_rows) by *_fine_tuned_rows/, the candidate
# nhle_anchor_200 by *_anchor_200/, nhle_120_small_steps (the default for an hour) by *_120_small_steps/:
# in each, the `nhle` rows are that recipe.
#     nohup sh docs/bench/issue25/run_grid.sh > docs/bench/issue25/grid.log 2>&1 &
set -e
OUT=docs/bench/issue25
CASES="--classes 0,3,5,8 --multi 2,5,8 --resume"
M=nhle,mask_only
run() { name=$1; shift; start=$(date +%s); .venv/bin/nhle bench unlearning $CASES "$@" --out $OUT/$name; echo "$name wall $(( $(date +%s) - start )) s" >> $OUT/wall.txt; }
run smallcnn_digits --model smallcnn --seeds 0,1,2 --methods $M
run smallcnn_synthetic20k --model smallcnn --dataset synthetic20000 --epochs 5 --seeds 0,1 --methods $M
run mobilenet_v3_small --model mobilenet_v3_small --epochs 15 --batch-size 32 --image-size 32 --seeds 1,0 --methods $M
# The candidate for the seventh default (the anchor at 200) where the small CNN's grid met the goal with it.
A=nhle_anchor_200,mask_only
run smallcnn_digits_anchor_200 --model smallcnn --seeds 0,1,2 --methods $A
run smallcnn_synthetic20k_anchor_200 --model smallcnn --dataset synthetic20000 --epochs 5 --seeds 0,1 --methods $A
run mobilenet_v3_small_anchor_200 --model mobilenet_v3_small --epochs 15 --batch-size 32 --image-size 32 --seeds 1,0 --methods $A
run resnet18_cifar_3ep --model resnet18_cifar --epochs 3 --image-size 32 --seeds 0,1 --methods $M
run resnet18 --model resnet18 --epochs 10 --image-size 32 --seeds 0,1 --methods $M
