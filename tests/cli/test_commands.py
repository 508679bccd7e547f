"""The real entry point with tiny budgets: the contract later stages rely on."""

import json
import os
import subprocess
import sys

import pytest

from nhle.bench.configs import ServeBench
from nhle.bench.synthetic import synthetic_splits
from nhle.bench.unlearning import METHODS
from nhle.cli import main
from nhle.cli.commands import build_parser, resolve_params
from nhle.core.config import UnlearnConfig
from nhle.core.flags import config_from
from nhle.core.metrics import METRIC_KEYS
from nhle.core.training import load_checkpoint


@pytest.fixture(autouse=True)
def no_project_params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the CLI runs on its defaults


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    (out / "empty.yaml").write_text("{}\n")  # every built-in default
    assert (
        main(
            [
                "train",
                "--params",
                str(out / "empty.yaml"),
                "--dataset",
                "digits",
                "--arch",
                "smallcnn",
                "--split-seed",
                "0",
                "--epochs",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out / "model.pt"


def test_train_writes_model_and_metrics(base_checkpoint):
    metrics = json.loads((base_checkpoint.parent / "metrics.json").read_text())
    assert metrics["test_acc"] > 0.8


def test_unlearn_writes_model_and_report_with_the_contract(base_checkpoint, tmp_path):
    out = tmp_path / "forget"
    assert (
        main(
            [
                "unlearn",
                "--checkpoint",
                str(base_checkpoint),
                "--classes",
                "2,7",
                "--sample-seed",
                "1",
                "--out",
                str(out),
                "--retrain-baseline",
                "--n-samples",
                "16",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["forget_classes"] == [2, 7] and report["seed"] == 1 and report["n_forget_samples"] == 32
    assert (
        report["dataset"] == "digits"
        and report["model"] == "smallcnn"
        and report["encoding"] == UnlearnConfig().encoding
    )
    assert set(report["metrics"]) == {"original", "unlearned", "retrained"}
    for block in report["metrics"].values():
        assert set(block) == set(METRIC_KEYS)
        assert all(0 <= block[k] <= 1 for k in METRIC_KEYS if k.endswith("_acc"))
    assert report["metrics"]["unlearned"]["forget_test_acc"] == 0.0
    relearn, metrics = report["relearn"], report["metrics"]  # the relearn shares, over the retrained model's steps
    assert relearn["reference"] == "retrained"
    assert relearn["reference_steps"] == metrics["retrained"]["relearn_steps_restored"]
    assert relearn["steps"]["shipped"] == metrics["unlearned"]["relearn_steps_shipped"]
    assert set(report["seconds"]) == {"unlearn", "synthesis", "retrain"}

    model, checkpoint = load_checkpoint(out / "model.pt")
    assert checkpoint["forgotten_classes"] == [2, 7] and model.forget_mask.sum() == 2
    # Unlearning the unlearned model again: class names work, earlier classes are refused.
    again = tmp_path / "again"
    assert main(["unlearn", "--checkpoint", str(out / "model.pt"), "--classes", "4", "--out", str(again)]) == 0
    again_report = json.loads((again / "report.json").read_text())
    assert "retrained" not in again_report["metrics"] and again_report["relearn"]["reference"] == "mask_only"
    assert (
        main(["unlearn", "--checkpoint", str(again / "model.pt"), "--classes", "7", "--out", str(tmp_path / "refused")])
        == 2
    )


@pytest.mark.parametrize(
    "forget,message",
    [("12", "out of range"), ("seven", "unknown class 'seven'"), ("0,1,2,3,4,5,6,7,8,9", "no class to predict")],
)
def test_bad_forget_requests_are_refused_and_write_nothing(base_checkpoint, tmp_path, capsys, forget, message):
    out = tmp_path / "out"
    assert main(["unlearn", "--checkpoint", str(base_checkpoint), "--classes", forget, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_console_script_help_and_missing_checkpoint(tmp_path):
    nhle = [sys.executable, "-m", "nhle.cli.commands"]
    assert "--retrain-baseline" in subprocess.run(nhle + ["unlearn", "--help"], capture_output=True, text=True).stdout
    done = subprocess.run(
        nhle + ["unlearn", "--checkpoint", str(tmp_path / "no.pt"), "--classes", "1", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_bench_unlearning_quick_runs_every_method_on_the_same_work(tmp_path):

    # One class and one triple (every method runs on each: CI time goes by cases x methods).
    assert main(["bench", "unlearning", "--quick", "--classes", "0", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    cases = {tuple(r["forget_classes"]) for r in rows}
    assert cases == {(0,), (2, 5, 8)}
    assert len(rows) == len(cases) * len(METHODS) and {r["method"] for r in rows} == set(METHODS)
    for row in rows:  # every method measured on the same case against the same original and retrain
        same = [r for r in rows if r["forget_classes"] == row["forget_classes"]]
        assert {json.dumps(r["original"], sort_keys=True) for r in same} == {
            json.dumps(row["original"], sort_keys=True)
        }
        retrain = next(r for r in same if r["method"] == "retrain")
        assert abs(row["seconds_vs_retrain"] - row["seconds"] / retrain["seconds"]) < 1e-9
    masked = [r for r in rows if r["method"] in ("nhle", "mask_only", "retrain")]
    assert all(r["forget_test_acc"] == 0 for r in masked)
    no_mask = [r for r in rows if r["method"] == "nhle_no_mask"]
    assert all(r["unmasked_forget_test_acc"] == r["forget_test_acc"] for r in no_mask)
    summary = (tmp_path / "summary.md").read_text()
    assert "### one class" in summary and "### 3 classes" in summary and "| nhle | 1 |" in summary
    assert "| salun | 1 |" in summary.split("### 3 classes")[1]
    assert (tmp_path / "tradeoff.png").stat().st_size > 10_000


def test_bench_refuses_unknown_methods_and_classes(tmp_path, capsys):
    assert main(["bench", "unlearning", "--methods", "nhle,magic", "--out", str(tmp_path)]) == 2
    assert "unknown method(s) ['magic']" in capsys.readouterr().err
    assert main(["bench", "unlearning", "--quick", "--classes", "12", "--out", str(tmp_path)]) == 2
    assert "out of range 0..9" in capsys.readouterr().err


def test_bench_scaling_quick_times_nhle_and_retrain_per_size(tmp_path):
    assert main(["bench", "scaling", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "scaling.json").read_text())
    assert [r["train_size"] for r in rows] == [2000, 5000]
    for row in rows:
        assert row["nhle_forget_test_acc"] == 0 and row["retrain_seconds"] > 0 and row["nhle_seconds"] > 0
        assert row["original_retain_test_acc"] > 0.5  # the synthetic classes are learnable
    # No comparison of the two times here: wall-clock ratios belong to the benchmark's own run
    # (docs/benchmarks.md section 2); under load this one flipped.
    assert "| 5,000 |" in (tmp_path / "scaling.md").read_text() and (tmp_path / "scaling.png").exists()


def test_bench_inference_quick_compares_runtimes_for_both_models(tmp_path):
    assert main(["bench", "inference", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "inference.json").read_text())
    matmul = result["matmul_fp32_gflops"]
    assert matmul["best"] == max(matmul["torch"], matmul["numpy"], matmul["onnxruntime"]) > 0
    assert set(result["models"]) == {"smallcnn", "resnet18_cifar"}
    resnet = result["models"]["resnet18_cifar"]
    assert 500 < resnet["mflops_per_image"] < 1300  # ResNet-18, CIFAR stem, 32x32: ~0.56 GMAC = ~1.1 GFLOP
    assert resnet["ort_images_per_s"] > 0 and resnet["torch_images_per_s"] > 0 and 0 < resnet["ort_share_of_matmul"]
    assert "| resnet18_cifar | 3x32x32 |" in (tmp_path / "inference.md").read_text()


def test_synthetic_data_has_class_structure():
    data = synthetic_splits(500, test_size=100)
    assert data.train.images.shape == (500, 1, 16, 16) and data.train.images.dtype.is_floating_point is False
    assert sorted(set(data.train.labels.tolist())) == list(range(10))
    means = [data.train.images[data.train.labels == c].float().mean(0) for c in range(10)]
    within = (data.train.images[data.train.labels == 0].float() - means[0]).abs().mean()
    between = min((means[0] - means[c]).abs().mean() for c in range(1, 10))
    assert between > 0.2 * within  # the classes differ in their mean pattern, not only in noise


def parsed(*argv):
    """The settings a command line resolves to (params.yaml absent: the defaults)."""
    args = build_parser().parse_args(list(argv))
    args.params = "params.yaml"
    return resolve_params(args)


def test_mean_and_std_flags_are_applied_together_and_checked_once():
    params = parsed(
        "import", "--arch", "resnet18", "--image-size", "32", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"
    )
    assert params.model.mean == (0.5, 0.5, 0.5) and params.model.std == (0.25, 0.25, 0.25)
    params = parsed("train", "--out", "x", "--set", "model.mean=[0.4]", "--set", "model.std=[0.2]")
    assert params.model.mean == (0.4,) and params.model.std == (0.2,)
    with pytest.raises(ValueError, match="give mean and std together"):
        parsed("import", "--mean", "0.5,0.5,0.5")


@pytest.mark.parametrize(
    "setting,message",
    [
        ("unlearn.encoding=bogus", "unlearn.encoding must be one of negative_hot"),
        ("unlearn.layers=bogus", "unlearn.layers must be one of all, head, backbone"),
        ("unlearn.optimizer=bogus", "unlearn.optimizer must be one of adam, sgd, normalized"),
        ("train.device=gpu", "train.device must be one of auto, cpu, cuda"),
        ("unlearn.lr=abc", "unlearn.lr must be a number"),
        ("unlearn.forget_rank=2", "unlearn.forget_rank must be at most 1.0"),
    ],
)
def test_bad_settings_are_refused_when_read_naming_the_field_and_what_it_takes(capsys, setting, message):
    assert main(["run", "--set", setting]) == 2
    assert message in capsys.readouterr().err


def test_flag_choices_come_from_the_config_field(capsys):
    with pytest.raises(SystemExit):
        main(["unlearn", "--checkpoint", "m.pt", "--out", "o", "--encoding", "bogus"])
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, field, value, use",
    [
        (["run", "--forget", "5"], "classes", "5", "--classes"),
        (["unlearn", "--checkpoint", "m.pt", "--out", "o", "--forget", "cat"], "classes", "cat", "--classes"),
        (["bench", "unlearning", "--model", "resnet18"], "arch", "resnet18", "--arch"),
    ],
)
def test_an_old_flag_spelling_still_works_and_says_what_to_use(capsys, argv, field, value, use):
    assert getattr(build_parser().parse_args(argv), field) == value
    assert f"is deprecated: use {use}" in capsys.readouterr().err


def test_bench_flags_come_from_their_config_fields(capsys):
    args = build_parser().parse_args(["bench", "serve", "--rounds", "5", "--no-swap"])
    assert config_from(ServeBench, args) == ServeBench(rounds=5, swap=False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "unlearning", "--engine", "spark"])
    assert "invalid choice: 'spark'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="rounds"):  # checked like any section, naming the field
        config_from(ServeBench, build_parser().parse_args(["bench", "serve", "--rounds", "0"]))


def test_subcommand_help_starts_with_what_the_command_does(capsys):
    for argv in (["run", "--help"], ["request", "submit", "--help"], ["bench", "serve", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        usage, _, rest = capsys.readouterr().out.partition("\n\n")
        assert rest.split("\n")[0].strip() and not rest.startswith("options"), argv


def test_a_bad_request_is_refused_before_any_prefect_server_starts_and_prints_no_noise(tmp_path):
    """Outside make and CI (no telemetry variables set): a class the dataset does not have is
    refused at once; no temporary Prefect server ever started (it would write its database in
    PREFECT_HOME). Then a flow command with nothing to do prints no ERROR and no warning."""
    home = tmp_path / "prefect-home"
    quiet = (
        "MLFLOW_DISABLE_TELEMETRY",
        "DO_NOT_TRACK",
        "DVC_NO_ANALYTICS",
        "PREFECT_SERVER_ANALYTICS_ENABLED",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW",
        "PREFECT_API_URL",
    )
    elsewhere = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "NHLE_REQUESTS_DATABASE")  # set by other tests
    env = {**{k: v for k, v in os.environ.items() if k not in quiet + elsewhere}, "PREFECT_HOME": str(home)}
    nhle = [sys.executable, "-m", "nhle.cli"]
    refused = subprocess.run([*nhle, "run", "--classes", "cat"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "unknown class 'cat'" in refused.stderr
    assert not (home / "prefect.db").exists()
    done = subprocess.run([*nhle, "request", "process"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "no pending forget requests" in done.stdout
    assert (home / "prefect.db").exists()  # this one did run a flow
    output = done.stdout + done.stderr
    assert "ERROR" not in output and "Warning" not in output and "telemetry" not in output.lower(), output
