"""Issue 14's goal, checked per setting: one `nhle bench unlearning` folder per setting.

    python docs/bench/issue14/goal_table.py docs/bench/issue14/final --method nhle > docs/bench/issue14/final/goal.md

For every folder under the root that has a runs.jsonl (partial runs count as far as they go):
NHLE (or --method) beside the retrained reference of the same seeds and cases.
"""
import argparse
import json
from pathlib import Path

import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("root", type=Path)
parser.add_argument("--method", default="nhle")
args = parser.parse_args()


def stats(rows, key):
    return np.array([r[key] for r in rows], float)


lines = ["| setting | runs | forget acc max % | attack mean % | drop mean ± std pp | worst pp | retrain drop mean pp "
         "| silhouette orig / NHLE / retrain | relearn NHLE / retrain | probe orig / NHLE / retrain % | time / retrain "
         "| NHLE steps mean / max | goal |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
results = {}
for runs_file in sorted(args.root.glob("*/runs.jsonl")):
    rows = [json.loads(line) for line in open(runs_file)]
    mine = [r for r in rows if r["method"] == args.method]
    cases = {(r["seed"], tuple(r["forget_classes"])) for r in mine}
    ret = [r for r in rows if r["method"] == "retrain" and (r["seed"], tuple(r["forget_classes"])) in cases]
    if not mine:
        continue
    drop, retrain_drop = stats(mine, "retained_drop_pp"), stats(ret, "retained_drop_pp")
    sil, sil_retrain = stats(mine, "forget_silhouette").mean(), stats(ret, "forget_silhouette").mean()
    sil_original = np.mean([r["original"]["forget_silhouette"] for r in mine])
    relearn, relearn_retrain = stats(mine, "relearn_steps").mean(), stats(ret, "relearn_steps").mean()
    checks = {
        "forget acc 0": stats(mine, "forget_test_acc").max() == 0,
        "attack <= 3%": 100 * stats(mine, "unmasked_forget_test_acc").mean() <= 3,
        "mean drop <= retrain + 0.3": drop.mean() <= retrain_drop.mean() + 0.3,
        "worst drop <= 2": drop.max() <= 2,
        "relearn >= half retrain": relearn >= relearn_retrain / 2,
        "silhouette <= halfway": sil <= (sil_original + sil_retrain) / 2,
    }
    missed = [name for name, ok in checks.items() if not ok]
    setting = runs_file.parent.name
    results[setting] = {"runs": len(mine), "drop_mean": drop.mean(), "drop_worst": drop.max(), "retrain_drop_mean": retrain_drop.mean(),
                        "silhouette": [sil_original, sil, sil_retrain], "relearn": [relearn, relearn_retrain],
                        "time_vs_retrain": stats(mine, "seconds_vs_retrain").mean(), "missed": missed}
    probe = [100 * np.mean([r["original"]["probe_forget_acc"] for r in mine]), 100 * stats(mine, "probe_forget_acc").mean(),
             100 * stats(ret, "probe_forget_acc").mean()]
    lines.append(f"| {setting} | {len(mine)} | {100 * stats(mine, 'forget_test_acc').max():.1f} | "
                 f"{100 * stats(mine, 'unmasked_forget_test_acc').mean():.1f} | {drop.mean():.2f} ± {drop.std():.2f} | {drop.max():.2f} | "
                 f"{retrain_drop.mean():.2f} | {sil_original:.2f} / {sil:.2f} / {sil_retrain:.2f} | {relearn:.1f} / {relearn_retrain:.1f} | "
                 f"{probe[0]:.0f} / {probe[1]:.0f} / {probe[2]:.0f} | {stats(mine, 'seconds_vs_retrain').mean():.2f} | "
                 f"{stats(mine, 'steps').mean():.0f} / {stats(mine, 'steps').max():.0f} | "
                 f"{'met' if not missed else 'missed: ' + ', '.join(missed)} |")
print("\n".join(lines))
(args.root / f"goal_{args.method}.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
