"""Issue 25's cost check, with nothing else running: NHLE's seconds over a retrain's, measured in one run.

    .venv/bin/python docs/bench/issue25/cost.py 0 3 2+5+8 saliency=1 forget_batch=0   # docs/bench/issue25/cost.md

Small CNN on digits (the benchmark's base of the given seed, 15 epochs), torch's default threads.
Per case (3, 2+5+8: the classes asked for): the retrain without the classes, then the default NHLE
twice from the same base: the first request (synthesises the model's inputs) and a later one that
reuses them, three times each; then, reusing them too, each variant (key=value[,key=value]
overrides of the unlearn section) three times. The ratios use the median seconds.
"""
import statistics
import sys
import time

import torch

from nhle.core.config import Params, TrainConfig, UnlearnConfig, with_assignments
from nhle.core.data import load_digits, sample_per_class
from nhle.core.training import train_model
from nhle.core.unlearning import unlearn

seed = int(sys.argv[1])
cases = [[int(c) for c in case.split("+")] for case in sys.argv[2:] if "=" not in case]
variants = [case for case in sys.argv[2:] if "=" in case]  # key=value[,key=value]: more columns, inputs kept


def config(variant: str) -> UnlearnConfig:
    return with_assignments(Params(), [f"unlearn.{kv}" for kv in variant.split(",") if kv]).unlearn


data = load_digits(seed=seed)
base, _ = train_model(data, TrainConfig(), seed=seed, progress=False)
print(f"torch threads {torch.get_num_threads()}, seed {seed}, {time.strftime('%Y-%m-%d %H:%M')}\n")
print("| classes | retrain s | first request s (synthesis s) | inputs kept s | first / retrain | kept / retrain | "
      + "".join(f"kept, {v} / retrain | " for v in variants))
print("|---|---|---|---|---|---|" + "---|" * len(variants))
for classes in cases:
    retrain = statistics.median(train_model(data, TrainConfig(), seed=seed, exclude=classes, progress=False)[1]
                                for _ in range(3))
    samples = sample_per_class(data.train, classes, 32, seed)
    first = [unlearn(base, samples, classes, UnlearnConfig(), device="cpu") for _ in range(3)]
    kept = [statistics.median(unlearn(base, samples, classes, config(v), device="cpu",
                                      synthetic=first[0].synthetic).seconds for _ in range(3))
            for v in [""] + variants]
    f, s = statistics.median(r.seconds for r in first), statistics.median(r.synthesis_seconds for r in first)
    print(f"| {'+'.join(map(str, classes))} | {retrain:.2f} | {f:.2f} ({s:.2f}) | {kept[0]:.2f} | {f / retrain:.3f} | "
          + "".join(f"{k / retrain:.3f} | " for k in kept), flush=True)
