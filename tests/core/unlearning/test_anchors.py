"""What NHLE may hold on to besides the forget samples: inputs synthesised from the model, the
original weights, and retained-class prototypes. Real models, no retained data."""

from dataclasses import replace

import pytest
import torch

from nhle.core.config import UnlearnConfig
from nhle.core.data import sample_per_class, split_by_classes
from nhle.core.models import build_model
from nhle.core.training import evaluate
from nhle.core.unlearning import unlearn
from nhle.core.unlearning.anchors import SyntheticInputs, forget_dispersion, synthesise_inputs, weight_distance


def test_synthetic_inputs_are_images_the_model_gives_their_class(trained):
    before = {n: p.detach().clone() for n, p in trained.named_parameters()}
    x, y = synthesise_inputs(trained, [0, 1, 2, 4], per_class=4, image_shape=(1, 8, 8), steps=100)
    assert x.shape == (16, 1, 8, 8) and y.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [4] * 4
    assert 0 <= x.min() and x.max() <= 1
    with torch.no_grad():
        assert (trained(x).argmax(1) == y).float().mean() >= 0.9
    assert weight_distance(trained, before) == 0  # the model is read, never moved
    assert all(p.requires_grad for p in trained.parameters())


def test_synthesis_matches_the_batch_norm_statistics_the_model_remembers():
    torch.manual_seed(0)
    model = build_model("resnet18_cifar", 1, 10).eval()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    def distance(x):
        seen = []
        hooks = [
            m.register_forward_hook(
                lambda m, i, o: seen.append(
                    (i[0].mean((0, 2, 3)) - m.running_mean).norm() + (i[0].var((0, 2, 3)) - m.running_var).norm()
                )
            )
            for m in norms
        ]
        with torch.no_grad():
            model(x)
        for hook in hooks:
            hook.remove()
        return torch.stack(seen).mean().item()

    plain, _ = synthesise_inputs(model, [1, 2], 4, (1, 16, 16), steps=30, bn_weight=0.0, seed=1)
    matched, _ = synthesise_inputs(model, [1, 2], 4, (1, 16, 16), steps=30, bn_weight=1.0, seed=1)
    assert distance(matched) < distance(plain)


def test_feature_pull_forgets_and_moves_the_features_into_a_retained_class(trained, digits):
    samples = sample_per_class(digits.train, [3], 32, seed=0)
    config = UnlearnConfig(synthetic_per_class=4, synthesis_steps=100, feature_pull=1.0, feature_stop=0.5)
    result = unlearn(trained, samples, [3], config, device="cpu")
    forget_test, retain_test = split_by_classes(digits.test, [3])
    assert evaluate(result.model, forget_test) == 0.0
    assert evaluate(result.model, retain_test) >= evaluate(trained, retain_test) - 0.03
    with torch.no_grad():  # the forget class's test features moved away from where they were
        before, after = trained.features(forget_test.float_images()), result.model.features(forget_test.float_images())
    assert (after - before).norm(dim=1).mean() > 0.1 * before.norm(dim=1).mean()


def test_forget_dispersion_is_the_mean_cosine_of_pairs_of_one_class_only():
    features = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    labels = torch.tensor([3, 3, 3, 5])  # pairs of 3: cosines 1, 0, 0 (both ways); 5 has no pair
    assert forget_dispersion(features, labels).item() == pytest.approx(1 / 3)
    assert forget_dispersion(features[2:], labels[2:]).item() == 0.0  # no pair of one class


def test_forget_dispersion_scatters_the_forget_samples_features(trained, digits):
    samples = sample_per_class(digits.train, [3], 32, seed=0)
    config = UnlearnConfig(synthesis_steps=20)

    def cosine(model):  # about the original's mean feature of every class's inputs, as the term reads them
        with torch.no_grad():
            centre = trained.features(digits.test.float_images()).mean(0)
            return forget_dispersion(model.features(samples.float_images()) - centre, samples.labels).item()

    off = unlearn(trained, samples, [3], config, device="cpu").model
    on = unlearn(trained, samples, [3], replace(config, forget_dispersion=30.0), device="cpu").model
    assert cosine(on) < cosine(off) - 0.1


def test_weight_anchor_keeps_the_weights_closer_to_the_original(trained, digits):
    samples = sample_per_class(digits.train, [5], 32, seed=0)
    reference = {n: p.detach().clone() for n, p in trained.named_parameters()}
    free = unlearn(trained, samples, [5], UnlearnConfig(mask=False, max_steps=40, stop_forget_prob=0.0), device="cpu")
    held = unlearn(
        trained,
        samples,
        [5],
        UnlearnConfig(mask=False, max_steps=40, stop_forget_prob=0.0, weight_anchor=1e6),
        device="cpu",
    )
    assert weight_distance(held.model, reference) < weight_distance(free.model, reference)


def test_feature_pull_without_synthetic_inputs_is_refused():
    with pytest.raises(ValueError, match="feature_pull needs unlearn.synthetic_per_class >= 1"):
        UnlearnConfig(feature_pull=1.0, synthetic_per_class=0)


def test_the_synthetic_inputs_of_a_model_are_reused_by_a_later_request_not_recomputed(trained, digits, tmp_path):
    config = UnlearnConfig(max_steps=3, synthesis_steps=5)
    first = unlearn(trained, sample_per_class(digits.train, [3], 8, seed=0), [3], config, device="cpu")
    assert first.synthesis_seconds > 0
    assert sorted(set(first.synthetic.targets.tolist())) == list(range(10))  # every class: any request can use them
    kept = SyntheticInputs.load(first.synthetic.save(tmp_path / "synthetic.pt"))
    assert torch.equal(kept.images, first.synthetic.images) and kept.settings == first.synthetic.settings

    second = unlearn(trained, sample_per_class(digits.train, [5], 8, seed=0), [5], config, device="cpu", synthetic=kept)
    assert second.synthetic is kept and second.synthesis_seconds == 0.0
    other = unlearn(
        trained,
        sample_per_class(digits.train, [5], 8, seed=0),
        [5],
        UnlearnConfig(max_steps=3, synthesis_steps=6),
        device="cpu",
        synthetic=kept,
    )
    assert other.synthetic is not kept and other.synthesis_seconds > 0  # made with other settings: made again


def test_a_run_whose_retained_predictions_drift_steps_back_to_its_last_state_within_the_bound(trained, digits):
    samples = sample_per_class(digits.train, [3], 32, seed=0)
    _, retain_test = split_by_classes(digits.test, [3])
    reckless = UnlearnConfig(lr=3e-2, max_steps=60, anchor_weight=0.0, feature_pull=0.0, synthesis_steps=20)
    ran_on = unlearn(trained, samples, [3], replace(reckless, max_drift=0.0), device="cpu")
    guarded = unlearn(trained, samples, [3], replace(reckless, max_drift=0.05, drift_retries=0), device="cpu")
    assert ran_on.drift > 0.05 and not ran_on.stepped_back
    assert guarded.stepped_back and guarded.drift <= 0.05 and guarded.steps < 60
    assert evaluate(guarded.model, retain_test) > evaluate(ran_on.model, retain_test)


def test_a_run_that_drifts_carries_on_from_its_last_state_within_the_bound_more_slowly(trained, digits):
    samples = sample_per_class(digits.train, [3], 32, seed=0)
    # Without the anchor this rate drifts within 10 steps; at a ninth of it, not within the first 10.
    reckless = UnlearnConfig(
        lr=3e-3, max_steps=60, anchor_weight=0.0, feature_pull=0.0, synthesis_steps=20, max_drift=0.1
    )
    stopped = unlearn(trained, samples, [3], replace(reckless, drift_retries=0), device="cpu")
    retried = unlearn(trained, samples, [3], replace(reckless, drift_retries=2), device="cpu")
    assert stopped.steps == 0
    assert retried.stepped_back and retried.drift <= 0.1  # within the bound where it ends
    assert retried.steps > stopped.steps  # it went on, more slowly, from where the first stopped
