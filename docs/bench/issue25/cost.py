"""Issue 25's cost check, with nothing else running: NHLE's seconds over a retrain's, measured in one run.

    .venv/bin/python docs/bench/issue25/cost.py 0 3 2+5+8     # the tables of docs/bench/issue25/cost.md

Small CNN on digits (the benchmark's base of the given seed, 15 epochs), torch's default threads.
Per case: the retrain without the classes, then the default NHLE twice from the same base: the
first request (synthesises the model's inputs) and a later one that reuses them, three times each,
a later one with all forget samples every step (forget_batch 0; differs for several classes), and a
later one with every entry moving (saliency 1: the third default, nhle_all_entries); the ratios use
the median seconds.
"""
import statistics
import sys
import time

import torch

from nhle.core.config import TrainConfig, UnlearnConfig
from nhle.core.data import load_digits, sample_per_class
from nhle.core.training import train_model
from nhle.core.unlearning import unlearn

seed, cases = int(sys.argv[1]), [[int(c) for c in case.split("+")] for case in sys.argv[2:]]
data = load_digits(seed=seed)
base, _ = train_model(data, TrainConfig(), seed=seed, progress=False)
print(f"torch threads {torch.get_num_threads()}, seed {seed}, {time.strftime('%Y-%m-%d %H:%M')}\n")
print("| classes | retrain s | first request s (synthesis s) | inputs kept s | first / retrain | kept / retrain "
      "| kept, forget_batch 0 / retrain | kept, saliency 1 / retrain |")
print("|---|---|---|---|---|---|---|---|")
for classes in cases:
    retrain = statistics.median(train_model(data, TrainConfig(), seed=seed, exclude=classes, progress=False)[1]
                                for _ in range(3))
    samples = sample_per_class(data.train, classes, 32, seed)
    first = [unlearn(base, samples, classes, UnlearnConfig(), device="cpu") for _ in range(3)]
    kept = [unlearn(base, samples, classes, UnlearnConfig(), device="cpu", synthetic=first[0].synthetic).seconds
            for _ in range(3)]
    full = [unlearn(base, samples, classes, UnlearnConfig(forget_batch=0), device="cpu",
                    synthetic=first[0].synthetic).seconds for _ in range(3)]
    every = [unlearn(base, samples, classes, UnlearnConfig(saliency=1.0), device="cpu",
                     synthetic=first[0].synthetic).seconds for _ in range(3)]
    f, s, k = (statistics.median(r.seconds for r in first), statistics.median(r.synthesis_seconds for r in first),
               statistics.median(kept))
    print(f"| {'+'.join(map(str, classes))} | {retrain:.2f} | {f:.2f} ({s:.2f}) | {k:.2f} | {f / retrain:.3f} "
          f"| {k / retrain:.3f} | {statistics.median(full) / retrain:.3f} "
          f"| {statistics.median(every) / retrain:.3f} |", flush=True)
