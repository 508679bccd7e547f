"""`nhle bench unlearning`: NHLE against retraining, the published baselines and its own ablations.

    nhle bench unlearning --seeds 0,1,2 --out bench/unlearning          # digits, small CNN, ~15 min
    nhle bench unlearning --model resnet18_cifar --image-size 32 --epochs 3 --seeds 0 --classes 3
    nhle bench unlearning --model mobilenet_v3_small --image-size 32 --epochs 30   # any torchvision / timm/ name
    nhle bench unlearning --quick --out /tmp/quick                       # CI: 1 seed, 2 classes + 1 triple
    nhle bench unlearning --dataset cifar10 --data-root ~/data --model resnet18_cifar --device cuda   # on a GPU

For each seed one base model is trained. For each case (every class alone, then the `--multi`
classes together) one model is retrained without the classes (the gold standard), and every
method unlearns them from that same base model, with the same forget samples, in one run on one
machine; times are ratios to that retrain. Methods: `nhle` (the configured NHLE + masking),
`retrain`, the baselines of nhle.unlearning.baselines, and the ablations in ABLATIONS. Writes
runs.jsonl (one line per run), summary.json, summary.md (mean ± std over runs) and tradeoff.png
(retained drop against the linear probe, point size = time).
"""
from __future__ import annotations

import functools
import json
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from nhle.config import ENCODINGS, DataConfig, ModelConfig, TrainConfig, UnlearnConfig
from nhle.data import sample_per_class
from nhle.experiment import load_data, retrain_without, train_base
from nhle.metrics import evaluate_forgetting
from nhle.training import seed_everything, training_spec
from nhle.unlearning import unlearn, without_mask
from nhle.unlearning.baselines import BASELINES, run_baseline

ABLATIONS = {"mask_only": {"max_steps": 0}, "nhle_no_mask": {"mask": False}, "nhle_no_anchor": {"anchor_weight": 0.0},
             "nhle_head_only": {"layers": "head"},
             # Issue 14's candidates: each uses the forget samples and the model only.
             "nhle_synthetic": {"synthetic_per_class": 8},
             "nhle_l2sp": {"weight_anchor": 1000.0},
             "nhle_feature_pull": {"synthetic_per_class": 8, "feature_pull": 1.0},
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


@dataclass(frozen=True)
class Grid:
    """One benchmark. Every (seed, case, method) unit depends only on the seed's base model, so the
    units can run in any order, on any worker: `run_grid` gives the same rows either way."""
    dataset: str = "digits"
    seeds: tuple[int, ...] = (0, 1, 2)
    classes: str = "all"
    multi: str = "2,5,8"
    methods: tuple[str, ...] = METHODS
    base: UnlearnConfig = UnlearnConfig()
    arch: str = "smallcnn"
    train_config: TrainConfig = TrainConfig()
    image_size: int | None = None
    device: str = "auto"
    root: str | None = None
    quick: bool = False

    def __post_init__(self):
        methods = self.methods if isinstance(self.methods, str) else ",".join(self.methods)
        object.__setattr__(self, "methods", tuple(parse_methods(methods)))
        if self.quick:
            object.__setattr__(self, "seeds", tuple(self.seeds)[:1])
            object.__setattr__(self, "train_config", replace(self.train_config, epochs=3))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))

    def data_config(self, seed: int) -> DataConfig:
        return DataConfig(dataset=self.dataset, seed=seed, image_size=self.image_size, root=self.root)

    def cases(self, num_classes: int) -> list[list[int]]:
        found = cases(num_classes, self.classes, self.multi)
        if self.quick:
            found = found[:2] + ([found[-1]] if len(found[-1]) > 1 else [])
        return found

    def units(self, num_classes: int) -> list[tuple[int, list[int], str]]:
        """(seed, classes, method) of every run; 'original' measures the base model itself."""
        return [(seed, case, method) for seed in self.seeds for case in self.cases(num_classes)
                for method in ("original", *self.methods)]


@functools.lru_cache(maxsize=4)
def grid_data(data_config: DataConfig):
    return load_data(data_config)


def train_seed(grid: Grid, seed: int):
    """The base model every unit of `seed` starts from."""
    data_config = grid.data_config(seed)
    return train_base(data_config, grid.train_config, data=grid_data(data_config), progress=False,
                      model_config=ModelConfig(arch=grid.arch))[0]


def run_unit(grid: Grid, seed: int, classes: list[int], method: str, model) -> dict:
    """One method on one (seed, classes) case, from the seed's base model; seeded on its own so
    that neither the order of the units nor the process they run in changes the result."""
    seed_everything(seed)
    data = grid_data(grid.data_config(seed))
    base = grid.base
    samples = sample_per_class(data.train, classes, base.n_samples, seed)

    def measure(candidate, attack=None):
        return evaluate_forgetting(candidate, data, classes, samples, attack, base.relearn_max_steps, base.relearn_lr,
                                   seed)

    if method == "original":
        metrics, seconds, steps = measure(model), 0.0, None
    elif method == "retrain":
        retrained, snapshot, seconds = retrain_without(data, grid.train_config, classes, seed, progress=False,
                                                       spec=training_spec(ModelConfig(arch=grid.arch), data))
        metrics, steps = measure(retrained, without_mask(retrained, snapshot)), None
    elif method in BASELINES:
        result = run_baseline(method, model, data, classes, seed, grid.device)
        metrics, seconds, steps = measure(result.model), result.seconds, result.steps
    else:
        result = unlearn(model, samples, classes, replace(base, **ABLATIONS.get(method, {})), device=grid.device)
        attacked = without_mask(result.model, result.snapshot) if result.snapshot else None
        metrics, seconds, steps = measure(result.model, attacked), result.seconds, result.steps
    return {"method": method, "seed": seed, "forget_classes": list(classes), "metrics": metrics,
            "seconds": seconds, "steps": steps}


def inline(fn, *args):
    """The sequential engine: run now; .result() gives the value (the shape of a future)."""
    value = fn(*args)
    return SimpleNamespace(result=lambda: value)


def run_grid(grid: Grid, submit=inline, on_case=None) -> list[dict]:
    """Every unit of the grid through `submit(fn, *args) -> future` (inline, a concurrent.futures
    executor's submit, or a Prefect task's submit on a Dask cluster); one row per method and case,
    in the grid's order. on_case(rows) is called as each (seed, case) completes."""
    num_classes = grid_data(grid.data_config(grid.seeds[0])).num_classes
    models = {seed: submit(train_seed, grid, seed) for seed in grid.seeds}
    models = {seed: future.result() for seed, future in models.items()}
    pending = (submit(run_unit, grid, seed, case, method, models[seed]) for seed, case, method in grid.units(num_classes))
    if submit is not inline:  # an executor runs them all at once; inline, each case is written as it ends
        pending = list(pending)
    rows, case_results = [], []
    for future in pending:
        case_results.append(future.result())
        if case_results[-1]["method"] == grid.methods[-1]:
            new = case_rows(case_results)
            rows += new
            if on_case:
                on_case(new)
            case_results = []
    return rows


def case_rows(results: list[dict]) -> list[dict]:
    """The rows of one (seed, case): each method against the original model and the retrain."""
    by_method = {r["method"]: r for r in results}
    original, retrain_seconds = by_method["original"]["metrics"], by_method["retrain"]["seconds"]
    return [{"method": r["method"], "seed": r["seed"], "forget_classes": r["forget_classes"],
             "case": case_kind(r["forget_classes"]), **r["metrics"], "original": original,
             "retained_drop_pp": 100 * (original["retain_test_acc"] - r["metrics"]["retain_test_acc"]),
             "seconds": r["seconds"], "seconds_vs_retrain": r["seconds"] / retrain_seconds, "steps": r["steps"]}
            for r in results if r["method"] != "original"]


def case_kind(classes) -> str:
    return "one class" if len(classes) == 1 else f"{len(classes)} classes"


def bench_unlearning(grid: Grid = Grid(), out: Path = Path("bench/unlearning"), submit=inline,
                     engine: str = "sequential") -> list[dict]:
    """Run the grid and write runs.jsonl, summary.json, summary.md and tradeoff.png to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.jsonl", "w") as runs:
        def on_case(new):
            for row in new:
                runs.write(json.dumps(row) + "\n")
            runs.flush()
            print(f"seed {new[0]['seed']} classes {new[0]['forget_classes']}: " + ", ".join(
                f"{r['method']} {100 * r['forget_test_acc']:.0f}%/{r['retained_drop_pp']:.1f}pp" for r in new),
                flush=True)

        rows = run_grid(grid, submit, on_case)
    summary = summarise(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    header = (f"Unlearning benchmark: {grid.dataset}, {grid.arch} ({grid.train_config.epochs} epochs, batch {grid.train_config.batch_size}), "
              f"seeds {list(grid.seeds)}, {measured_on()}, engine: {engine}; NHLE: {grid.base}")
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


__all__ = ["ABLATIONS", "METHODS", "Grid", "bench_unlearning", "cases", "parse_methods", "run_grid", "summarise"]
