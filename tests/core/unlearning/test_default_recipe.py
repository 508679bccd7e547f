"""The default NHLE recipe on a fixed seed: a regression guard for what docs/benchmarks.md
section 9 measured (small CNN, digits, 15 epochs, seed 0), and the stopping rule's depth."""

from dataclasses import replace

import pytest
import torch

from nhle.core.config import RECIPES, TrainConfig, UnlearnConfig
from nhle.core.data import as_float, load_digits, sample_per_class, split_by_classes
from nhle.core.metrics import relearn_steps
from nhle.core.training import evaluate, train_model
from nhle.core.unlearning import unlearn, without_mask

# Measured for the default on this seed: drops 0.25 pp (class 3) and 0.00 pp (2, 5, 8), attack
# 0%. The bounds leave room for other CPUs' maths (one test sample is 0.25 pp).
MAX_DROP_PP = 1.0
MAX_ATTACK = 0.03
# Relearn share of class 3 on this seed (docs/method.md): measured 0.66 with the shipped weights
# and 1.53 with the pre-mask rows restored, learnt afresh (the retrained model: 73 steps; mask
# only: 0.30).
MIN_SHIPPED_SHARE, MIN_RESTORED_SHARE = 0.55, 1.3


@pytest.fixture(scope="module")
def benchmark_base():
    """The benchmark's base model of seed 0: small CNN, 15 epochs (about 3 s)."""
    digits = load_digits(seed=0)
    return digits, train_model(digits, TrainConfig(epochs=15), seed=0, progress=False)[0]


@pytest.mark.parametrize("classes", [[3], [2, 5, 8]])
def test_default_recipe_keeps_retained_accuracy_and_forgets_in_the_weights(benchmark_base, classes):
    digits, base = benchmark_base
    torch.manual_seed(0)
    result = unlearn(base, sample_per_class(digits.train, classes, 32, seed=0), classes, UnlearnConfig(), device="cpu")
    forget_test, retain_test = split_by_classes(digits.test, classes)
    drop_pp = 100 * (evaluate(base, retain_test) - evaluate(result.model, retain_test))
    attack = evaluate(without_mask(result.model, result.snapshot), forget_test)
    assert evaluate(result.model, forget_test) == 0.0
    assert drop_pp <= MAX_DROP_PP, f"retained drop {drop_pp:.2f} pp > {MAX_DROP_PP} pp"
    assert attack <= MAX_ATTACK, f"mask-removal attack recovers {attack:.1%} of {classes}"
    assert result.steps == UnlearnConfig().max_steps and not result.stepped_back  # the whole budget, no drift


def test_default_recipe_takes_as_long_to_relearn_as_a_retrained_model(benchmark_base):
    digits, base = benchmark_base
    config = UnlearnConfig()
    samples = sample_per_class(digits.train, [3], config.n_samples, seed=0)
    forget_test, _ = split_by_classes(digits.test, [3])
    target = config.relearn_target * evaluate(base, forget_test)

    def steps(model):
        return relearn_steps(model, samples, forget_test, config.relearn_max_steps, config.relearn_lr, target)

    retrained = steps(train_model(digits, TrainConfig(epochs=15), seed=0, exclude=[3], progress=False)[0])
    torch.manual_seed(0)
    result = unlearn(base, samples, [3], config, device="cpu")
    shipped, restored = (
        steps(without_mask(result.model, classes=[3])),
        steps(without_mask(result.model, result.snapshot)),
    )
    assert shipped / retrained >= MIN_SHIPPED_SHARE, (
        f"shipped {shipped} steps against the retrained model's {retrained}"
    )
    assert restored / retrained >= MIN_RESTORED_SHARE, f"restored {restored} steps against {retrained}"


def test_forget_rank_one_sinks_the_forgotten_class_below_every_retained_class(trained, digits):
    samples = sample_per_class(digits.train, [3], 32, seed=0)
    stopping = UnlearnConfig(**RECIPES["nhle_synthetic_anchor"])  # a recipe that stops once forgotten enough
    shallow = unlearn(trained, samples, [3], stopping, device="cpu")
    deep = unlearn(trained, samples, [3], replace(stopping, forget_rank=1.0), device="cpu")
    with torch.no_grad():
        logits = without_mask(deep.model, deep.snapshot)(as_float(samples.images))
    retained = [c for c in range(10) if c != 3]
    assert (logits[:, 3] < logits[:, retained].min(1).values).all()  # last, on every forget sample
    assert deep.steps > shallow.steps


def test_forget_rank_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="unlearn.forget_rank must be at most 1.0, got 1.5"):
        UnlearnConfig(forget_rank=1.5)
