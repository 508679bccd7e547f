"""Several `nhle bench unlearning` folders (one per setting) in one table and one trade-off plot.

    python -m nhle.bench.report docs/bench/issue14/final      # writes goal.md and forget_rank.png there

Each sub-folder with a runs.jsonl is a setting (architecture, data, recipe). goal.md has one row
per setting and method: the relearning goal (docs/benchmarks.md section 9) checked against the
references of the same runs (nhle.bench.unlearning.goal_checks), beside the probe figure. forget_rank.png shows the knob
`unlearn.forget_rank` (0 = the default, then every `forget_rank_<r>` ablation that was run):
retained drop, the silhouette placed between the original model (0) and the retrained one (1),
and the relearn share of both attackers (the retrained model = 1), so that every setting shares
the axes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from nhle.bench.unlearning import case_key, goal_checks, relearn_cells

MAIN_METHODS = ("nhle", "nhle_synthetic_anchor", "nhle_conservative", "nhle_no_feature_pull", "mask_only")
"""Listed first, in this order; every other method a folder ran (an ablation that was the default then, such as
nhle_anchor_200) follows by name. retrain is the reference every row is checked against, not a row."""


def load_settings(root: Path) -> dict[str, list[dict]]:
    """{folder name: its rows} for every folder under root that holds a runs.jsonl."""
    return {
        runs.parent.name: [json.loads(line) for line in runs.read_text().splitlines() if line.strip()]
        for runs in sorted(root.glob("*/runs.jsonl"))
    }


def base_accuracy(rows: list[dict]) -> float:
    return float(np.mean([r["original"]["test_acc"] for r in rows if "test_acc" in r["original"]] or [np.nan]))


def overview(settings: dict[str, list[dict]]) -> tuple[str, dict]:
    lines = [
        "| setting | base test acc % | method | runs | forget acc max % | attack mean / max % "
        "| drop mean ± std pp | worst pp | reference drop pp | silhouette orig / method / retrain "
        "| relearn share shipped mean / min | relearn share restored mean / min | mask-only share "
        "| relearn steps shipped / restored / retrain | probe orig / method / retrain % | time / retrain "
        "| steps mean / max | goal |",
        "|---" * 18 + "|",
    ]
    figures = {}
    for setting, rows in settings.items():
        ran = {r["method"] for r in rows} - {"retrain"}
        for method in [m for m in MAIN_METHODS if m in ran] + sorted(ran - set(MAIN_METHODS)):
            c = goal_checks(rows, method)
            probe = [
                100 * np.mean([r["original"]["probe_forget_acc"] for r in rows if r["method"] == method]),
                *(
                    100 * np.mean([r["probe_forget_acc"] for r in rows if r["method"] == m])
                    for m in (method, "retrain")
                ),
            ]
            figures.setdefault(setting, {})[method] = {**c, "probe_original_method_retrain": probe}
            sil, steps = c["silhouette_original_method_retrain"], c["steps_mean_max"]
            lines.append(
                f"| {setting} | {100 * base_accuracy(rows):.1f} | {method} | {c['runs']} | "
                f"{100 * c['forget_acc_max']:.1f} | "
                f"{100 * c['attack_mean']:.1f} / {100 * c['attack_max']:.1f} | "
                f"{c['drop_mean']:.2f} ± {c['drop_std']:.2f} | {c['drop_worst']:.2f} | "
                f"{c['reference_drop_mean']:.2f} ({c['drop_reference']}) | {sil[0]:.2f} / "
                f"{sil[1]:.2f} / {sil[2]:.2f} | {relearn_cells(c)} | {probe[0]:.0f} / "
                f"{probe[1]:.0f} / {probe[2]:.0f} | {c['time_vs_retrain']:.2f} | {steps[0]:.0f} / {steps[1]:.0f} | "
                f"{'met' if not c['missed'] else 'missed: ' + ', '.join(c['missed'])} |"
            )
    return "\n".join(lines), figures


def rank_methods(rows: list[dict]) -> list[tuple[float, str]]:
    """(forget_rank, method) of the runs: the default nhle is rank 0."""
    found = {r["method"] for r in rows}
    ranks = [(0.0, "nhle")] if "nhle" in found else []
    return ranks + sorted((float(m.split("_")[-1]), m) for m in found if m.startswith("forget_rank_"))


def on_common_cases(rows: list[dict], methods) -> list[dict]:
    """The rows of the (seed, classes) cases on which every one of `methods` ran: a curve of one
    knob compares its points on the same cases."""
    common = set.intersection(*({case_key(r) for r in rows if r["method"] == m} for m in methods))
    return [r for r in rows if case_key(r) in common]


def forget_rank_plot(settings: dict[str, list[dict]], path: Path) -> Path | None:
    try:
        import matplotlib  # noqa: PLC0415 - lazy: matplotlib: only when drawing

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415 - lazy: matplotlib: only when drawing
    except ImportError:
        return None
    figure, (drop_axis, silhouette_axis, relearn_axis) = plt.subplots(1, 3, figsize=(16, 4.8))
    for setting, rows in settings.items():
        ranks = rank_methods(rows)
        if len(ranks) < 2:
            continue
        rows = on_common_cases(rows, [method for _, method in ranks])
        checks = [goal_checks(rows, method) for _, method in ranks]
        x = [rank for rank, _ in ranks]
        (line,) = drop_axis.plot(x, [c["drop_mean"] for c in checks], "o-", label=setting)
        drop_axis.plot(x, [c["drop_worst"] for c in checks], "x:", color=line.get_color())
        silhouette_axis.plot(
            x,
            [
                (c["silhouette_original_method_retrain"][0] - c["silhouette_original_method_retrain"][1])
                / (c["silhouette_original_method_retrain"][0] - c["silhouette_original_method_retrain"][2])
                for c in checks
            ],
            "o-",
            color=line.get_color(),
        )
        relearn_axis.plot(x, [c["relearn_share_shipped_mean_min"][0] for c in checks], "o-", color=line.get_color())
        relearn_axis.plot(x, [c["relearn_share_restored_mean_min"][0] for c in checks], "x:", color=line.get_color())
    drop_axis.axhline(2.0, color="red", lw=0.8, ls="--")
    drop_axis.set(
        xlabel="unlearn.forget_rank",
        ylabel="retained drop, pp (o mean, x worst)",
        title="retained accuracy (gate: 2 pp)",
    )
    silhouette_axis.axhline(0.5, color="grey", lw=0.8, ls="--")
    silhouette_axis.set(
        xlabel="unlearn.forget_rank",
        ylabel="silhouette moved: 0 original, 1 retrained",
        title="forgotten class's feature cluster (goal >= 0.5)",
    )
    relearn_axis.axhline(0.8, color="grey", lw=0.8, ls="--")
    relearn_axis.set(
        xlabel="unlearn.forget_rank",
        ylabel="relearn share (o shipped, x restored)",
        title="relearn attack / retrained model's (goal: mean >= 0.8)",
    )
    if drop_axis.lines:
        drop_axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv=None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print(
            "usage: python -m nhle.bench.report FOLDER (holding one nhle bench unlearning folder per setting)",
            file=sys.stderr,
        )
        return 2
    root = Path(args[0])
    settings = load_settings(root)
    if not settings:
        print(f"no */runs.jsonl under {root}: give the folder that holds the benchmark folders", file=sys.stderr)
        return 2
    table, figures = overview(settings)
    (root / "goal.md").write_text(table + "\n")
    (root / "goal.json").write_text(json.dumps(figures, indent=1) + "\n")
    forget_rank_plot(settings, root / "forget_rank.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
