"""`nhle bench unlearning`: NHLE against retraining, the published baselines and its own ablations.

    nhle bench unlearning --seeds 0,1,2 --out bench/unlearning          # digits, small CNN, ~15 min
    nhle bench unlearning --arch resnet18_cifar --image-size 32 --epochs 3 --seeds 0 --classes 3
    nhle bench unlearning --arch mobilenet_v3_small --image-size 32 --epochs 30   # any torchvision / timm/ name
    nhle bench unlearning --quick --out /tmp/quick                       # CI: 1 seed, 2 classes + 1 triple
    nhle bench unlearning --dataset cifar10 --data-root ~/data --arch resnet18_cifar --device cuda   # on a GPU

For each seed one base model is trained. For each case (every class alone, then the `--multi`
classes together) one model is retrained without the classes (the gold standard), and every
method unlearns them from that same base model, with the same forget samples, in one run on one
machine; times are ratios to that retrain. Methods: `nhle` (the configured NHLE + masking),
`retrain`, the baselines of nhle.core.unlearning.baselines, and the ablations in ABLATIONS. Writes
runs.jsonl (one line per run), summary.json, summary.md (mean ± std over runs) and tradeoff.png
(retained drop against the linear probe, point size = time).
"""

from __future__ import annotations

import functools
import json
import platform
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from nhle.bench.synthetic import synthetic_splits
from nhle.core.config import ENCODINGS, RECIPES, DataConfig, ModelConfig, TrainConfig, UnlearnConfig, flatten, to_dict
from nhle.core.data import sample_per_class
from nhle.core.experiment import load_data, retrain_without, train_base_model
from nhle.core.files import atomic_write
from nhle.core.gates import retained_drop_pp
from nhle.core.metrics import measure_case, relearn_shares, relearn_target_accuracy
from nhle.core.training import evaluate, seed_everything, training_spec
from nhle.core.unlearning import unlearn, without_mask
from nhle.core.unlearning.baselines import BASELINES, run_baseline

SEVENTH_DEFAULT = {"forget_batch": 16, "anchor_batch": 2}
"""The seventh default over the current one: 16 forget samples and 2 synthetic inputs of each retained
class a step (docs/bench/issue25/*_anchor_200/, resnet18/, resnet18_cifar_3ep/)."""
SIXTH_DEFAULT = {**SEVENTH_DEFAULT, "anchor_weight": 100.0}
"""The sixth default over the current one: the anchor at 100 (docs/bench/issue25/*, folders without a suffix)."""
FINE_TUNED_ROWS = {**SIXTH_DEFAULT, "rows_steps": 0, "forget_confusion": 0.0}
"""The fifth default over the current one: the rows as the fine-tuning left them, no confusion term."""
FOURTH_DEFAULT = {**FINE_TUNED_ROWS, "forget_batch": 32, "anchor_batch": 0, "max_steps": 60}
"""The fourth default over the current one (60 steps of 32 forget samples and every anchor)."""
THIRD_DEFAULT = {**FOURTH_DEFAULT, "saliency": 1.0}
"""The third default over the current one (its grids: docs/bench/issue25/*_all_entries/)."""
ABLATIONS = {
    **RECIPES,  # the named recipes: the default before the current one, and the fallback
    "mask_only": {
        "max_steps": 0,
        "synthetic_per_class": 0,
        "rows_steps": 0,
        "holdout_per_class": 0,
        "feature_pull": 0.0,
    },
    "nhle_no_mask": {"mask": False},
    "nhle_no_anchor": {"anchor_weight": 0.0},
    "nhle_head_only": {"layers": "head"},
    "nhle_backbone_only": {"layers": "backbone"},
    # What was measured on the way to the default (docs/benchmarks.md section 9).
    "nhle_no_feature_pull": {"feature_pull": 0.0},
    "nhle_no_shipped_term": {"shipped_weight": 0.0},
    **{f"nhle_dispersion_{w:g}": {"forget_dispersion": w} for w in (10.0, 100.0)},  # screen.md, tenth round
    **{f"nhle_depth_lr_{r:g}": {"lr_depth_ratio": r} for r in (0.3, 3.0)},  # screen.md, eleventh round
    "nhle_anchor_100": SIXTH_DEFAULT,
    "nhle_anchor_200": SEVENTH_DEFAULT,  # the seventh default
    "nhle_anchor_300": {**SEVENTH_DEFAULT, "anchor_weight": 300.0},
    "nhle_early_stop": {"stop_forget_prob": 0.05},
    "nhle_no_drift_check": {"max_drift": 0.0},
    "nhle_lr_1e-4": {"lr": 1e-4},
    "nhle_lr_2e-4": {"lr": 2e-4},
    "nhle_no_synthetic": {"synthetic_per_class": 0, "rows_steps": 0, "holdout_per_class": 0, "feature_pull": 0.0},
    # The second default: shipped term at weight 1 to p 1e-4, KL at temperature 1,
    # full batch, 80 steps at 1.5e-4; and the single changes that made the third from it, over the third.
    "nhle_shipped_weight_1": {
        **FINE_TUNED_ROWS,
        "shipped_weight": 1.0,
        "shipped_floor": 1e-4,
        "anchor_temperature": 1.0,
        "forget_batch": 0,
        "anchor_batch": 0,
        "lr": 1.5e-4,
        "max_steps": 80,
        "saliency": 1.0,
    },
    **{
        name: {**THIRD_DEFAULT, **change}
        for name, change in {
            "nhle_anchor_t1": {"anchor_temperature": 1.0},
            "nhle_anchor_t2": {"anchor_temperature": 2.0},
            "nhle_shipped_weight_3": {"shipped_weight": 3.0},
            "nhle_shipped_weight_10": {"shipped_weight": 10.0},
            "nhle_shipped_floor_1e-4": {"shipped_floor": 1e-4},
            "nhle_full_batch": {"forget_batch": 0},
            "nhle_80_steps": {"max_steps": 80},
            "nhle_45_steps_4e-4": {"max_steps": 45, "lr": 4e-4},
            "nhle_synthetic_2": {"synthetic_per_class": 2},
        }.items()
    },
    # The third default (every entry moves) and the saliency share around the fourth's.
    "nhle_all_entries": THIRD_DEFAULT,
    **{f"nhle_saliency_{share:g}": {**FOURTH_DEFAULT, "saliency": share} for share in (0.2, 0.5)},
    # The fourth default (60 steps of 32 forget samples and every anchor), a quarter of its rows, and
    # twice the steps of a quarter of its rows (the sixth default for an hour: deeper, dearer).
    "nhle_forget_batch_32": FOURTH_DEFAULT,
    "nhle_forget_batch_8": {**FINE_TUNED_ROWS, "forget_batch": 8, "anchor_batch": 1, "max_steps": 60},
    "nhle_120_small_steps": {**FINE_TUNED_ROWS, "forget_batch": 8, "anchor_batch": 1, "max_steps": 120},
    "nhle_synthetic_8x200": {"synthetic_per_class": 8, "synthesis_steps": 200},  # over the current default
    "nhle_half_rows": {"forget_batch": 8, "anchor_batch": 1},  # the eighth default: the seventh at half a step's rows
    # The fifth default (the forgotten rows as the fine-tuning left them, no confusion term), and
    # each of the sixth's two changes alone.
    "nhle_fine_tuned_rows": FINE_TUNED_ROWS,
    "nhle_no_forget_confusion": {**SIXTH_DEFAULT, "forget_confusion": 0.0},
    **{f"nhle_forget_confusion_{w:g}": {**SIXTH_DEFAULT, "forget_confusion": w} for w in (1.0, 3.0)},
    # What was measured on the way to the first default (docs/benchmarks.md section 7), over that recipe.
    "nhle_warmup_50": {"warmup_steps": 50},
    "nhle_anchor_t4": {**RECIPES["nhle_synthetic_anchor"], "anchor_temperature": 4.0},
    "nhle_saliency_0.3": {**RECIPES["nhle_synthetic_anchor"], "saliency": 0.3},
    "nhle_normalized_1e-2": {"optimizer": "normalized", "lr": 1e-2},
    "nhle_l2sp": {"weight_anchor": 1e6},
    **{f"forget_rank_{r}": {**RECIPES["nhle_synthetic_anchor"], "forget_rank": r} for r in (0.25, 0.5, 0.75, 1.0)},
    **{f"encoding_{e}": {"encoding": e} for e in ENCODINGS},
}
METHODS = ("nhle", "retrain", *BASELINES, *ABLATIONS)
SUMMARY_KEYS = (
    "forget_test_acc",
    "retain_test_acc",
    "retained_drop_pp",
    "unmasked_forget_test_acc",
    "mia_efficacy",
    "probe_forget_acc",
    "forget_silhouette",
    "relearn_steps_shipped",
    "relearn_steps_restored",
    "relearn_share_shipped",
    "relearn_share_restored",
    "seconds",
    "seconds_vs_retrain",
    "seconds_cached_vs_retrain",
    "steps",
)
RELEARN_SHARES = ("shipped", "restored", "mask_only")
"""The relearn shares of a row (relearn_share_<attacker>): its steps over the same case's retrained model's,
rows as trained; mask_only is the original's shipped steps, the floor (nhle.core.metrics.relearn_shares)."""


def measured_on() -> str:
    """'measured <date> on <host> (<arch>, torch threads: N)': the stamp every benchmark table carries."""
    import torch  # noqa: PLC0415 - lazy: torch: `nhle serve` builds its parser from this module

    return (
        f"measured {time.strftime('%Y-%m-%d')} on {platform.node() or 'this machine'} "
        f"({platform.machine()}, torch threads: {torch.get_num_threads()})"
    )


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
    """CI's grid: one seed, 3 epochs, 40 unlearning and 10 synthesis steps, relearn capped at 10 steps."""

    def __post_init__(self):
        methods = self.methods if isinstance(self.methods, str) else ",".join(self.methods)
        object.__setattr__(self, "methods", tuple(parse_methods(methods)))
        if self.quick:
            object.__setattr__(self, "seeds", tuple(self.seeds)[:1])
            object.__setattr__(self, "train_config", replace(self.train_config, epochs=3))
            # Every method runs in CI: the input synthesis and the relearn attack dominated its time.
            object.__setattr__(self, "base", replace(self.base, max_steps=40, synthesis_steps=10, relearn_max_steps=10))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))

    def data_config(self, seed: int) -> DataConfig:
        return DataConfig(dataset=self.dataset, seed=seed, image_size=self.image_size, root=self.root)

    def cases(self, num_classes: int) -> list[list[int]]:
        found = cases(num_classes, self.classes, self.multi)
        if self.quick:  # the first two single classes and the last multi-class case
            found = [c for c in found if len(c) == 1][:2] + [c for c in found if len(c) > 1][-1:]
        return found

    def units(self, num_classes: int) -> list[tuple[int, list[int], str]]:
        """(seed, classes, method) of every run; 'original' measures the base model itself."""
        return [
            (seed, case, method)
            for seed in self.seeds
            for case in self.cases(num_classes)
            for method in ("original", *self.methods)
        ]


@functools.lru_cache(maxsize=4)
def grid_data(data_config: DataConfig):
    """The dataset of a grid: any nhle dataset, or synthetic<N>, the N-sample synthetic set of
    `nhle bench scaling` (a different set per seed)."""
    synthetic = re.fullmatch(r"synthetic(\d+)", data_config.dataset)
    if synthetic:
        return synthetic_splits(int(synthetic[1]), seed=data_config.seed)
    return load_data(data_config)


def train_seed(grid: Grid, seed: int):
    """The base model every unit of `seed` starts from."""
    data_config = grid.data_config(seed)
    return train_base_model(
        data_config,
        grid.train_config,
        data=grid_data(data_config),
        progress=False,
        model_config=ModelConfig(arch=grid.arch),
    )[0]


def run_unit(grid: Grid, seed: int, classes: list[int], method: str, model) -> dict:
    """One method on one (seed, classes) case, from the seed's base model; seeded on its own so
    that neither the order of the units nor the process they run in changes the result."""
    seed_everything(seed)
    data = grid_data(grid.data_config(seed))
    base = grid.base
    samples = sample_per_class(data.train, classes, base.n_samples, seed)
    target_acc = relearn_target_accuracy(model, data, classes, base.relearn_target)  # the seed's base model

    measure = measure_case(data, classes, samples, base.relearn_max_steps, base.relearn_lr, seed, target_acc)

    synthesis = 0.0
    if method == "original":
        metrics, seconds, steps = {**measure(model), "test_acc": evaluate(model, data.test)}, 0.0, None
    elif method == "retrain":
        retrained, snapshot, seconds = retrain_without(
            data,
            grid.train_config,
            classes,
            seed,
            progress=False,
            spec=training_spec(ModelConfig(arch=grid.arch), data),
        )
        metrics, steps = measure(retrained, without_mask(retrained, snapshot)), None
    elif method in BASELINES:
        result = run_baseline(method, model, data, classes, seed, grid.device)
        metrics, seconds, steps = measure(result.model), result.seconds, result.steps
    else:
        result = unlearn(model, samples, classes, replace(base, **ABLATIONS.get(method, {})), device=grid.device)
        attacked = without_mask(result.model, result.snapshot) if result.snapshot else None
        metrics, seconds, steps = measure(result.model, attacked), result.seconds, result.steps
        synthesis = result.synthesis_seconds  # a request on a version that kept its inputs skips it
    return {
        "method": method,
        "seed": seed,
        "forget_classes": list(classes),
        "metrics": metrics,
        "seconds": seconds,
        "synthesis_seconds": synthesis,
        "steps": steps,
    }


def inline(fn, *args):
    """The sequential engine: run now; .result() gives the value (the shape of a future)."""
    value = fn(*args)
    return SimpleNamespace(result=lambda: value)


def run_grid(grid: Grid, submit=inline, on_case=None, done=frozenset()) -> list[dict]:
    """Every unit of the grid through `submit(fn, *args) -> future` (inline, a concurrent.futures
    executor's submit, or a Prefect task's submit on a Dask cluster); one row per method and case,
    in the grid's order. on_case(rows) is called as each (seed, case) completes. Cases in `done`
    ((seed, tuple of classes)) are left out, and so is a seed with nothing left to run."""
    num_classes = grid_data(grid.data_config(grid.seeds[0])).num_classes
    units = [(seed, case, method) for seed, case, method in grid.units(num_classes) if (seed, tuple(case)) not in done]
    models = {seed: submit(train_seed, grid, seed) for seed in dict.fromkeys(seed for seed, _, _ in units)}
    models = {seed: future.result() for seed, future in models.items()}
    pending = (submit(run_unit, grid, seed, case, method, models[seed]) for seed, case, method in units)
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
    retrained = by_method["retrain"]["metrics"]
    return [
        {
            "method": r["method"],
            "seed": r["seed"],
            "forget_classes": r["forget_classes"],
            "case": case_kind(r["forget_classes"]),
            **r["metrics"],
            "original": original,
            **shares_of(original, r["metrics"], retrained),
            "retained_drop_pp": retained_drop_pp(original["retain_test_acc"], r["metrics"]["retain_test_acc"]),
            "seconds": r["seconds"],
            "seconds_vs_retrain": r["seconds"] / retrain_seconds,
            "seconds_cached_vs_retrain": (r["seconds"] - r.get("synthesis_seconds", 0.0)) / retrain_seconds,
            "steps": r["steps"],
        }
        for r in results
        if r["method"] != "original"
    ]


def shares_of(original: dict, metrics: dict, retrained: dict) -> dict:
    """A row's relearn_share_<attacker> (RELEARN_SHARES), by the one definition of the report."""
    shares = relearn_shares({"original": original, "unlearned": metrics, "retrained": retrained})
    return {f"relearn_share_{who}": shares[who] for who in RELEARN_SHARES}


def case_kind(classes) -> str:
    return "one class" if len(classes) == 1 else f"{len(classes)} classes"


def case_key(row: dict) -> tuple:
    """(seed, forget classes): the case a runs.jsonl row belongs to."""
    return row.get("seed"), tuple(row.get("forget_classes", ()))


def bench_unlearning(
    grid: Grid = Grid(),
    out: Path = Path("bench/unlearning"),
    submit=inline,
    engine: str = "sequential",
    resume: bool = False,
) -> list[dict]:
    """Run the grid and write runs.jsonl, summary.json, summary.md, goal.md and tradeoff.png to
    `out`. With `resume`, the cases out/runs.jsonl already holds for every method are kept and
    not run again (a benchmark of hours survives its process)."""
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        check_same_settings(out, grid)
    earlier = completed_rows(out / "runs.jsonl", grid.methods) if resume else []
    atomic_write(out / "grid.json", lambda f: f.write((json.dumps(grid_settings(grid), indent=1) + "\n").encode()))
    done = frozenset(case_key(r) for r in earlier)
    # The kept rows replace the file whole before anything runs: a run killed at any point leaves them all.
    atomic_write(out / "runs.jsonl", lambda f: f.write("".join(json.dumps(r) + "\n" for r in earlier).encode()))
    with open(out / "runs.jsonl", "a") as runs:

        def on_case(new):
            for row in new:
                runs.write(json.dumps(row) + "\n")
            runs.flush()
            print(
                f"seed {new[0]['seed']} classes {new[0]['forget_classes']}: "
                + ", ".join(
                    f"{r['method']} {100 * r['forget_test_acc']:.0f}%/{r['retained_drop_pp']:.1f}pp" for r in new
                ),
                flush=True,
            )

        rows = earlier + run_grid(grid, submit, on_case, done)
    summary = summarise(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    header = (
        f"Unlearning benchmark: {grid.dataset}, {grid.arch} "
        f"({grid.train_config.epochs} epochs, batch {grid.train_config.batch_size}), "
        f"seeds {list(grid.seeds)}, {measured_on()}, engine: {engine}; NHLE: {grid.base}"
    )
    tradeoff_plot(summary, out / "tradeoff.png")
    write_report(out, "summary", header, markdown_table(summary))
    goal, checks = goal_table(rows)
    (out / "goal.json").write_text(json.dumps(checks, indent=1) + "\n")
    write_report(out, "goal", header, goal)
    return rows


def grid_settings(grid: Grid) -> dict:
    """What a row of the grid depends on besides its method, seed and case (out/grid.json)."""
    return {
        "dataset": grid.dataset,
        "arch": grid.arch,
        "image_size": grid.image_size,
        "quick": grid.quick,
        "train": to_dict(grid.train_config),
        "unlearn": to_dict(grid.base),
    }


def check_same_settings(out: Path, grid: Grid) -> None:
    """Refuse to resume rows measured with other settings (out/grid.json), or with settings not on
    record: kept, they would sit under a header naming this run's (a changed default turns the
    folder's `nhle` rows into another recipe). A setting added since is not compared."""
    path = out / "grid.json"
    if not path.exists():
        if (out / "runs.jsonl").exists() and (out / "runs.jsonl").read_text().strip():
            raise ValueError(
                f"--resume: {out} holds rows but no grid.json recording the settings they were "
                "measured with; write it (bench_unlearning's grid_settings) or use another --out"
            )
        return
    then, now = flatten(json.loads(path.read_text())), flatten(json.loads(json.dumps(grid_settings(grid))))
    changed = [
        f"{key}: {then[key]!r} then, {value!r} now" for key, value in now.items() if key in then and then[key] != value
    ]
    if changed:
        raise ValueError(
            f"--resume: {out} was measured with other settings ({'; '.join(changed)}); resume with "
            "the same --params, --set, --arch, --dataset, --epochs, --batch-size and --image-size "
            "as then, or use another --out"
        )


def completed_rows(path: Path, methods) -> list[dict]:
    """The rows of `path` (runs.jsonl) whose (seed, case) has a row for every one of `methods`."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if all(key in r for key in SUMMARY_KEYS)]  # measured before a metric existed: again
    found: dict[tuple, set] = {}
    for row in rows:
        found.setdefault(case_key(row), set()).add(row["method"])
    return [r for r in rows if set(methods) <= found[case_key(r)] and r["method"] in methods]


GOALS = (
    "forget acc 0",
    "attack <= 3% in every run",
    "mean drop <= {reference} + 0.3 pp",
    "worst drop <= 2 pp",
    "relearn share >= 0.8 mean and >= 0.5 every run, shipped and restored",
)
"""The relearning goal (docs/benchmarks.md section 9) for one setting: the method's runs against
the references of the same cases. The mean drop's reference is mask_only where the grid ran it on
those cases (what deleting the rows alone costs), else retrain."""


def goal_checks(rows: list[dict], method: str) -> dict:
    """GOALS checked for `method` over `rows` (every case and seed of one setting), with the figures;
    the references are the retrain (and mask_only) rows of the cases `method` ran on."""
    ran = {case_key(r) for r in rows if r["method"] == method}
    rows = [r for r in rows if case_key(r) in ran]

    def values(who, key):  # nan where a row lacks the key (runs.jsonl written before it)
        return np.array([r.get(key, np.nan) for r in rows if r["method"] == who], dtype=float)

    drop, reference = values(method, "retained_drop_pp"), drop_reference(rows, ran)
    silhouette = [
        float(np.mean([r["original"]["forget_silhouette"] for r in rows if r["method"] == method])),
        float(values(method, "forget_silhouette").mean()),
        float(values("retrain", "forget_silhouette").mean()),
    ]
    shares = {who: values(method, f"relearn_share_{who}") for who in RELEARN_SHARES}
    figures = {
        "runs": len(drop),
        "forget_acc_max": float(values(method, "forget_test_acc").max()),
        "attack_mean": float(values(method, "unmasked_forget_test_acc").mean()),
        "attack_max": float(values(method, "unmasked_forget_test_acc").max()),
        "drop_mean": float(drop.mean()),
        "drop_std": float(drop.std()),
        "drop_worst": float(drop.max()),
        "retrain_drop_mean": float(values("retrain", "retained_drop_pp").mean()),
        "drop_reference": reference,
        "reference_drop_mean": float(values(reference, "retained_drop_pp").mean()),
        "silhouette_original_method_retrain": silhouette,
        **{
            f"relearn_share_{who}_mean_min": [float(shares[who].mean()), float(shares[who].min())]
            for who in RELEARN_SHARES
        },
        "relearn_steps_shipped_restored_retrain": [
            float(values(method, "relearn_steps_shipped").mean()),
            float(values(method, "relearn_steps_restored").mean()),
            float(values("retrain", "relearn_steps_restored").mean()),
        ],
        "time_vs_retrain": float(values(method, "seconds_vs_retrain").mean()),
        "time_cached_vs_retrain": float(values(method, "seconds_cached_vs_retrain").mean()),
        "steps_mean_max": [float(values(method, "steps").mean()), float(values(method, "steps").max())]
        if method != "retrain"
        else None,
    }
    met = [
        figures["forget_acc_max"] == 0,
        figures["attack_max"] <= 0.03,
        figures["drop_mean"] <= figures["reference_drop_mean"] + 0.3,
        figures["drop_worst"] <= 2.0,
        all(shares[who].mean() >= 0.8 and shares[who].min() >= 0.5 for who in ("shipped", "restored")),
    ]
    return {**figures, "missed": [goal.format(reference=reference) for goal, ok in zip(GOALS, met) if not ok]}


def drop_reference(rows: list[dict], cases: set) -> str:
    """mask_only when it ran on every one of `cases`, else retrain: the mean drop goal's reference."""
    return "mask_only" if cases <= {case_key(r) for r in rows if r["method"] == "mask_only"} else "retrain"


def goal_table(rows: list[dict]) -> tuple[str, dict]:
    """The relearning goal, checked for every unlearning method of the grid (markdown, {method: checks})."""
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "retrain" and m not in BASELINES]
    checks = {m: goal_checks(rows, m) for m in methods}
    lines = [
        "| method | runs | forget acc max % | attack mean / max % | drop mean ± std pp | worst pp "
        "| reference drop mean pp | silhouette original / method / retrain | relearn share shipped mean / min "
        "| relearn share restored mean / min | mask-only share | relearn steps shipped / restored / retrain "
        "| time / retrain: first request / inputs kept | steps mean / max | goal |",
        "|---" * 15 + "|",
    ]
    for method, c in checks.items():
        sil, steps = c["silhouette_original_method_retrain"], c["steps_mean_max"]
        lines.append(
            f"| {method} | {c['runs']} | {100 * c['forget_acc_max']:.1f} | {100 * c['attack_mean']:.1f} / "
            f"{100 * c['attack_max']:.1f} | {c['drop_mean']:.2f} ± {c['drop_std']:.2f} | "
            f"{c['drop_worst']:.2f} | {c['reference_drop_mean']:.2f} ({c['drop_reference']}) | "
            f"{sil[0]:.2f} / {sil[1]:.2f} / {sil[2]:.2f} | "
            f"{relearn_cells(c)} | {c['time_vs_retrain']:.3f} / {c['time_cached_vs_retrain']:.3f} | "
            f"{steps[0]:.0f} / {steps[1]:.0f} | "
            f"{'met' if not c['missed'] else 'missed: ' + ', '.join(c['missed'])} |"
        )
    return "\n".join(lines), checks


def relearn_cells(checks: dict) -> str:
    """The goal table's relearn cells: each attacker's share (mean / min), mask-only's, and the raw steps."""
    shipped, restored = checks["relearn_share_shipped_mean_min"], checks["relearn_share_restored_mean_min"]
    steps = checks["relearn_steps_shipped_restored_retrain"]
    return (
        f"{shipped[0]:.2f} / {shipped[1]:.2f} | {restored[0]:.2f} / {restored[1]:.2f} | "
        f"{checks['relearn_share_mask_only_mean_min'][0]:.2f} | {steps[0]:.1f} / {steps[1]:.1f} / {steps[2]:.1f}"
    )


def summarise(rows: list[dict]) -> dict:
    """{case kind: {method: {runs, key: {mean, std, max}}, 'original': {...}}}."""
    summary = {}
    for kind in dict.fromkeys(r["case"] for r in rows):
        summary[kind] = {}
        for method in dict.fromkeys(r["method"] for r in rows if r["case"] == kind):
            mine = [r for r in rows if r["case"] == kind and r["method"] == method]
            entry = {"runs": len(mine)}
            for key in SUMMARY_KEYS:
                values = np.array([r[key] for r in mine if r.get(key) is not None], dtype=float)  # retrain has no steps
                entry[key] = (
                    {"mean": float(values.mean()), "std": float(values.std()), "max": float(values.max())}
                    if len(values)
                    else None
                )
            summary[kind][method] = entry
        retrains = [r for r in rows if r["case"] == kind and r["method"] == "retrain"]
        summary[kind]["original"] = {
            **{
                key: float(np.mean([r["original"][key] for r in retrains]))
                for key in (
                    "retain_test_acc",
                    "probe_forget_acc",
                    "forget_silhouette",
                    "mia_efficacy",
                    "relearn_steps_shipped",
                )
            },
            "relearn_share_mask_only": float(np.mean([r["relearn_share_mask_only"] for r in retrains])),
        }
    return summary


def markdown_table(summary: dict) -> str:
    def pm(entry, key, scale=1.0, digits=2):
        return f"{scale * entry[key]['mean']:.{digits}f} ± {scale * entry[key]['std']:.{digits}f}"

    def steps(entry):
        return "—" if entry["steps"] is None else f"{entry['steps']['mean']:.0f} / {entry['steps']['max']:.0f}"

    def share(entry, attacker):  # the relearn share, with the raw steps beside it
        return f"{pm(entry, f'relearn_share_{attacker}')} ({entry[f'relearn_steps_{attacker}']['mean']:.1f})"

    lines = []
    for kind, methods in summary.items():
        original = methods["original"]
        lines += [
            f"### {kind}",
            "",
            "| method | runs | forget test acc % | retain test acc % | retained drop pp | worst drop pp "
            "| mask-removal attack % | MIA efficacy | probe forget acc % | silhouette "
            "| relearn share shipped (steps) | relearn share restored (steps) "
            "| seconds | time / retrain | steps mean / max |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method, entry in methods.items():
            if method == "original":
                continue
            lines.append(
                f"| {method} | {entry['runs']} | {pm(entry, 'forget_test_acc', 100, 1)} | "
                f"{pm(entry, 'retain_test_acc', 100, 1)} | {pm(entry, 'retained_drop_pp')} | "
                f"{entry['retained_drop_pp']['max']:.2f} | {pm(entry, 'unmasked_forget_test_acc', 100, 1)} | "
                f"{pm(entry, 'mia_efficacy')} | {pm(entry, 'probe_forget_acc', 100, 1)} | "
                f"{pm(entry, 'forget_silhouette')} | {share(entry, 'shipped')} | {share(entry, 'restored')} | "
                f"{pm(entry, 'seconds', 1, 2)} | {pm(entry, 'seconds_vs_retrain', 1, 3)} | {steps(entry)} |"
            )
        lines += [
            "",
            f"Original model: retain test acc {100 * original['retain_test_acc']:.1f}%, probe forget acc "
            f"{100 * original['probe_forget_acc']:.1f}%, silhouette {original['forget_silhouette']:.2f}, "
            f"MIA efficacy {original['mia_efficacy']:.2f}; the mask-only model's relearn share "
            f"{original['relearn_share_mask_only']:.2f} ({original['relearn_steps_shipped']:.1f} steps). "
            "Relearn share: steps over the same case's retrained model's (rows as trained). For methods "
            "without a mask the mask-removal attack (and the restored attacker) is the model itself.",
            "",
        ]
    return "\n".join(lines)


def tradeoff_plot(summary: dict, path: Path) -> Path | None:
    """Retained drop (x) against probe forget accuracy (y), point area ~ time / retrain."""
    try:
        import matplotlib  # noqa: PLC0415 - lazy: matplotlib: only when drawing

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415 - lazy: matplotlib: only when drawing
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
        axis.set(
            title=f"{kind}: area ~ time / retrain; hollow = forget acc > 5%",
            xlabel="retained accuracy drop (pp)",
            ylabel="linear probe on forgotten classes (%)",
        )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


__all__ = ["ABLATIONS", "METHODS", "Grid", "bench_unlearning", "cases", "parse_methods", "run_grid", "summarise"]
