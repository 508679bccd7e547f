#!/bin/sh
# Issue 25's grid, one `nhle bench unlearning` per setting, one process at a time (their time
# ratios are quoted). Partial results land in docs/bench/issue25/<setting>/runs.jsonl as they come;
# --resume keeps finished cases if the script is started again. Each folder's `nhle` rows are the
# default of when it ran: the second default (nhle_shipped_weight_1) in smallcnn_digits_shipped_weight_1/,
# the third (nhle_all_entries) in *_all_entries/, the fourth (nhle_forget_batch_32) in *_forget_batch_32/,
# the fifth (nhle_fine_tuned_rows) in *_fine_tuned_rows/, nhle_120_small_steps (the default for an
# hour) in *_120_small_steps/, the sixth (nhle_anchor_100) in the folders without a suffix below,
# the seventh as nhle_anchor_200 in *_anchor_200/ and as nhle in resnet18*/, the eighth, the
# current default, as nhle_half_rows in *_half_rows/ (the same recipe). Each grid resumes with the
# settings it ran under (out/grid.json), the seventh default's rows set explicitly.
#     nohup sh docs/bench/issue25/run_grid.sh > docs/bench/issue25/grid.log 2>&1 &
set -e
OUT=docs/bench/issue25
CASES="--classes 0,3,5,8 --multi 2,5,8 --resume"
SEVENTH="--set unlearn.forget_batch=16 --set unlearn.anchor_batch=2"
SIXTH="$SEVENTH --set unlearn.anchor_weight=100"
M=nhle,mask_only
run() { name=$1; shift; start=$(date +%s); .venv/bin/nhle bench unlearning $CASES "$@" --out $OUT/$name; echo "$name wall $(( $(date +%s) - start )) s" >> $OUT/wall.txt; }
# Finished grids, resumed with the settings they ran under (out/grid.json): the sixth default
# (anchor 100; its rows are named nhle), then the seventh, measured as nhle_anchor_200 over it.
run smallcnn_digits --model smallcnn --seeds 0,1,2 --methods $M $SIXTH
run smallcnn_synthetic20k --model smallcnn --dataset synthetic20000 --epochs 5 --seeds 0,1 --methods $M $SIXTH
run mobilenet_v3_small --model mobilenet_v3_small --epochs 15 --batch-size 32 --image-size 32 --seeds 1,0 --methods $M $SIXTH
A=nhle_anchor_200,mask_only
run smallcnn_digits_anchor_200 --model smallcnn --seeds 0,1,2 --methods $A $SIXTH
run smallcnn_synthetic20k_anchor_200 --model smallcnn --dataset synthetic20000 --epochs 5 --seeds 0,1 --methods $A $SIXTH
run mobilenet_v3_small_anchor_200 --model mobilenet_v3_small --epochs 15 --batch-size 32 --image-size 32 --seeds 1,0 --methods $A $SIXTH
# The ResNets, with the seventh default.
run resnet18_cifar_3ep --model resnet18_cifar --epochs 3 --image-size 32 --seeds 0,1 --methods $M $SEVENTH
run resnet18 --model resnet18 --epochs 10 --image-size 32 --seeds 0,1 --methods $M $SEVENTH
# Half a step's rows (8 forget samples, 1 synthetic input of each retained class), over the seventh
# default: the cost screen of the ninth round (screen.md), run as nhle_half_rows; the eighth default.
H=nhle_half_rows,mask_only
run smallcnn_digits_half_rows --model smallcnn --seeds 0,1,2 --methods $H $SEVENTH
run smallcnn_synthetic20k_half_rows --model smallcnn --dataset synthetic20000 --epochs 5 --seeds 0,1 --methods $H $SEVENTH
run resnet18_half_rows --model resnet18 --epochs 10 --image-size 32 --seeds 0,1 --methods $H $SEVENTH
run resnet18_cifar_3ep_half_rows --model resnet18_cifar --epochs 3 --image-size 32 --seeds 0,1 --methods $H $SEVENTH
run mobilenet_v3_small_half_rows --model mobilenet_v3_small --epochs 15 --batch-size 32 --image-size 32 --seeds 1,0 --methods $H $SEVENTH
