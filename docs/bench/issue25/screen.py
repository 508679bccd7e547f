"""Issue 25's fast loop: relearn share of NHLE variants on two digits classes, in seconds.

    .venv/bin/python docs/bench/issue25/screen.py default feature_pull=1,forget_rank=1 ...

One small CNN on digits (seed 0), classes 3 and 5. For each variant (key=value overrides of
the unlearn section, read as `--set unlearn.key=value` is; `default`: none) it prints forget acc,
retained drop, mask-removal attack and the relearn steps (full-batch Adam 1e-4 on the forget samples until the forget test accuracy is back
to 95% of the original's) for both attackers, as a share of the retrained model's.
"""
import sys
import time

import torch

from nhle.core.config import Params, TrainConfig, with_assignments
from nhle.core.data import load_digits, sample_per_class, split_by_classes
from nhle.core.training import evaluate, train_model
from nhle.core.unlearning import unlearn, without_mask
from nhle.core.unlearning.masking import apply_class_weight_mask
from nhle.core.metrics import relearn_steps

torch.set_num_threads(1)
CLASSES = [[int(c) for c in case.split("+")] for case in
           (sys.argv[1].split(":")[1].split(",") if sys.argv[1].startswith("classes:") else ["3", "5"])]
args = sys.argv[2:] if sys.argv[1].startswith("classes:") else sys.argv[1:]
import os
SEED = int(os.environ.get("SEED", "0"))
data = load_digits(seed=SEED)
base, _ = train_model(data, TrainConfig(), seed=SEED, progress=False)
CAP = 400
refs = {}
for c in map(tuple, CLASSES):
    ft, rt = split_by_classes(data.test, list(c))
    samples = sample_per_class(data.train, list(c), 32, SEED)
    target = 0.95 * evaluate(base, ft)
    r, sec = train_model(data, TrainConfig(), seed=SEED, exclude=list(c), progress=False)
    refs[c] = dict(ft=ft, rt=rt, samples=samples, target=target, retrain_seconds=sec,
                   retrained=relearn_steps(r, samples, ft, CAP, 1e-4, target),
                   base_retain=evaluate(base, rt))
    masked = __import__("copy").deepcopy(base)
    apply_class_weight_mask(masked, list(c))
    refs[c]["mask_only"] = relearn_steps(without_mask(masked, classes=list(c)), samples, ft, CAP, 1e-4, target)
    print(f"class {c}: retrained relearn {refs[c]['retrained']}, mask-only shipped {refs[c]['mask_only']}, retrain {sec:.1f}s", flush=True)

for arg in args:
    config = with_assignments(Params(), [] if arg == "default" else [f"unlearn.{kv}" for kv in arg.split(",")]).unlearn
    for c in map(tuple, CLASSES):
        ref = refs[c]
        t = time.perf_counter()
        result = unlearn(base, ref["samples"], list(c), config, device="cpu")
        sec = time.perf_counter() - t
        shipped = relearn_steps(without_mask(result.model, classes=list(c)), ref["samples"], ref["ft"], CAP, 1e-4, ref["target"])
        restored = relearn_steps(without_mask(result.model, result.snapshot), ref["samples"], ref["ft"], CAP, 1e-4, ref["target"])
        drop = 100 * (ref["base_retain"] - evaluate(result.model, ref["rt"]))
        attack = evaluate(without_mask(result.model, result.snapshot), ref["ft"])
        print(f"{arg:<50} c{'+'.join(map(str, c))} drop {drop:5.2f}pp attack {100*attack:4.1f}% shipped {shipped:3d} ({shipped/ref['retrained']:.2f}) "
              f"restored {restored:3d} ({restored/ref['retrained']:.2f}) mask-only {ref['mask_only']/ref['retrained']:.2f} "
              f"steps {result.steps}{'*' if result.stepped_back else ''} drift {result.drift if result.drift is None else round(result.drift, 4)} synth {result.synthesis_seconds/ref['retrain_seconds']:.2f} time/retrain {sec/ref['retrain_seconds']:.2f}", flush=True)
