"""`nhle bench unlearning`: NHLE against retraining, the published baselines and its own ablations.

    nhle bench unlearning --seeds 0,1,2 --out bench/unlearning          # digits, small CNN, ~15 min
    nhle bench unlearning --model resnet18 --image-size 32 --epochs 3 --seeds 0 --classes 3
    nhle bench unlearning --quick --out /tmp/quick                       # CI: 1 seed, 2 classes + 1 triple
    nhle bench unlearning --dataset cifar10 --data-root ~/data --model resnet18 --device cuda   # on a GPU

For each seed one base model is trained. For each case (every class alone, then the `--multi`
classes together) one model is retrained without the classes (the gold standard), and every
method unlearns them from that same base model, with the same forget samples, in one run on one
machine; times are ratios to that retrain. Methods: `nhle` (the configured NHLE + masking),
`retrain`, the baselines of nhle.unlearning.baselines, and the ablations in ABLATIONS. Writes
runs.jsonl (one line per run), summary.json, summary.md (mean ± std over runs) and tradeoff.png
(retained drop against the linear probe, point size = time).
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from nhle.config import ENCODINGS, DataConfig, TrainConfig, UnlearnConfig
from nhle.data import sample_per_class
from nhle.experiment import load_data, retrain_without, train_base
from nhle.metrics import evaluate_forgetting
from nhle.unlearning import unlearn, without_mask
from nhle.unlearning.baselines import BASELINES, run_baseline

ABLATIONS = {"mask_only": {"max_steps": 0}, "nhle_no_mask": {"mask": False}, "nhle_no_anchor": {"anchor_weight": 0.0},
             "nhle_head_only": {"layers": "head"},
             **{f"encoding_{e}": {"encoding": e} for e in ENCODINGS}}
METHODS = ("nhle", "retrain", *BASELINES, *ABLATIONS)
SUMMARY_KEYS = ("forget_test_acc", "retain_test_acc", "retained_drop_pp", "unmasked_forget_test_acc", "mia_efficacy",
                "probe_forget_acc", "forget_silhouette", "relearn_steps", "seconds", "seconds_vs_retrain")


def measured_on() -> str:
    """'measured <date> on <host> (<arch>, torch threads: N)': the stamp every benchmark table carries."""
    import torch

    return (f"measured {time.strftime('%Y-%m-%d')} on {platform.node() or 'this machine'} "
            f"({platform.machine()}, torch threads: {torch.get_num_threads()})")


def write_report(out: Path, name: str, header: str, table: str) -> None:
    """out/<name>.md = header + table, and the same on stdout."""
    (out / f"{name}.md").write_text(header + "\n\n" + table + "\n")
    print(header + "\n\n" + table)


def parse_methods(text: str) -> list[str]:
    methods = list(METHODS) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)} or 'all'")
    return list(dict.fromkeys(["retrain", *methods]))  # retrain is the reference of every ratio


def cases(num_classes: int, classes: str, multi: str) -> list[list[int]]:
    singles = range(num_classes) if classes == "all" else [int(c) for c in str(classes).split(",")]
    out = [[c] for c in singles]
    if multi and multi != "none":
        out.append(sorted(int(c) for c in multi.split(",")))
    for case in out:
        if not all(0 <= c < num_classes for c in case):
            raise ValueError(f"class(es) {case} out of range 0..{num_classes - 1}")
    return out


def run_case(model, data, classes, seed, methods, base: UnlearnConfig, train_config: TrainConfig,
             device: str) -> list[dict]:
    """Every method on one (seed, classes) case; one row each."""
    samples = sample_per_class(data.train, classes, base.n_samples, seed)

    def measure(candidate, attack=None):
        return evaluate_forgetting(candidate, data, classes, samples, attack, base.relearn_max_steps, base.relearn_lr,
                                   seed)

    original = measure(model)
    retrained = retrain_without(data, train_config, classes, seed, progress=False)
    results = {"retrain": (measure(retrained[0], without_mask(retrained[0], retrained[1])), retrained[2], None)}
    for method in methods:
        if method == "retrain":
            continue
        if method in BASELINES:
            result = run_baseline(method, model, data, classes, seed, device)
            results[method] = (measure(result.model), result.seconds, result.steps)
        else:
            result = unlearn(model, samples, classes, replace(base, **ABLATIONS.get(method, {})), device=device)
            attacked = without_mask(result.model, result.snapshot) if result.snapshot else None
            results[method] = (measure(result.model, attacked), result.seconds, result.steps)
    rows = []
    for method, (metrics, seconds, steps) in results.items():
        rows.append({"method": method, "seed": seed, "forget_classes": list(classes), "case": case_kind(classes),
                     **metrics, "original": original,
                     "retained_drop_pp": 100 * (original["retain_test_acc"] - metrics["retain_test_acc"]),
                     "seconds": seconds, "seconds_vs_retrain": seconds / retrained[2], "steps": steps})
    return rows


def case_kind(classes) -> str:
    return "one class" if len(classes) == 1 else f"{len(classes)} classes"


def bench_unlearning(dataset: str = "digits", seeds=(0, 1, 2), classes="all", multi: str = "2,5,8",
                     methods=METHODS, out: Path = Path("bench/unlearning"), quick: bool = False,
                     base: UnlearnConfig = UnlearnConfig(), train_config: TrainConfig = TrainConfig(),
                     image_size: int | None = None, device: str = "auto", root: str | None = None) -> list[dict]:
    if quick:
        seeds, train_config = list(seeds)[:1], replace(train_config, epochs=3)
    methods = parse_methods(",".join(methods)) if not isinstance(methods, str) else parse_methods(methods)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(out / "runs.jsonl", "w") as runs:
        for seed in seeds:
            data_config = DataConfig(dataset=dataset, seed=seed, image_size=image_size, root=root)
            data = load_data(data_config)
            model, _ = train_base(data_config, train_config, data=data, progress=False)
            all_cases = cases(data.num_classes, classes, multi)
            if quick:
                all_cases = all_cases[:2] + ([all_cases[-1]] if len(all_cases[-1]) > 1 else [])
            for case in all_cases:
                new = run_case(model, data, case, seed, methods, base, train_config, device)
                rows += new
                for row in new:
                    runs.write(json.dumps(row) + "\n")
                runs.flush()
                print(f"seed {seed} classes {case}: " + ", ".join(
                    f"{r['method']} {100 * r['forget_test_acc']:.0f}%/{r['retained_drop_pp']:.1f}pp" for r in new),
                    flush=True)
    summary = summarise(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    header = (f"Unlearning benchmark: {dataset}, {train_config.model} ({train_config.epochs} epochs), seeds "
              f"{list(seeds)}, {measured_on()}; NHLE: {base}")
    tradeoff_plot(summary, out / "tradeoff.png")
    write_report(out, "summary", header, markdown_table(summary))
    return rows


def summarise(rows: list[dict]) -> dict:
    """{case kind: {method: {runs, key: {mean, std, max}}, 'original': {...}}}."""
    summary = {}
    for kind in dict.fromkeys(r["case"] for r in rows):
        summary[kind] = {}
        for method in dict.fromkeys(r["method"] for r in rows if r["case"] == kind):
            mine = [r for r in rows if r["case"] == kind and r["method"] == method]
            entry = {"runs": len(mine)}
            for key in SUMMARY_KEYS:
                values = np.array([r[key] for r in mine], dtype=float)
                entry[key] = {"mean": float(values.mean()), "std": float(values.std()), "max": float(values.max())}
            summary[kind][method] = entry
        originals = [r["original"] for r in rows if r["case"] == kind and r["method"] == "retrain"]
        summary[kind]["original"] = {key: float(np.mean([o[key] for o in originals]))
                                     for key in ("retain_test_acc", "probe_forget_acc", "forget_silhouette",
                                                 "mia_efficacy")}
    return summary


def markdown_table(summary: dict) -> str:
    def pm(entry, key, scale=1.0, digits=2):
        return f"{scale * entry[key]['mean']:.{digits}f} ± {scale * entry[key]['std']:.{digits}f}"

    lines = []
    for kind, methods in summary.items():
        original = methods["original"]
        lines += [f"### {kind}", "",
                  "| method | runs | forget test acc % | retain test acc % | retained drop pp | worst drop pp "
                  "| mask-removal attack % | MIA efficacy | probe forget acc % | silhouette | relearn steps "
                  "| seconds | time / retrain |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for method, entry in methods.items():
            if method == "original":
                continue
            lines.append(f"| {method} | {entry['runs']} | {pm(entry, 'forget_test_acc', 100, 1)} | "
                         f"{pm(entry, 'retain_test_acc', 100, 1)} | {pm(entry, 'retained_drop_pp')} | "
                         f"{entry['retained_drop_pp']['max']:.2f} | {pm(entry, 'unmasked_forget_test_acc', 100, 1)} | "
                         f"{pm(entry, 'mia_efficacy')} | {pm(entry, 'probe_forget_acc', 100, 1)} | "
                         f"{pm(entry, 'forget_silhouette')} | {pm(entry, 'relearn_steps', 1, 1)} | "
                         f"{pm(entry, 'seconds', 1, 2)} | {pm(entry, 'seconds_vs_retrain', 1, 3)} |")
        lines += ["", f"Original model: retain test acc {100 * original['retain_test_acc']:.1f}%, probe forget acc "
                      f"{100 * original['probe_forget_acc']:.1f}%, silhouette {original['forget_silhouette']:.2f}, "
                      f"MIA efficacy {original['mia_efficacy']:.2f}. For methods without a mask the mask-removal "
                      "attack is the model itself.", ""]
    return "\n".join(lines)


def tradeoff_plot(summary: dict, path: Path) -> Path | None:
    """Retained drop (x) against probe forget accuracy (y), point area ~ time / retrain."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plain core (e.g. a GPU image) need not have matplotlib
        return None
    kinds = list(summary)
    figure, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 5), squeeze=False)
    for axis, kind in zip(axes[0], kinds):
        for method, entry in summary[kind].items():
            if method not in ("nhle", "retrain", *BASELINES):  # the ablations are in the table
                continue
            x, y = entry["retained_drop_pp"]["mean"], 100 * entry["probe_forget_acc"]["mean"]
            size = 30 + 400 * min(entry["seconds_vs_retrain"]["mean"], 3.0)
            color = "tab:red" if method == "nhle" else "tab:green" if method == "retrain" else "tab:blue"
            forgot = entry["forget_test_acc"]["mean"] <= 0.05  # hollow: the class is still predicted
            axis.scatter(x, y, s=size, alpha=0.6, color=color if forgot else "none", edgecolors=color, linewidths=1.5)
            axis.annotate(method, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
        axis.axhline(100 * summary[kind]["original"]["probe_forget_acc"], color="grey", lw=0.8, ls="--")
        axis.set(title=f"{kind}: area ~ time / retrain; hollow = forget acc > 5%", xlabel="retained accuracy drop (pp)",
                 ylabel="linear probe on forgotten classes (%)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


__all__ = ["ABLATIONS", "METHODS", "bench_unlearning", "cases", "parse_methods", "summarise"]
