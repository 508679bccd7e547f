"""nhle bench unlearning's own logic: the relearning goal's check, the synthetic dataset, resuming."""

import json

import nhle.bench.unlearning as bench
from nhle.bench.report import main as report
from nhle.bench.report import on_common_cases
from nhle.bench.unlearning import GOALS, case_rows, goal_checks, grid_data
from nhle.cli import main
from nhle.core.config import DataConfig


def row(method, drop, silhouette, share, attack=0.0, forget_acc=0.0, seconds=1.0, restored=None):
    """A runs.jsonl row; `share` is its relearn share on both attackers unless `restored` is given."""
    original = {"forget_silhouette": 0.6}
    restored = share if restored is None else restored
    return {
        "method": method,
        "retained_drop_pp": drop,
        "forget_silhouette": silhouette,
        "relearn_share_shipped": share,
        "relearn_share_restored": restored,
        "relearn_share_mask_only": 0.1,
        "relearn_steps_shipped": 60 * share,
        "relearn_steps_restored": 60 * restored,
        "unmasked_forget_test_acc": attack,
        "forget_test_acc": forget_acc,
        "seconds_vs_retrain": seconds,
        "steps": None if method == "retrain" else 50,
        "original": original,
    }


def test_goal_checks_compare_with_the_retrained_reference_of_the_same_runs():
    rows = [
        row("retrain", -0.5, 0.2, 1.0),
        row("retrain", 0.5, 0.2, 1.0),
        row("nhle", 0.0, 0.4, 0.9),
        row("nhle", 0.6, 0.4, 0.7),
    ]  # relearn share 0.8 on average
    checks = goal_checks(rows, "nhle")
    assert checks["drop_mean"] == 0.3 and checks["retrain_drop_mean"] == 0.0 and checks["drop_worst"] == 0.6
    assert checks["drop_reference"] == "retrain" and checks["reference_drop_mean"] == 0.0
    assert checks["relearn_share_shipped_mean_min"] == [0.8, 0.7]
    assert checks["relearn_share_mask_only_mean_min"][0] == 0.1
    assert checks["relearn_steps_shipped_restored_retrain"] == [48.0, 48.0, 60.0]
    assert checks["missed"] == []
    worse = goal_checks(rows + [row("nhle", 2.5, 0.6, 0.4, attack=0.2)], "nhle")
    assert worse["missed"] == [GOALS[1], GOALS[2].format(reference="retrain"), GOALS[3], GOALS[4]]


def test_the_relearn_goal_needs_both_attackers_on_average_and_in_every_run():
    rows = [row("retrain", 0.0, 0.2, 1.0), row("retrain", 0.0, 0.2, 1.0)]
    assert goal_checks(rows + [row("nhle", 0.0, 0.4, 0.9), row("nhle", 0.0, 0.4, 0.7)], "nhle")["missed"] == []
    low_restored = [row("nhle", 0.0, 0.4, 0.9, restored=0.6), row("nhle", 0.0, 0.4, 0.9, restored=0.6)]
    one_run_low = [row("nhle", 0.0, 0.4, 1.2), row("nhle", 0.0, 0.4, 0.45)]  # mean 0.825, one run under 0.5
    for nhle in (low_restored, one_run_low):
        assert goal_checks(rows + nhle, "nhle")["missed"] == [GOALS[4]]


def test_the_mean_drop_goal_is_against_mask_only_where_the_grid_ran_it():
    rows = [row("retrain", -1.0, 0.2, 1.0), row("mask_only", -0.2, 0.6, 0.1), row("nhle", 0.2, 0.4, 0.9)]
    checks = goal_checks(rows, "nhle")
    assert (checks["drop_reference"], checks["reference_drop_mean"]) == ("mask_only", -0.2)
    assert checks["missed"] == [GOALS[2].format(reference="mask_only")]  # 0.2 > -0.2 + 0.3
    assert goal_checks(rows[:1] + rows[2:], "nhle")["missed"] == [GOALS[2].format(reference="retrain")]


def test_goal_checks_take_the_retrain_of_only_the_cases_the_method_ran_on():
    rows = [
        {**row("retrain", -2.0, 0.2, 1.0), "seed": 0, "forget_classes": [1]},
        {**row("retrain", 0.0, 0.2, 1.0), "seed": 0, "forget_classes": [2]},
        {**row("nhle", 0.2, 0.4, 0.9), "seed": 0, "forget_classes": [2]},
    ]
    checks = goal_checks(rows, "nhle")
    assert checks["retrain_drop_mean"] == 0.0 and checks["runs"] == 1 and checks["missed"] == []


def test_a_knobs_curve_compares_its_points_on_the_cases_all_of_them_ran_on():
    rows = [
        {**row(m, 0.0, 0.2, 1.0), "seed": 0, "forget_classes": c}
        for m, c in (("retrain", [1]), ("retrain", [2]), ("nhle", [1]), ("nhle", [2]), ("forget_rank_1.0", [2]))
    ]
    kept = on_common_cases(rows, ["nhle", "forget_rank_1.0"])
    assert {(r["method"], r["forget_classes"][0]) for r in kept} == {
        ("retrain", 2),
        ("nhle", 2),
        ("forget_rank_1.0", 2),
    }


def test_a_rows_relearn_shares_are_over_the_same_cases_retrained_model_with_its_rows_as_trained():
    def result(method, shipped, restored, seconds=2.0):
        metrics = {"retain_test_acc": 0.9, "relearn_steps_shipped": shipped, "relearn_steps_restored": restored}
        return {"method": method, "seed": 0, "forget_classes": [3], "metrics": metrics, "seconds": seconds, "steps": 5}

    rows = case_rows([result("original", 6, 0), result("retrain", 70, 60), result("nhle", 48, 30)])
    nhle = next(r for r in rows if r["method"] == "nhle")
    shares = (nhle["relearn_share_shipped"], nhle["relearn_share_restored"], nhle["relearn_share_mask_only"])
    assert shares == (0.8, 0.5, 0.1)
    assert (nhle["relearn_steps_shipped"], nhle["relearn_steps_restored"]) == (48, 30)  # the raw steps beside them


def test_bench_grids_can_run_on_the_scaling_benchmarks_synthetic_set():
    data = grid_data(DataConfig(dataset="synthetic2000", seed=1))
    assert data.name == "synthetic2000" and len(data.train) == 2000 and data.num_classes == 10
    assert grid_data(DataConfig(dataset="synthetic2000", seed=2)).train.images.ne(data.train.images).any()


def test_resume_keeps_finished_cases_on_disk_before_anything_runs_and_runs_only_the_rest(tmp_path, capsys, monkeypatch):
    args = ["bench", "unlearning", "--quick", "--methods", "nhle", "--multi", "none", "--out", str(tmp_path)]
    assert main(args + ["--classes", "3"]) == 0
    first = (tmp_path / "runs.jsonl").read_text()
    capsys.readouterr()
    on_disk, run_grid = [], bench.run_grid
    # What a process killed while the new cases run would leave: the kept rows, whole.
    monkeypatch.setattr(
        bench, "run_grid", lambda *a, **k: (on_disk.append((tmp_path / "runs.jsonl").read_text()), run_grid(*a, **k))[1]
    )
    assert main(args + ["--classes", "3,4", "--resume"]) == 0
    assert on_disk == [first]
    printed = capsys.readouterr().out
    assert "classes [3]:" not in printed and "classes [4]:" in printed  # only the new case ran
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert (tmp_path / "runs.jsonl").read_text().startswith(first)
    assert sorted((r["method"], r["forget_classes"][0]) for r in rows) == [
        ("nhle", 3),
        ("nhle", 4),
        ("retrain", 3),
        ("retrain", 4),
    ]
    assert "| nhle | 2 |" in (tmp_path / "goal.md").read_text()


def test_resume_refuses_rows_measured_with_other_or_unrecorded_settings_and_keeps_them(tmp_path, capsys):
    args = [
        "bench",
        "unlearning",
        "--quick",
        "--methods",
        "nhle",
        "--multi",
        "none",
        "--classes",
        "3",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    first = (tmp_path / "runs.jsonl").read_text(), (tmp_path / "summary.md").read_text()
    capsys.readouterr()
    assert main(args + ["--resume", "--set", "unlearn.anchor_weight=50"]) == 2
    error = capsys.readouterr().err
    assert "was measured with other settings (unlearn.anchor_weight: 200.0 then, 50.0 now)" in error
    assert ((tmp_path / "runs.jsonl").read_text(), (tmp_path / "summary.md").read_text()) == first
    (tmp_path / "grid.json").unlink()  # rows whose settings are not on record
    assert main(args + ["--resume"]) == 2
    assert "holds rows but no grid.json" in capsys.readouterr().err
    assert (tmp_path / "runs.jsonl").read_text() == first[0]


def test_report_puts_every_setting_in_one_goal_table_and_plots_the_forget_rank_knob(tmp_path, capsys):
    for setting, cost in (("smallcnn", 0.0), ("resnet", 1.0)):
        rows = [
            row("retrain", 0.0, 0.2, 1.0),
            row("mask_only", 0.0, 0.6, 0.1),
            row("nhle", 0.1 + cost, 0.5, 0.25),
            row("forget_rank_0.5", 0.3 + cost, 0.4, 0.5),
            row("forget_rank_1.0", 0.8 + cost, 0.3, 0.75),
        ]
        for r in rows:
            r.update(
                forget_classes=[3],
                seed=0,
                probe_forget_acc=0.9,
                original={"forget_silhouette": 0.6, "probe_forget_acc": 1.0, "test_acc": 0.97},
            )
        (tmp_path / setting).mkdir()
        (tmp_path / setting / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert report([str(tmp_path)]) == 0
    table = (tmp_path / "goal.md").read_text()
    assert "| smallcnn | 97.0 | nhle | 1 |" in table and "| resnet | 97.0 | mask_only | 1 |" in table
    # Every method a setting ran is a row (an ablation may be the default it was measured as); the reference is not.
    assert "| resnet | 97.0 | forget_rank_1.0 | 1 |" in table and "| retrain |" not in table
    assert "| 0.00 (mask_only) | 0.60 / 0.50 / 0.20 |" in table  # drop reference; silhouette orig / method / retrain
    assert "missed: mean drop <= mask_only + 0.3 pp," in table  # resnet nhle, 1.1 pp
    assert "| 0.25 / 0.25 | 0.25 / 0.25 | 0.10 | 15.0 / 15.0 / 60.0 |" in table  # relearn shares, mask-only's, steps
    assert (tmp_path / "forget_rank.png").stat().st_size > 10_000
    assert report([str(tmp_path / "nothing")]) == 2
    assert "no */runs.jsonl under" in capsys.readouterr().err
