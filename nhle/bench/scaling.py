"""`nhle bench scaling`: NHLE's cost stays flat while retraining grows with the training set.

    nhle bench scaling --sizes 2000,20000,200000 --out bench/scaling     # ~10 min on 2 CPU cores
    nhle bench scaling --quick --out /tmp/scaling                         # CI: 2 small sizes

The data (nhle.bench.synthetic) is synthetic but has real class structure: each class is a random smooth 16x16 pattern
(a few Gaussian blobs), and each sample is its class pattern shifted by up to 2 pixels, scaled in
contrast, plus pixel noise, so a CNN must learn shift-tolerant shape features; classes overlap
enough that accuracy is below 100%. For every size the same recipe trains a base model; then
class 0 is forgotten by NHLE (32 samples, as always) and by retraining from scratch without it.
Writes scaling.json, scaling.md and scaling.png (seconds against training-set size, log-log).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from nhle.bench.synthetic import synthetic_splits
from nhle.bench.unlearning import measured_on, write_report
from nhle.core.config import TrainConfig, UnlearnConfig
from nhle.core.data import sample_per_class, split_by_classes
from nhle.core.training import evaluate, train_model
from nhle.core.unlearning import unlearn


def bench_scaling(
    sizes=(2000, 20000, 200000),
    out: Path = Path("bench/scaling"),
    epochs: int = 5,
    seed: int = 0,
    forget_class: int = 0,
    config: UnlearnConfig = UnlearnConfig(),
    device: str = "auto",
) -> list[dict]:
    """Train, unlearn with NHLE and retrain at each size; one row per size, written as it goes."""
    out.mkdir(parents=True, exist_ok=True)
    train_config = replace(TrainConfig(), epochs=epochs, device=device)
    rows = []
    for size in sizes:
        data = synthetic_splits(size, seed=seed)
        model, train_seconds = train_model(data, train_config, seed=seed, progress=False)
        samples = sample_per_class(data.train, [forget_class], config.n_samples, seed)
        result = unlearn(model, samples, [forget_class], config, device=device)
        retrained, retrain_seconds = train_model(data, train_config, seed=seed, exclude=[forget_class], progress=False)
        forget_test, retain_test = split_by_classes(data.test, [forget_class])
        rows.append(
            {
                "train_size": size,
                "epochs": epochs,
                "train_seconds": train_seconds,
                "nhle_seconds": result.seconds,
                "nhle_steps": result.steps,
                "retrain_seconds": retrain_seconds,
                "ratio": result.seconds / retrain_seconds,
                "original_retain_test_acc": evaluate(model, retain_test),
                "nhle_forget_test_acc": evaluate(result.model, forget_test),
                "nhle_retain_test_acc": evaluate(result.model, retain_test),
                "retrain_retain_test_acc": evaluate(retrained, retain_test),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        (out / "scaling.json").write_text(json.dumps(rows, indent=2) + "\n")
    header = (
        f"NHLE vs retraining as the training set grows: synthetic 16x16 data, 10 classes, small CNN, "
        f"{epochs} epochs, forget class {forget_class}; {measured_on()}"
    )
    scaling_plot(rows, out / "scaling.png")
    write_report(out, "scaling", header, scaling_table(rows))
    return rows


def scaling_table(rows: list[dict]) -> str:
    lines = [
        "| train samples | NHLE s (steps) | retrain s | NHLE / retrain | retain acc: original / NHLE / retrain "
        "| forget acc after NHLE |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['train_size']:,} | {r['nhle_seconds']:.2f} ({r['nhle_steps']}) | {r['retrain_seconds']:.1f} "
            f"| {r['ratio']:.4f} | {100 * r['original_retain_test_acc']:.1f}% / "
            f"{100 * r['nhle_retain_test_acc']:.1f}% / {100 * r['retrain_retain_test_acc']:.1f}% "
            f"| {100 * r['nhle_forget_test_acc']:.1f}% |"
        )
    return "\n".join(lines)


def scaling_plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib  # noqa: PLC0415 - lazy: matplotlib: only when drawing

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415 - lazy: matplotlib: only when drawing
    except ImportError:
        return None
    sizes = [r["train_size"] for r in rows]
    figure, axis = plt.subplots(figsize=(6, 4.5))
    axis.loglog(sizes, [r["retrain_seconds"] for r in rows], "o-", color="tab:green", label="retrain")
    axis.loglog(sizes, [r["nhle_seconds"] for r in rows], "o-", color="tab:red", label="NHLE (32 samples)")
    axis.set(xlabel="training samples", ylabel="seconds", title="Cost of forgetting one class")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


__all__ = ["bench_scaling"]
