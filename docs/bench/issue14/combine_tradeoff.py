"""Combine the feature_pull sweep (one `nhle bench unlearning` folder per knob value) into a table and a plot."""
import json, sys
from pathlib import Path
import numpy as np
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

root, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for folder in sorted([p for p in root.glob("fp*") if p.is_dir()], key=lambda p: float(p.name[2:])):
    runs = [json.loads(l) for l in open(folder / "runs.jsonl")] if (folder / "runs.jsonl").exists() else []
    nhle = [r for r in runs if r["method"] == "nhle"]
    ret = [r for r in runs if r["method"] == "retrain"]
    if not nhle:
        continue
    get = lambda rs, k: np.array([r[k] for r in rs], float)
    rows.append({"feature_pull": float(folder.name[2:]), "runs": len(nhle),
                 "drop_mean": get(nhle, "retained_drop_pp").mean(), "drop_worst": get(nhle, "retained_drop_pp").max(),
                 "retrain_drop_mean": get(ret, "retained_drop_pp").mean(), "attack": 100 * get(nhle, "unmasked_forget_test_acc").mean(),
                 "forget_acc": 100 * get(nhle, "forget_test_acc").max(), "silhouette": get(nhle, "forget_silhouette").mean(),
                 "retrain_silhouette": get(ret, "forget_silhouette").mean(),
                 "original_silhouette": np.mean([r["original"]["forget_silhouette"] for r in nhle]),
                 "relearn": get(nhle, "relearn_steps").mean(), "retrain_relearn": get(ret, "relearn_steps").mean(),
                 "steps": get(nhle, "steps").mean()})
lines = ["| feature_pull | runs | forget acc (max) % | retained drop mean / worst pp | retrain drop mean pp | attack % | silhouette (original / NHLE / retrain) | relearn steps (NHLE / retrain) | NHLE steps |",
         "|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    lines.append(f"| {r['feature_pull']:g} | {r['runs']} | {r['forget_acc']:.1f} | {r['drop_mean']:.2f} / {r['drop_worst']:.2f} | {r['retrain_drop_mean']:.2f} | "
                 f"{r['attack']:.1f} | {r['original_silhouette']:.2f} / {r['silhouette']:.2f} / {r['retrain_silhouette']:.2f} | "
                 f"{r['relearn']:.1f} / {r['retrain_relearn']:.1f} | {r['steps']:.0f} |")
(out / "tradeoff_feature_pull.md").write_text("\n".join(lines) + "\n")
(out / "tradeoff_feature_pull.json").write_text(json.dumps(rows, indent=1))
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
x = [r["drop_mean"] for r in rows]
for ax, key, ref, label in ((axes[0], "relearn", "retrain_relearn", "relearn steps"),
                            (axes[1], "silhouette", "retrain_silhouette", "forgotten-class silhouette")):
    ax.plot(x, [r[key] for r in rows], "o-")
    for r in rows:
        ax.annotate(f"{r['feature_pull']:g}", (r["drop_mean"], r[key]), textcoords="offset points", xytext=(4, 4))
    ax.axhline(np.mean([r[ref] for r in rows]), color="grey", ls="--", label="retrained reference")
    ax.set_xlabel("retained drop, mean (pp)"); ax.set_ylabel(label); ax.legend()
fig.suptitle("small CNN on digits: feature_pull (labels) against retained accuracy")
fig.tight_layout(); fig.savefig(out / "tradeoff_feature_pull.png", dpi=110)
print("\n".join(lines))
