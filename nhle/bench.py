"""Benchmarks whose results go to files.

    nhle bench unlearning --seeds 0,1,2 --out bench/unlearning     # ~10 min on 2 CPU cores

For each seed one base model is trained; for each class one model is retrained without it (the
gold standard) and every NHLE encoding unlearns it from the same base model with the same forget
samples, all in one run on one machine. Writes runs.jsonl (one line per run), summary.json and
summary.md (mean over runs; drop = retained test accuracy lost against the original, in pp).
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from nhle.config import DataConfig, TrainConfig, UnlearnConfig
from nhle.experiment import forget, load_data, retained_drop_pp, retrain_without, train_base
from nhle.training import model_spec


def bench_unlearning(dataset: str = "digits", seeds=(0, 1, 2), classes="all", encodings=("complementary",),
                     out: Path = Path("bench/unlearning"), quick: bool = False, base: UnlearnConfig = UnlearnConfig(),
                     train_config: TrainConfig = TrainConfig()) -> list[dict]:
    if quick:
        seeds, train_config = list(seeds)[:1], replace(train_config, epochs=3)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(out / "runs.jsonl", "w") as runs:
        for seed in seeds:
            data_config = DataConfig(dataset=dataset, seed=seed)
            data = load_data(data_config)
            model, meta = train_base(data_config, train_config, data=data, progress=False)
            checkpoint = {**meta, "model_spec": model_spec(model)}
            class_list = range(data.num_classes) if classes == "all" else [int(c) for c in str(classes).split(",")]
            if quick:
                class_list = list(class_list)[:2]
            for cls in class_list:
                retrained = retrain_without(data, train_config, [cls], seed, progress=False)
                for encoding in encodings:
                    config = replace(base, encoding=encoding)
                    outcome = forget(model, checkpoint, [cls], seed, config, data=data, progress=False,
                                     retrained=retrained)
                    for method in ("unlearned", "retrained") if encoding == encodings[0] else ("unlearned",):
                        row = run_row(outcome, method, encoding)
                        rows.append(row)
                        runs.write(json.dumps(row) + "\n")
                runs.flush()
                print(f"seed {seed} class {cls}: " + ", ".join(
                    f"{r['method']} drop {r['retained_drop_pp']:.2f}pp unmasked {r['unmasked_forget_test_acc']:.3f}"
                    for r in rows[-len(encodings) - 1:]), flush=True)
    summary = summarise(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown_table(summary, dataset, seeds, base) + "\n")
    print(markdown_table(summary, dataset, seeds, base))
    return rows


def run_row(outcome, method: str, encoding: str) -> dict:
    report = outcome.report
    metrics = report["metrics"][method]
    seconds = report["seconds"]["unlearn" if method == "unlearned" else "retrain"]
    return {"method": encoding if method == "unlearned" else "retrain", "seed": report["seed"],
            "forget_classes": report["forget_classes"], **metrics,
            "original_retain_test_acc": report["metrics"]["original"]["retain_test_acc"],
            "original_probe_forget_acc": report["metrics"]["original"]["probe_forget_acc"],
            "original_forget_silhouette": report["metrics"]["original"]["forget_silhouette"],
            "retained_drop_pp": retained_drop_pp(report, method), "seconds": seconds,
            "seconds_vs_retrain": seconds / report["seconds"]["retrain"],
            "steps": report["unlearn_steps"] if method == "unlearned" else None}


SUMMARY_KEYS = ("forget_test_acc", "retained_drop_pp", "unmasked_forget_test_acc", "mia_efficacy",
                "probe_forget_acc", "forget_silhouette", "relearn_steps", "seconds_vs_retrain")


def summarise(rows: list[dict]) -> dict:
    summary = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        entry = {"runs": len(mine)}
        for key in SUMMARY_KEYS:
            values = np.array([r[key] for r in mine], dtype=float)
            entry[key] = {"mean": float(values.mean()), "std": float(values.std()), "max": float(values.max())}
        entry["forget_test_acc_zero_runs"] = sum(r["forget_test_acc"] == 0 for r in mine)
        entry["runs_drop_le_1pp"] = sum(r["retained_drop_pp"] <= 1.0 for r in mine)
        summary[method] = entry
    original = [r for r in rows if r["method"] == "retrain"] or rows
    summary["original"] = {key: float(np.mean([r[f"original_{key}"] for r in original]))
                           for key in ("probe_forget_acc", "forget_silhouette")}
    return summary


def markdown_table(summary: dict, dataset: str, seeds, base: UnlearnConfig) -> str:
    def pm(entry, key, scale=1.0, digits=2):
        return f"{scale * entry[key]['mean']:.{digits}f} ± {scale * entry[key]['std']:.{digits}f}"

    lines = [f"Unlearning benchmark on {dataset}, seeds {list(seeds)}, measured {time.strftime('%Y-%m-%d')} "
             f"on {platform.node() or 'this machine'} ({platform.machine()}, CPU threads: "
             f"{__import__('torch').get_num_threads()}); NHLE settings: {base}",
             "",
             "| method | runs | forget test acc % | retained drop pp (mean ± std) | worst drop pp | runs <= 1 pp "
             "| unmasked forget acc % | MIA efficacy | probe forget acc % | silhouette | relearn steps "
             "| time / retrain |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, entry in summary.items():
        if method == "original":
            continue
        lines.append(f"| {method} | {entry['runs']} | {pm(entry, 'forget_test_acc', 100)} | "
                     f"{pm(entry, 'retained_drop_pp')} | {entry['retained_drop_pp']['max']:.2f} | "
                     f"{entry['runs_drop_le_1pp']}/{entry['runs']} | {pm(entry, 'unmasked_forget_test_acc', 100)} | "
                     f"{pm(entry, 'mia_efficacy')} | {pm(entry, 'probe_forget_acc', 100, 1)} | "
                     f"{pm(entry, 'forget_silhouette')} | {pm(entry, 'relearn_steps', 1, 1)} | "
                     f"{pm(entry, 'seconds_vs_retrain', 1, 3)} |")
    original = summary["original"]
    lines += ["", f"Original model: probe forget acc {100 * original['probe_forget_acc']:.1f}%, "
                  f"forget silhouette {original['forget_silhouette']:.2f}."]
    return "\n".join(lines)
