"""The metrics of docs/method.md section 3, one definition each, used everywhere.

    from nhle.core.metrics import evaluate_forgetting
    metrics = evaluate_forgetting(model, data, forget_classes=[3], forget_samples=..., attack_model=...)

The first functions take plain arrays and have known answers in tests; `evaluate_forgetting`
runs a model over the splits and returns the nine keys of METRIC_KEYS.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from nhle.core.data import ImageSet, Splits, as_float, split_by_classes
from nhle.core.models import MaskedClassifier

METRIC_KEYS = ("forget_test_acc", "retain_test_acc", "forget_train_acc", "retain_train_acc", "mia_efficacy",
               "probe_forget_acc", "unmasked_forget_test_acc", "forget_silhouette", "relearn_steps")
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
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def mia_efficacy(member_conf: np.ndarray, nonmember_conf: np.ndarray, forget_conf: np.ndarray, seed: int = 0) -> float:
    """SalUn's SVC MIA on the true-label confidence: an SVC (C=3, rbf, gamma='auto') learns
    retained train (members, subsampled to the non-members' count) vs retained test; the result
    is 1 - the share of forget train samples it calls members."""
    from sklearn.svm import SVC

    rng = np.random.default_rng(seed)
    if len(member_conf) > len(nonmember_conf):
        member_conf = member_conf[rng.choice(len(member_conf), len(nonmember_conf), replace=False)]
    features = np.concatenate([member_conf, nonmember_conf]).reshape(-1, 1)
    labels = np.concatenate([np.ones(len(member_conf)), np.zeros(len(nonmember_conf))])
    with one_blas_thread():
        svc = SVC(C=3, kernel="rbf", gamma="auto").fit(features, labels)
        return float(1.0 - svc.predict(np.asarray(forget_conf).reshape(-1, 1)).mean())


def probe_forget_acc(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                     test_labels: np.ndarray, forget_classes, seed: int = 0) -> float:
    """Recall on the forgotten classes' test samples of a logistic-regression probe fitted on
    the train split's features with true labels (all classes; at most PROBE_MAX_TRAIN samples)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

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
    from sklearn.metrics import silhouette_samples

    with one_blas_thread():
        scores = silhouette_samples(features, labels, metric="cosine")
    return float(scores[np.isin(labels, list(forget_classes))].mean())


def relearn_steps(model: MaskedClassifier, forget_samples: ImageSet, forget_test: ImageSet, max_steps: int,
                  lr: float = 1e-3) -> int:
    """Full-batch Adam steps of plain cross-entropy on the forget samples until accuracy on the
    forget test samples exceeds 50%; `max_steps` when it never does. Give it the unmasked model."""
    from nhle.core.training import predict

    model = copy.deepcopy(model).cpu().eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = as_float(forget_samples.images), forget_samples.labels
    for step in range(max_steps):
        if accuracy(predict(model, forget_test)[0], forget_test.labels) > 0.5:
            return step
        model.eval()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return max_steps


def evaluate_forgetting(model: MaskedClassifier, data: Splits, forget_classes, forget_samples: ImageSet,
                        attack_model: MaskedClassifier | None = None, relearn_max_steps: int = 100,
                        relearn_lr: float = 1e-3, seed: int = 0) -> dict:
    """The nine metrics of `model` for forgetting `forget_classes`. `attack_model` is the model
    with the mask taken off (see masking.without_mask); None means the model has no mask on
    these classes, so the attack is the model itself."""
    from nhle.core.training import predict

    forget_classes = sorted(forget_classes)
    forget_test, retain_test = split_by_classes(data.test, forget_classes)
    forget_train, retain_train = split_by_classes(data.train, forget_classes)
    train_logits, train_features = predict(model, data.train)
    test_logits, test_features = predict(model, data.test)
    train_forget = torch.isin(data.train.labels, torch.tensor(forget_classes))
    test_forget = torch.isin(data.test.labels, torch.tensor(forget_classes))
    attack_model = attack_model if attack_model is not None else model
    attack_logits = predict(attack_model, forget_test)[0]
    train_conf = true_label_probability(train_logits, data.train.labels)
    test_conf = true_label_probability(test_logits, data.test.labels)
    return {
        "forget_test_acc": accuracy(test_logits[test_forget], forget_test.labels),
        "retain_test_acc": accuracy(test_logits[~test_forget], retain_test.labels),
        "forget_train_acc": accuracy(train_logits[train_forget], forget_train.labels),
        "retain_train_acc": accuracy(train_logits[~train_forget], retain_train.labels),
        "mia_efficacy": mia_efficacy(train_conf[~train_forget.numpy()], test_conf[~test_forget.numpy()],
                                     train_conf[train_forget.numpy()], seed),
        "probe_forget_acc": probe_forget_acc(train_features.numpy(), data.train.labels.numpy(),
                                             test_features.numpy(), data.test.labels.numpy(), forget_classes, seed),
        "unmasked_forget_test_acc": accuracy(attack_logits, forget_test.labels),
        "forget_silhouette": forget_silhouette(test_features.numpy(), data.test.labels.numpy(), forget_classes),
        "relearn_steps": relearn_steps(attack_model, forget_samples, forget_test, relearn_max_steps, relearn_lr),
    }
