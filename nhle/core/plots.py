"""Evidence plots of an unlearning run: what the model got right before and after, where its
predictions went, and how the forgotten classes sit in its feature space.

    from nhle.core.plots import write_evidence_plots
    paths = write_evidence_plots(original, unlearned, data, forget_classes=[3], folder="out/plots")
    # {"per_class_accuracy": .../per_class_accuracy.png,
    #  "confusion_matrix":   .../confusion_matrix.png,        (the unlearned model)
    #  "feature_projection": .../feature_projection.png}

or one plot at a time, on any ImageSet (usually the test split):

    from nhle.core.plots import per_class_accuracy, confusion_matrix, feature_projection
    per_class_accuracy(original, unlearned, data.test, data.class_names, [3], "acc.png")
    confusion_matrix(unlearned, data.test, data.class_names, [3], "cm.png", title="After unlearning")
    feature_projection(original, unlearned, data.test, data.class_names, [3], "pca.png")

The figures are drawn on matplotlib's Agg canvas directly (`matplotlib.figure.Figure`, never
`pyplot`), so they work headless, leave the caller's pyplot backend and figure list alone, and
are freed as soon as they are saved. Forgotten classes are drawn in red throughout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nhle.core.data import ImageSet, Splits
from nhle.core.metrics import one_blas_thread
from nhle.core.training import predict

DPI = 110
MAX_ANNOTATED_CLASSES = 20  # confusion-matrix cells get their count written up to this many classes
MAX_PROJECTED_POINTS = 3000  # feature projection subsamples (seeded) beyond this many samples
FORGET_COLOUR = "#d62728"
BEFORE_COLOUR = "#7f9fbf"
AFTER_COLOUR = "#2b5d8a"
# Strong, distinct colours (and markers) for the forgotten classes; the first is FORGET_COLOUR.
FORGET_PALETTE = ["#d62728", "#111111", "#e377c2", "#ff7f0e", "#8c564b", "#9467bd", "#17becf", "#bcbd22"]
FORGET_MARKERS = ["X", "D", "P", "^", "s", "v", "*", "o"]


# --------------------------------------------------------------------------- helpers


def _new_figure(width: float, height: float, ncols: int = 1):
    """A pyplot-free figure on an Agg canvas (headless, nothing registered globally)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - lazy: matplotlib: only when drawing
    from matplotlib.figure import Figure  # noqa: PLC0415 - lazy: matplotlib: only when drawing

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=DPI, format="png", bbox_inches="tight", facecolor="white")
    finally:
        fig.clear()  # drop the artists now rather than at garbage collection
    return path


def _classes(forget_classes) -> list[int]:
    return sorted({int(c) for c in forget_classes})


def _check_names(class_names, num_classes: int) -> list[str]:
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a model with {num_classes} classes")
    return names


def _per_class_accuracy(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Share of each class's samples predicted as that class; nan for a class with no samples."""
    correct = np.bincount(labels, weights=(predictions == labels).astype(float), minlength=num_classes)
    total = np.bincount(labels, minlength=num_classes).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


def _confusion(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(num_classes, num_classes)


def _tick_fontsize(num_classes: int) -> float:
    return 10 if num_classes <= 20 else 8 if num_classes <= 40 else 6 if num_classes <= 70 else 5


def _shown_ticks(num_classes: int, forget, max_labels: int) -> np.ndarray:
    """Every class up to `max_labels`, else every n-th one; forgotten classes always."""
    forget = np.asarray(sorted(forget), dtype=int)
    if num_classes <= max_labels:
        return np.arange(num_classes)
    step = int(np.ceil(num_classes / max_labels))
    regular = np.arange(0, num_classes, step)
    if len(forget):  # make room for the forgotten classes' labels
        regular = regular[np.abs(regular[:, None] - forget[None, :]).min(1) >= step]
    return np.union1d(regular, forget).astype(int)


def _set_class_ticks(ax, axis: str, shown: np.ndarray, class_names: list[str], forget: set[int]) -> None:
    """Class-name tick labels on `axis` ('x' or 'y'), forgotten ones red and bold."""
    k = len(class_names)
    names = [class_names[i] for i in shown]
    fontsize = _tick_fontsize(len(shown) if len(shown) < k else k)
    if axis == "x":
        rotate = max(map(len, names)) > 3 or len(shown) > 30
        ax.set_xticks(shown)
        ax.set_xticklabels(
            names,
            rotation=60 if rotate else 0,
            ha="right" if rotate else "center",
            rotation_mode="anchor" if rotate else "default",
            fontsize=fontsize,
        )
        labels = ax.get_xticklabels()
    else:
        ax.set_yticks(shown)
        ax.set_yticklabels(names, fontsize=fontsize)
        labels = ax.get_yticklabels()
    for index, label in zip(shown, labels):
        if index in forget:
            label.set_color(FORGET_COLOUR)
            label.set_fontweight("bold")


def _lighten(colour, amount: float = 0.5):
    from matplotlib.colors import to_rgb  # noqa: PLC0415 - lazy: matplotlib: only when drawing

    rgb = np.asarray(to_rgb(colour))
    return tuple(rgb + (1.0 - rgb) * amount)


def _forgotten_label(class_names: list[str], forget: list[int], max_names: int = 5) -> str:
    if len(forget) > max_names:
        return f"{len(forget)} classes"
    return ", ".join(class_names[c] for c in forget)


def confusion_headline(predictions, labels, class_names, forget_classes) -> str:
    """The confusion matrix's headline: accuracy on the retained classes' samples and,
    separately, on the forgotten classes' samples (near 0 after a successful unlearning), e.g.
    "retained classes: accuracy 0.980 on 48 samples; forgotten (3): 0.000 on 8".
    A single accuracy over all samples would count the forgotten class's (correctly) missed
    samples as errors and make a good unlearning read like a failure."""
    predictions = np.asarray(predictions).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    names = [str(n) for n in class_names]
    forget = _classes(forget_classes)
    forgotten = np.isin(labels, forget)
    correct = predictions == labels

    def accuracy(mask) -> str:
        return f"{float(correct[mask].mean()):.3f}" if mask.any() else "n/a"

    if not forget:
        return f"accuracy {accuracy(np.ones_like(labels, dtype=bool))} on {len(labels)} samples; no forgotten classes"
    retained = ~forgotten
    return (
        f"retained classes: accuracy {accuracy(retained)} on {int(retained.sum())} samples; "
        f"forgotten ({_forgotten_label(names, forget)}): {accuracy(forgotten)} on {int(forgotten.sum())}"
    )


# --------------------------------------------------------------------------- drawing (from predictions)


def _draw_per_class_accuracy(
    before: np.ndarray, after: np.ndarray, class_names: list[str], forget: list[int], path
) -> Path:
    from matplotlib.patches import Patch  # noqa: PLC0415 - lazy: matplotlib: only when drawing

    k = len(class_names)
    forget_set = set(forget)
    fig, ax = _new_figure(max(7.0, min(0.45 * k + 2.5, 24.0)), 4.6)
    x = np.arange(k)
    width = 0.4
    for c in forget:
        ax.axvspan(c - 0.5, c + 0.5, color=FORGET_COLOUR, alpha=0.08, lw=0, zorder=0)
    after_colours = [FORGET_COLOUR if c in forget_set else AFTER_COLOUR for c in range(k)]
    for side, values, colours, when in ((-1, before, BEFORE_COLOUR, "before"), (1, after, after_colours, "after")):
        style = {"color": colours, "edgecolor": "white", "lw": 0.5, "label": f"{when} unlearning", "zorder": 2}
        bars = ax.bar(x + side * width / 2, np.nan_to_num(values), width, **style)  # the last: the after bars
    for c in forget:
        bars[c].set_hatch("///")
        bars[c].set_edgecolor("white")
        if k <= 40:  # write both values over a forgotten class: usually a tall bar next to nothing
            for offset, value in ((-width / 2, before[c]), (width / 2, after[c])):
                if np.isfinite(value):
                    ax.text(
                        c + offset,
                        value + 0.015,
                        f"{value:.2f}",
                        ha="center",
                        va="bottom",
                        fontsize=8.5,
                        color=FORGET_COLOUR if offset > 0 else "#333333",
                        zorder=3,
                    )
    _set_class_ticks(ax, "x", _shown_ticks(k, forget, 60), class_names, forget_set)
    ax.set_xlim(-0.6, k - 0.4)
    ax.set_ylim(0, 1.12)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_xlabel("class (forgotten in red)")
    ax.set_ylabel("test accuracy")
    ax.grid(axis="y", alpha=0.3, zorder=0)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    retained = np.array([c not in forget_set for c in range(k)])
    summary = []
    for name, values in (("before", before), ("after", after)):
        summary.append(
            f"{name}: forget {np.nanmean(values[~retained]):.2f}, retain {np.nanmean(values[retained]):.2f}"
            if (~retained).any() and retained.any()
            else name
        )
    ax.set_title(
        f"Per-class test accuracy before vs after unlearning\n(mean over classes, {summary[0]}; {summary[1]})",
        fontsize=11,
    )
    handles = [
        Patch(color=BEFORE_COLOUR, label="before unlearning"),
        Patch(color=AFTER_COLOUR, label="after unlearning"),
        Patch(facecolor=FORGET_COLOUR, edgecolor="white", hatch="///", label="after, forgotten class"),
    ]
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=3, frameon=False, fontsize=9)
    return _save(fig, path)


def _draw_confusion_matrix(
    predictions: np.ndarray, labels: np.ndarray, class_names: list[str], forget: list[int], path, title: str
) -> Path:
    from matplotlib.patches import Rectangle  # noqa: PLC0415 - lazy: matplotlib: only when drawing

    k = len(class_names)
    forget_set = set(forget)
    counts = _confusion(predictions, labels, k)
    row_totals = counts.sum(1, keepdims=True)
    shares = counts / np.maximum(row_totals, 1)
    side = max(5.5, min(0.42 * k + 2.5, 16.0))
    fig, ax = _new_figure(side + 1.2, side)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest", aspect="equal")
    colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    colorbar.set_label("share of the true class's samples")
    if k <= MAX_ANNOTATED_CLASSES:
        fontsize = 9 if k <= 12 else 7
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(
                        j,
                        i,
                        str(counts[i, j]),
                        ha="center",
                        va="center",
                        fontsize=fontsize,
                        color="white" if shares[i, j] > 0.55 else "#222222",
                    )
    for c in forget:  # outline the forgotten class's row (true) and column (predicted)
        ax.add_patch(Rectangle((-0.5, c - 0.5), k, 1, fill=False, edgecolor=FORGET_COLOUR, lw=2.0, zorder=3))
        ax.add_patch(Rectangle((c - 0.5, -0.5), 1, k, fill=False, edgecolor=FORGET_COLOUR, lw=2.0, ls="--", zorder=3))
    shown = _shown_ticks(k, forget, 50)
    _set_class_ticks(ax, "x", shown, class_names, forget_set)
    _set_class_ticks(ax, "y", shown, class_names, forget_set)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    outlined = ", outlined in red" if forget else ""
    ax.set_title(
        f"{title}\n({confusion_headline(predictions, labels, class_names, forget)}{outlined})",
        fontsize=11 if k <= 30 else 14,
    )
    return _save(fig, path)


def _project(features: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """2-D PCA of `features` (fitted on them) and the explained variance ratio of each axis."""
    from sklearn.decomposition import PCA  # noqa: PLC0415 - lazy: scikit-learn

    features = np.asarray(features, dtype=np.float64)
    n_components = min(2, features.shape[0], features.shape[1])
    with one_blas_thread():  # a 2-component PCA of a few thousand rows: milliseconds on one thread
        try:  # the covariance solver (scikit-learn >= 1.5) is the fast one for N >> D
            pca = PCA(n_components=n_components, svd_solver="covariance_eigh", random_state=seed)
            points = pca.fit_transform(features)
        except ValueError:  # older scikit-learn, or a shape that solver refuses
            pca = PCA(n_components=n_components, svd_solver="full", random_state=seed)
            points = pca.fit_transform(features)
    ratio = np.nan_to_num(pca.explained_variance_ratio_)
    if n_components < 2:  # degenerate input: pad with a zero axis so there is still a scatter
        points = np.hstack([points, np.zeros((len(points), 2 - n_components))])
        ratio = np.concatenate([ratio, np.zeros(2 - n_components)])
    return points, ratio


def _draw_feature_projection(
    before: np.ndarray,
    after: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    forget: list[int],
    path,
    seed: int,
) -> Path:
    import matplotlib  # noqa: PLC0415 - lazy: matplotlib: only when drawing
    from matplotlib.lines import Line2D  # noqa: PLC0415 - lazy: matplotlib: only when drawing

    k = len(class_names)
    forget_set = set(forget)
    if len(labels) > MAX_PROJECTED_POINTS:
        keep = np.sort(np.random.default_rng(seed).choice(len(labels), MAX_PROJECTED_POINTS, replace=False))
        before, after, labels = before[keep], after[keep], labels[keep]
    # Retained classes: tab10/tab20 without its reds (kept for the forgotten), lightened.
    retained_classes = [c for c in range(k) if c not in forget_set]
    if len(retained_classes) <= 9:
        palette = [matplotlib.colormaps["tab10"](i) for i in range(10) if i != 3]
    else:
        palette = [matplotlib.colormaps["tab20"](i) for i in range(20) if i not in (6, 7)]
    muted = {c: _lighten(palette[i % len(palette)], 0.4) for i, c in enumerate(retained_classes)}
    strong = {
        c: (FORGET_PALETTE[i % len(FORGET_PALETTE)], FORGET_MARKERS[i % len(FORGET_MARKERS)])
        for i, c in enumerate(forget)
    }
    retained_mask = ~np.isin(labels, forget)
    fig, axes = _new_figure(13.5, 6.0, ncols=2)
    for ax, features, name in ((axes[0], before, "before unlearning"), (axes[1], after, "after unlearning")):
        points, ratio = _project(features, seed)
        if retained_mask.any():
            colours = np.array([muted[c] for c in labels[retained_mask]])
            ax.scatter(
                points[retained_mask, 0],
                points[retained_mask, 1],
                s=12,
                c=colours,
                alpha=0.65,
                linewidths=0,
                zorder=1,
                rasterized=True,
            )
        if k <= 20:  # name each retained class at its centroid, in its own colour darkened
            for c in muted:
                members = points[labels == c]
                if len(members):
                    cx, cy = np.median(members, axis=0)
                    ax.text(
                        cx,
                        cy,
                        class_names[c],
                        fontsize=9,
                        ha="center",
                        va="center",
                        color="#555555",
                        zorder=2,
                        bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.6),
                    )
        for c, (colour, marker) in strong.items():
            members = points[labels == c]
            ax.scatter(
                members[:, 0],
                members[:, 1],
                s=55,
                c=colour,
                marker=marker,
                edgecolors="white",
                linewidths=0.6,
                zorder=3,
            )
        ax.set_title(f"{name}", fontsize=12)
        ax.set_xlabel(f"PC 1 ({ratio[0]:.0%} of variance)")
        ax.set_ylabel(f"PC 2 ({ratio[1]:.0%} of variance)")
        ax.grid(alpha=0.25)
        ax.tick_params(labelsize=8)
    handles = [
        Line2D(
            [],
            [],
            ls="",
            marker=marker,
            markersize=9,
            color=colour,
            markeredgecolor="white",
            label=f"forgotten: {class_names[c]}",
        )
        for c, (colour, marker) in strong.items()
    ]
    handles.append(
        Line2D([], [], ls="", marker="o", markersize=6, color="#bbbbbb", label=f"retained classes ({len(muted)})")
    )
    rows = int(np.ceil(len(handles) / 6))
    fig.suptitle(f"Penultimate features, 2-D PCA fitted separately for each model ({len(labels)} samples)", fontsize=13)
    fig.tight_layout(rect=(0, 0.045 * rows, 1, 1))
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=min(len(handles), 6),
        frameon=False,
        fontsize=10,
        bbox_to_anchor=(0.5, 0.0),
    )
    return _save(fig, path)


# --------------------------------------------------------------------------- public API


def _outputs(model, data: ImageSet) -> tuple[np.ndarray, np.ndarray]:
    """(predicted classes, penultimate features) as numpy arrays."""
    logits, features = predict(model, data)
    return logits.argmax(1).numpy(), features.float().numpy()


def per_class_accuracy(original, unlearned, data: ImageSet, class_names, forget_classes, path) -> Path:
    """Grouped bars of each class's accuracy on `data` before vs after unlearning, forgotten
    classes shaded, hatched and labelled in red; saved as a PNG at `path`."""
    names = _check_names(class_names, original.num_classes)
    labels = data.labels.numpy()
    before = _per_class_accuracy(_outputs(original, data)[0], labels, len(names))
    after = _per_class_accuracy(_outputs(unlearned, data)[0], labels, len(names))
    return _draw_per_class_accuracy(before, after, names, _classes(forget_classes), path)


def confusion_matrix(
    model, data: ImageSet, class_names, forget_classes, path, title: str = "Confusion matrix after unlearning"
) -> Path:
    """Heat map of `model`'s confusion matrix on `data` (rows true, columns predicted; coloured by
    share of the row, counts written for up to 20 classes), forgotten classes outlined in red."""
    names = _check_names(class_names, model.num_classes)
    predictions, _ = _outputs(model, data)
    return _draw_confusion_matrix(predictions, data.labels.numpy(), names, _classes(forget_classes), path, title)


def feature_projection(original, unlearned, data: ImageSet, class_names, forget_classes, path, seed: int = 0) -> Path:
    """2-D PCA of penultimate features before (left) vs after (right) unlearning, one PCA per
    model; retained classes muted, forgotten classes in large strong markers; saved as a PNG."""
    names = _check_names(class_names, original.num_classes)
    _, before = _outputs(original, data)
    _, after = _outputs(unlearned, data)
    return _draw_feature_projection(before, after, data.labels.numpy(), names, _classes(forget_classes), path, seed)


def write_evidence_plots(
    original, unlearned, data: Splits, forget_classes, folder, include_original_confusion: bool = False, seed: int = 0
) -> dict[str, Path]:
    """The three evidence plots on `data.test`, in `folder`: per_class_accuracy.png,
    confusion_matrix.png (the unlearned model) and feature_projection.png, plus
    confusion_matrix_original.png when `include_original_confusion`. Each model is run once.
    Returns {name without .png: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = _check_names(data.class_names, original.num_classes)
    forget = _classes(forget_classes)
    test = data.test
    labels = test.labels.numpy()
    before_pred, before_feat = _outputs(original, test)
    after_pred, after_feat = _outputs(unlearned, test)
    paths = {
        "per_class_accuracy": _draw_per_class_accuracy(
            _per_class_accuracy(before_pred, labels, len(names)),
            _per_class_accuracy(after_pred, labels, len(names)),
            names,
            forget,
            folder / "per_class_accuracy.png",
        ),
        "confusion_matrix": _draw_confusion_matrix(
            after_pred, labels, names, forget, folder / "confusion_matrix.png", "Confusion matrix after unlearning"
        ),
        "feature_projection": _draw_feature_projection(
            before_feat, after_feat, labels, names, forget, folder / "feature_projection.png", seed
        ),
    }
    if include_original_confusion:
        paths["confusion_matrix_original"] = _draw_confusion_matrix(
            before_pred,
            labels,
            names,
            forget,
            folder / "confusion_matrix_original.png",
            "Confusion matrix before unlearning",
        )
    return paths
