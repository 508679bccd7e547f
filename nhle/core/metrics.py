"""The metrics of docs/method.md section 3, one definition each, used everywhere.

    from nhle.core.metrics import measure_case, relearn_shares, relearn_target_accuracy
    target = relearn_target_accuracy(original, data, [3], share=0.95)
    measure = measure_case(data, [3], forget_samples, 300, 1e-4, seed=0, relearn_target_acc=target)
    metrics = measure(model, attack_model)
    relearn_shares({"original": ..., "unlearned": metrics, "retrained": ...})   # the relearn share

The first functions take plain arrays and have known answers in tests; `measure_case`'s measure
runs a model over the splits and returns the ten keys of METRIC_KEYS.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from nhle.core.data import ImageSet, Splits, as_float, split_by_classes
from nhle.core.gates import relearn_ratio
from nhle.core.models import MaskedClassifier
from nhle.core.training import predict

METRIC_KEYS = (
    "forget_test_acc",
    "retain_test_acc",
    "forget_train_acc",
    "retain_train_acc",
    "mia_efficacy",
    "probe_forget_acc",
    "unmasked_forget_test_acc",
    "forget_silhouette",
    "relearn_steps_shipped",
    "relearn_steps_restored",
)
"""The metrics of a report, in its order; forget_metrics' and evidence_metrics' together."""
PROBE_MAX_TRAIN = 10_000


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy; nan for no samples."""
    if len(labels) == 0:
        return float("nan")
    return (logits.argmax(1) == labels).float().mean().item()


def true_label_probability(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    return F.softmax(logits.double(), 1).gather(1, labels[:, None]).flatten().numpy()


def one_blas_thread():
    """scikit-learn's BLAS on one thread, for the span of a fit: after torch has run, its OpenMP
    threads still spin on the cores, and a BLAS thread pool beside them made the probe's fit 27x
    slower on 2 cores (0.70 s against 0.026 s on digits; the same solver, the same answer), and
    the plots' PCA hundreds of times slower. What was set before is restored on exit."""
    return threadpool_limits(limits=1, user_api="blas")


def mia_efficacy(member_conf: np.ndarray, nonmember_conf: np.ndarray, forget_conf: np.ndarray, seed: int = 0) -> float:
    """SalUn's SVC MIA on the true-label confidence: an SVC (C=3, rbf, gamma='auto') learns
    retained train (members, subsampled to the non-members' count) vs retained test; the result
    is 1 - the share of forget train samples it calls members."""
    from sklearn.svm import SVC  # noqa: PLC0415 - lazy: scikit-learn

    rng = np.random.default_rng(seed)
    if len(member_conf) > len(nonmember_conf):
        member_conf = member_conf[rng.choice(len(member_conf), len(nonmember_conf), replace=False)]
    features = np.concatenate([member_conf, nonmember_conf]).reshape(-1, 1)
    labels = np.concatenate([np.ones(len(member_conf)), np.zeros(len(nonmember_conf))])
    with one_blas_thread():
        svc = SVC(C=3, kernel="rbf", gamma="auto").fit(features, labels)
        return float(1.0 - svc.predict(np.asarray(forget_conf).reshape(-1, 1)).mean())


def probe_forget_acc(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    forget_classes,
    seed: int = 0,
) -> float:
    """Recall on the forgotten classes' test samples of a logistic-regression probe fitted on
    the train split's features with true labels (all classes; at most PROBE_MAX_TRAIN samples)."""
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415 - lazy: scikit-learn
    from sklearn.pipeline import make_pipeline  # noqa: PLC0415 - lazy: scikit-learn
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415 - lazy: scikit-learn

    if len(train_labels) > PROBE_MAX_TRAIN:
        keep = np.random.default_rng(seed).choice(len(train_labels), PROBE_MAX_TRAIN, replace=False)
        train_features, train_labels = train_features[keep], train_labels[keep]
    in_forget = np.isin(test_labels, list(forget_classes))
    with one_blas_thread():
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        probe.fit(train_features, train_labels)
        return float((probe.predict(test_features[in_forget]) == test_labels[in_forget]).mean())


def forget_silhouette(features: np.ndarray, labels: np.ndarray, forget_classes) -> float:
    """Mean cosine silhouette of the forgotten classes' samples, labelled by true class."""
    from sklearn.metrics import silhouette_samples  # noqa: PLC0415 - lazy: scikit-learn

    with one_blas_thread():
        scores = silhouette_samples(features, labels, metric="cosine")
    return float(scores[np.isin(labels, list(forget_classes))].mean())


def relearn_steps(
    model: MaskedClassifier,
    forget_samples: ImageSet,
    forget_test: ImageSet,
    max_steps: int,
    lr: float = 1e-4,
    target: float = 0.5,
) -> int:
    """Full-batch Adam steps of plain cross-entropy on the forget samples until the accuracy on
    the forget test samples reaches `target`; `max_steps` when it never does. Give it a model
    with the mask taken off (see masking.without_mask)."""
    model = copy.deepcopy(model).cpu().eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = as_float(forget_samples.images), forget_samples.labels
    for step in range(max_steps):
        if accuracy(predict(model, forget_test)[0], forget_test.labels) >= target:
            return step
        model.eval()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return max_steps


@torch.no_grad()
def shipped_weights(model: MaskedClassifier, forget_classes) -> MaskedClassifier:
    """The shipped attacker's start: a copy with the mask of `forget_classes` taken off and their
    final-layer rows and biases zero. For a masked model the rows are zero already (this is
    masking.without_mask(model, classes=...)); for a model that still has the class (the
    original, a retrained or unmasked model) it deletes the rows, so the original's copy is the
    mask-only model, the floor any fine-tuning must beat."""
    attacked = copy.deepcopy(model)
    index = torch.tensor(sorted(int(c) for c in forget_classes), dtype=torch.long, device=attacked.forget_mask.device)
    attacked.forget_mask[index] = False
    attacked.head.weight[index] = 0.0
    if attacked.head.bias is not None:
        attacked.head.bias[index] = 0.0
    return attacked


def relearn_target_accuracy(original: MaskedClassifier, data: Splits, forget_classes, share: float) -> float:
    """The forget test accuracy the relearn attack must bring back: `share` (unlearn.relearn_target)
    of the original model's, so that every model of one forget is attacked to the same bar."""
    forget_test, _ = split_by_classes(data.test, sorted(forget_classes))
    return share * accuracy(predict(original, forget_test)[0], forget_test.labels)


def measure_case(
    data: Splits,
    forget_classes,
    forget_samples: ImageSet,
    relearn_max_steps: int,
    relearn_lr: float,
    seed: int,
    relearn_target_acc: float,
):
    """How one forget case is measured: measure(model, attack_model=None) -> the ten metrics of
    `model` for forgetting `forget_classes` (forget_metrics, then evidence_metrics, in the order of
    METRIC_KEYS); `attack_model` is the model with its masked rows given back."""

    def measure(model: MaskedClassifier, attack_model: MaskedClassifier | None = None) -> dict:
        measured = {
            **forget_metrics(
                model,
                data,
                forget_classes,
                forget_samples,
                attack_model,
                relearn_max_steps,
                relearn_lr,
                relearn_target_acc=relearn_target_acc,
            ),
            **evidence_metrics(model, data, forget_classes, seed),
        }
        return {name: measured[name] for name in METRIC_KEYS}

    return measure


def forget_metrics(
    model: MaskedClassifier,
    data: Splits,
    forget_classes,
    forget_samples: ImageSet,
    attack_model: MaskedClassifier | None = None,
    relearn_max_steps: int = 300,
    relearn_lr: float = 1e-4,
    *,
    relearn_target_acc: float,
) -> dict:
    """What the gates read, and what needs the rows before masking (which are never kept):
    the test accuracies, the mask-removal attack and the relearn attack's steps. `attack_model`
    is the model with the mask taken off and the pre-mask rows restored (masking.without_mask);
    None means the model has no mask on these classes, so that attack is the model itself. The
    relearn attack runs on both it (restored) and shipped_weights (shipped) up to
    `relearn_target_acc` (relearn_target_accuracy: the original's, for every model of one forget)."""
    forget_classes = sorted(forget_classes)
    forget_test, retain_test = split_by_classes(data.test, forget_classes)
    test_logits, _ = predict(model, data.test)
    test_forget = torch.isin(data.test.labels, torch.tensor(forget_classes))
    attack_model = attack_model if attack_model is not None else model
    attack_logits = predict(attack_model, forget_test)[0]

    def relearn(attacker):
        return relearn_steps(attacker, forget_samples, forget_test, relearn_max_steps, relearn_lr, relearn_target_acc)

    return {
        "forget_test_acc": accuracy(test_logits[test_forget], forget_test.labels),
        "retain_test_acc": accuracy(test_logits[~test_forget], retain_test.labels),
        "unmasked_forget_test_acc": accuracy(attack_logits, forget_test.labels),
        "relearn_steps_shipped": relearn(shipped_weights(model, forget_classes)),
        "relearn_steps_restored": relearn(attack_model),
    }


def evidence_metrics(model: MaskedClassifier, data: Splits, forget_classes, seed: int = 0) -> dict:
    """What no gate reads and the shipped model alone gives (measured after the promotion): the
    train accuracies, the membership inference attack, the linear probe and the silhouette."""
    forget_classes = sorted(forget_classes)
    forget_train, retain_train = split_by_classes(data.train, forget_classes)
    train_logits, train_features = predict(model, data.train)
    test_logits, test_features = predict(model, data.test)
    train_forget = torch.isin(data.train.labels, torch.tensor(forget_classes))
    test_forget = torch.isin(data.test.labels, torch.tensor(forget_classes))
    train_conf = true_label_probability(train_logits, data.train.labels)
    test_conf = true_label_probability(test_logits, data.test.labels)
    return {
        "forget_train_acc": accuracy(train_logits[train_forget], forget_train.labels),
        "retain_train_acc": accuracy(train_logits[~train_forget], retain_train.labels),
        "mia_efficacy": mia_efficacy(
            train_conf[~train_forget.numpy()], test_conf[~test_forget.numpy()], train_conf[train_forget.numpy()], seed
        ),
        "probe_forget_acc": probe_forget_acc(
            train_features.numpy(),
            data.train.labels.numpy(),
            test_features.numpy(),
            data.test.labels.numpy(),
            forget_classes,
            seed,
        ),
        "forget_silhouette": forget_silhouette(test_features.numpy(), data.test.labels.numpy(), forget_classes),
    }


def relearn_shares(metrics: dict) -> dict:
    """The relearn share (the Anamnesis index of Chundawat et al., IEEE TIFS 2023) of a report's
    metrics {"original", "unlearned", optional "retrained"}: the unlearned model's relearn steps,
    for each attacker, over the retrained model's with its rows as trained (restored), one
    denominator for both: what a model that never saw the class costs an attacker. 1 = as hard to
    bring back as retraining. Without a retrained model the reference is the mask-only model (the
    original's shipped steps). A reference of 0 steps gives inf or nan (gates.relearn_ratio)."""
    original, unlearned = metrics["original"], metrics["unlearned"]
    mask_only = original["relearn_steps_shipped"]
    if "retrained" in metrics:
        reference, steps = "retrained", metrics["retrained"]["relearn_steps_restored"]
        why = "steps over those of the model retrained without the classes, its rows as trained"
    else:
        reference, steps = "mask_only", mask_only
        why = (
            "no retrained model (retrain_baseline off, or a graph model): steps over those of the original "
            "with only the mask applied, so 1 = no better than masking"
        )
    mine = {
        "shipped": unlearned["relearn_steps_shipped"],
        "restored": unlearned["relearn_steps_restored"],
        "mask_only": mask_only,
    }
    return {
        "reference": reference,
        "reference_steps": steps,
        **{attacker: relearn_ratio(n, steps) for attacker, n in mine.items()},
        "steps": mine,
        "why": why,
    }
