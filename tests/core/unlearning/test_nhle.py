"""NHLE fine-tuning: each encoding pushes the forgotten classes out, using forget samples only."""

from collections import Counter
from dataclasses import replace

import pytest
import torch

from nhle.core.config import ENCODINGS, RECIPES, UnlearnConfig
from nhle.core.data import as_float, sample_per_class, split_by_classes
from nhle.core.training import evaluate
from nhle.core.unlearning import nhle_loss, unlearn, without_mask
from nhle.core.unlearning.nhle import forget_confusion, forgotten_enough, step_rows


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_each_encoding_lowers_the_forgotten_probability(encoding):
    logits = torch.zeros(4, 5, requires_grad=True)
    forget = torch.tensor([False, True, False, False, False])
    retained = torch.tensor([True, False, True, True, False])  # class 4 masked earlier
    masked_logits = logits.masked_fill(~(forget | retained), float("-inf"))
    nhle_loss(masked_logits, forget, retained, encoding).backward()
    assert (logits.grad[:, 1] > 0).all()  # a descent step lowers the forgotten logit
    assert (logits.grad[:, 4] == 0).all() and torch.isfinite(logits.grad).all()


def test_unknown_encoding_is_refused():
    with pytest.raises(ValueError, match="unknown encoding 'positive'"):
        nhle_loss(torch.zeros(1, 3), torch.tensor([True, False, False]), torch.tensor([False, True, True]), "positive")


def test_unlearn_forgets_with_forget_samples_only(trained, digits):
    samples = sample_per_class(digits.train, [3], 32, seed=0)
    assert set(samples.labels.tolist()) == {3}  # the only data NHLE gets
    result = unlearn(trained, samples, [3], UnlearnConfig(encoding="complementary"), device="cpu")
    forget_test, retain_test = split_by_classes(digits.test, [3])
    assert evaluate(result.model, forget_test) == 0.0
    assert evaluate(result.model, retain_test) >= evaluate(trained, retain_test) - 0.02
    assert 0 < result.steps <= UnlearnConfig().max_steps and result.seconds > 0
    assert evaluate(without_mask(result.model, result.snapshot), forget_test) < 0.2
    assert not trained.forget_mask.any()  # the input model is left as it was
    backbone_moved = not torch.equal(result.model.backbone[0].weight, trained.backbone[0].weight)
    assert backbone_moved  # the default updates the feature extractor


def test_head_only_leaves_features_and_step_cap_holds(trained, digits):
    samples = sample_per_class(digits.train, [1], 32, seed=0)
    result = unlearn(trained, samples, [1], UnlearnConfig(layers="head", max_steps=3), device="cpu")
    x = as_float(digits.test.images[:16])
    assert torch.equal(result.model.features(x), trained.features(x))
    assert result.steps <= 3


def test_sequential_forgetting_keeps_earlier_classes_masked(trained, digits):
    first = unlearn(trained, sample_per_class(digits.train, [3], 32, 0), [3], device="cpu").model
    second = unlearn(first, sample_per_class(digits.train, [5], 32, 0), [5], device="cpu").model
    assert second.forget_mask.nonzero().flatten().tolist() == [3, 5]
    predictions = second(as_float(digits.test.images)).argmax(1)
    assert not torch.isin(predictions, torch.tensor([3, 5])).any()
    with pytest.raises(ValueError, match="already forgotten"):
        unlearn(second, sample_per_class(digits.train, [3], 8, 0), [3], device="cpu")


def test_forgetting_every_class_is_refused(trained, digits):
    with pytest.raises(ValueError, match="no class to predict"):
        unlearn(trained, sample_per_class(digits.train, range(10), 2, 0), range(10), device="cpu")


@pytest.mark.parametrize("classes", [[5, 7], [1, 8]])
def test_several_classes_are_forgotten_together(trained, digits, classes):
    """Forget requests are processed as a union: several classes at once leave nothing for the
    mask-removal attack on any of them, with the default, and a recipe that stops stops by its rule,
    not at the step cap (1 and 8 look alike: a loss that pushes one into the other never stops)."""
    samples = sample_per_class(digits.train, classes, 32, seed=0)
    stopping = UnlearnConfig(**RECIPES["nhle_synthetic_anchor"])
    stopped = unlearn(trained, samples, classes, stopping, device="cpu")
    assert stopped.stopped_early and stopped.steps < stopping.max_steps
    result = unlearn(trained, samples, classes, UnlearnConfig(), device="cpu")
    _, retain_test = split_by_classes(digits.test, classes)
    attacked = without_mask(result.model, result.snapshot)
    for cls in classes:
        assert evaluate(attacked, split_by_classes(digits.test, [cls])[0]) < 0.1
    assert evaluate(result.model, retain_test) >= evaluate(trained, retain_test) - 0.02


def test_forget_samples_of_other_classes_are_refused(trained, digits):
    samples = sample_per_class(digits.train, [2], 4, seed=0)
    with pytest.raises(ValueError, match="must all belong to the forgotten classes"):
        unlearn(trained, samples, [5], UnlearnConfig(), device="cpu")


def test_a_step_trains_on_forget_batch_samples_drawn_afresh_and_on_every_anchor():
    anchor_targets = torch.arange(24) % 8
    rows = [step_rows(96, anchor_targets, 32, step).tolist() for step in range(20)]
    for r in rows:
        forget_rows = [i for i in r if i < 96]
        assert len(forget_rows) == len(set(forget_rows)) == 32 and r[32:] == list(range(96, 120))
    assert len({tuple(r) for r in rows}) == 20  # a new draw every step ...
    assert set().union(*map(set, rows)) == set(range(120))  # ... reaching every forget sample
    assert step_rows(96, anchor_targets, 32, 7).tolist() == rows[7]  # and a run repeats
    assert (
        step_rows(20, anchor_targets, 32, 0).tolist() == list(range(44)) == step_rows(20, anchor_targets, 0, 0).tolist()
    )


def test_anchor_batch_draws_that_many_anchors_of_every_class_afresh_each_step():
    anchor_targets = torch.tensor([0, 1, 2, 3] * 4)  # 4 anchors of each of 4 classes, interleaved
    rows = [step_rows(10, anchor_targets, 0, step, anchor_batch=2) for step in range(20)]
    for r in rows:
        assert r[:10].tolist() == list(range(10))  # every forget sample (forget_batch 0)
        anchors = r[10:] - 10
        assert torch.bincount(anchor_targets[anchors], minlength=4).tolist() == [2, 2, 2, 2]
        assert len(set(anchors.tolist())) == 8
    assert len({tuple(r.tolist()) for r in rows}) > 10  # a new draw every step ...
    assert set().union(*(set(r.tolist()) for r in rows)) == set(range(26))  # ... reaching every anchor
    assert step_rows(10, anchor_targets, 0, 3, anchor_batch=2).tolist() == rows[3].tolist()  # a run repeats
    assert step_rows(10, anchor_targets, 0, 3, anchor_batch=4).tolist() == list(range(26))  # all there are


def test_a_request_of_several_classes_costs_forget_batch_samples_a_step(trained, digits):
    """Three classes' 96 samples, forget_batch 32: every step's forward pass sees 32 forget samples
    plus anchor_batch anchors of each retained class (one more pass after the last step); all 96
    and every anchor go through once, without gradient, for the original's logits (and once more
    at the end, for the rows learnt afresh); and the classes are still forgotten."""
    classes = [2, 5, 8]
    samples = sample_per_class(digits.train, classes, 32, seed=0)
    config = UnlearnConfig(max_steps=20, forget_batch=32, synthesis_steps=20)
    seen = []
    hook = trained.backbone[0].register_forward_pre_hook(lambda _m, inputs: seen.append(len(inputs[0])))
    try:
        result = unlearn(trained, samples, classes, config, device="cpu")
    finally:
        hook.remove()
    retained = trained.num_classes - len(classes)
    assert seen.count(32 + config.anchor_batch * retained) == config.max_steps + 1, Counter(seen)
    once_more = 1 if config.rows_steps else 0  # the features the forgotten rows are learnt afresh on
    assert seen.count(96 + config.synthetic_per_class * retained) == 1 + once_more, Counter(seen)
    _, retain_test = split_by_classes(digits.test, classes)
    assert evaluate(without_mask(result.model, classes=classes), split_by_classes(digits.test, classes)[0]) < 0.5
    assert evaluate(result.model, retain_test) >= evaluate(trained, retain_test) - 0.02


def test_a_recipe_that_stops_judges_every_forget_sample_not_only_the_steps_draw(trained, digits):
    """forget_batch 8 of three classes' 96 samples: the stopping rule still holds for all 96 when
    the run stops (every one ranks the forgotten classes below a retained class, mean p_F small)."""
    classes = [2, 5, 8]
    samples = sample_per_class(digits.train, classes, 32, seed=0)
    config = UnlearnConfig(**{**RECIPES["nhle_synthetic_anchor"], "forget_batch": 8})
    result = unlearn(trained, samples, classes, config, device="cpu")
    assert result.stopped_early
    forget = torch.zeros(trained.num_classes, dtype=torch.bool)
    forget[classes] = True
    with torch.no_grad():
        logits = without_mask(result.model, result.snapshot)(as_float(samples.images))
    assert forgotten_enough(logits, forget, ~forget, config)


def test_forget_confusion_is_the_kl_from_uniform_among_the_forgotten_classes():
    assert forget_confusion(torch.zeros(4, 3)).item() == pytest.approx(0.0, abs=1e-7)
    peaked = torch.tensor([[10.0, 0.0, 0.0]])
    p = torch.softmax(peaked, 1)[0]
    assert forget_confusion(peaked).item() == pytest.approx(float((torch.log(1 / 3 / p) / 3).sum()), rel=1e-5)


def test_forget_confusion_blurs_the_forgotten_classes_and_is_inert_for_one_class(trained, digits):
    """Three classes: with the term, the NHLE model's pre-mask logits (the restored attacker's
    start) tell the forgotten classes apart on their samples far less than without it. One class:
    nothing to tell apart, the run is the default's, weight for weight."""
    classes = [2, 5, 8]
    samples = sample_per_class(digits.train, classes, 32, seed=0)
    config = UnlearnConfig(max_steps=20, synthesis_steps=20, rows_steps=0)  # the rows the fine-tuning left
    x = as_float(samples.images)

    def told_apart(weight):
        result = unlearn(trained, samples, classes, replace(config, forget_confusion=weight), device="cpu")
        with torch.no_grad():
            return forget_confusion(without_mask(result.model, result.snapshot)(x)[:, classes]).item()

    assert told_apart(10.0) < 0.7 * told_apart(0.0)  # 20 steps: 2.2 against 4.2 nats
    one = sample_per_class(digits.train, [3], 32, seed=0)
    plain, blurred = (
        unlearn(trained, one, [3], replace(config, forget_confusion=w), device="cpu") for w in (0.0, 10.0)
    )
    for a, b in zip(plain.model.state_dict().values(), blurred.model.state_dict().values()):
        assert torch.equal(a, b)


def test_rows_learnt_afresh_change_only_the_pre_mask_rows_and_no_longer_point_at_the_class(trained, digits):
    """rows_steps: the shipped model is the same weight for weight (masking zeroes those rows
    either way); the pre-mask rows no longer resemble the original's rows of the class, which the
    fine-tuning's still do, and the restored model ranks the class last on its samples."""
    samples = sample_per_class(digits.train, [3], 32, seed=0)
    config = UnlearnConfig(max_steps=20, synthesis_steps=20)
    kept, fresh = (unlearn(trained, samples, [3], replace(config, rows_steps=n), device="cpu") for n in (0, 50))
    for a, b in zip(kept.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)
    original_row = trained.head.weight.detach()[3]

    def likeness(result):
        return torch.nn.functional.cosine_similarity(result.snapshot.weight_rows[0], original_row, dim=0).item()

    assert likeness(kept) > 0.8 and likeness(fresh) < 0.3, (likeness(kept), likeness(fresh))
    with torch.no_grad():
        logits = without_mask(fresh.model, fresh.snapshot)(as_float(samples.images))
    assert (logits.argmin(1) == 3).float().mean() > 0.9


def test_rows_learnt_afresh_need_the_synthetic_inputs():
    with pytest.raises(ValueError, match="rows_steps needs unlearn.synthetic_per_class"):
        UnlearnConfig(rows_steps=50, synthetic_per_class=0, holdout_per_class=0, feature_pull=0.0)
