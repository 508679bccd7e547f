"""Issue 25's cost on the CIFAR-stem ResNet-18 (3 epochs, 32x32 digits), the old optimiser code
against the new in one run, with nothing else running:

    SEED=0 .venv/bin/python docs/bench/issue25/rcost.py 2+5+8      # docs/bench/issue25/cost.md

The benchmark's base model of the seed (cached in /tmp), the default NHLE request's synthetic
inputs made once, then twice over: the retrain without the classes and the request with the inputs
kept, first with the old code (Adam and AdamW's per-tensor loop, saliency's sorted top-k), then
with the current (their fused kernels, an unsorted top-k: the same update and the same entries).
"""
import os
import sys
from pathlib import Path

import torch

import nhle.core.training as training
import nhle.core.unlearning.steps as steps
from nhle.bench.unlearning import Grid, grid_data, train_seed
from nhle.core.config import ModelConfig, Params, TrainConfig
from nhle.core.data import sample_per_class
from nhle.core.experiment import retrain_without
from nhle.core.unlearning import unlearn

SEED = int(os.environ.get("SEED", "0"))
grid = Grid(arch="resnet18_cifar", train_config=TrainConfig(epochs=3), image_size=32, seeds=(SEED,), methods=("nhle",))
cache = Path(f"/tmp/rcost_base_{SEED}.pt")
if cache.exists():
    base = torch.load(cache, weights_only=False)
else:
    base = train_seed(grid, SEED)
    torch.save(base, cache)
classes = [int(c) for c in sys.argv[1].split("+")]
data = grid_data(grid.data_config(SEED))
samples = sample_per_class(data.train, classes, 32, SEED)
config = Params().unlearn
fused, topk = training.fused_adam, torch.Tensor.topk


def use(new: bool) -> None:
    training.fused_adam = steps.fused_adam = fused if new else (lambda device: False)
    torch.Tensor.topk = topk if new else (lambda self, k, sorted=True: topk(self, k, sorted=True))


first = unlearn(base, samples, classes, config, device="cpu")
for _ in range(2):
    for new in (False, True):
        use(new)
        _, _, retrain = retrain_without(data, grid.train_config, classes, SEED, progress=False,
                                        spec=training.training_spec(ModelConfig(arch=grid.arch), data))
        kept = unlearn(base, samples, classes, config, device="cpu", synthetic=first.synthetic)
        print(f"{'new' if new else 'old'} code: retrain {retrain:.1f} s, request (inputs kept) {kept.seconds:.1f} s, "
              f"{kept.seconds / retrain:.3f} of a retrain; stepped back: {kept.stepped_back}", flush=True)
