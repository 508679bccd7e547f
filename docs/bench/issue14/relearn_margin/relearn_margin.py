"""How much of `relearn_steps` is the forgotten class's logit margin? (docs/benchmarks.md section 7)

    .venv/bin/python docs/bench/issue14/relearn_margin/relearn_margin.py > docs/bench/issue14/relearn_margin/relearn_margin.md

Small CNN on digits (15 epochs, seed 0), the default NHLE recipe, classes 3 and 5. For the
unlearned model with the mask taken off (the relearn attack's starting point) the restored bias
of the forgotten class is lowered by c, which changes nothing but how far below the retained
classes the class starts; the relearn attack is then run as the benchmark runs it.
"""
import copy

import torch

from nhle.core.config import ModelConfig, TrainConfig, UnlearnConfig
from nhle.core.data import load_digits, sample_per_class, split_by_classes
from nhle.core.experiment import retrain_without
from nhle.core.metrics import relearn_steps
from nhle.core.training import seed_everything, train_model, training_spec
from nhle.core.unlearning import unlearn, without_mask

torch.set_num_threads(1)
data = load_digits(seed=0)
base, _ = train_model(data, TrainConfig(epochs=15), seed=0, progress=False)


def margin(model, x, classes):
    """Mean (best retained logit - forgotten logit) over x."""
    with torch.no_grad():
        z = model(x)
    retained = z.clone()
    retained[:, classes] = float("-inf")
    return (retained.max(1).values - z[:, classes].max(1).values).mean().item()


print("| class | model | bias lowered by | mean logit margin on the forget test samples | relearn steps |")
print("|---|---|---|---|---|")
for cls in (3, 5):
    samples = sample_per_class(data.train, [cls], 32, 0)
    forget_test, _ = split_by_classes(data.test, [cls])
    x = forget_test.float_images()
    result = unlearn(base, samples, [cls], UnlearnConfig(), device="cpu")
    attacked = without_mask(result.model, result.snapshot)
    for shift in (0, 5, 10, 20):
        shifted = copy.deepcopy(attacked)
        with torch.no_grad():
            shifted.head.bias[cls] -= shift
        seed_everything(0)
        print(f"| {cls} | NHLE (default) | {shift} | {margin(shifted, x, [cls]):.1f} | "
              f"{relearn_steps(shifted, samples, forget_test, 100)} |")
    retrained, snapshot, _ = retrain_without(data, TrainConfig(epochs=15), [cls], 0, progress=False,
                                             spec=training_spec(ModelConfig(), data))
    seed_everything(0)
    reference = without_mask(retrained, snapshot)
    print(f"| {cls} | retrained | 0 | {margin(reference, x, [cls]):.1f} | "
          f"{relearn_steps(reference, samples, forget_test, 100)} |")
