"""nhle.orchestration without Prefect: the flows' functions run with the plain engine (`call`, or
any `run(step, *args)`), on real MLflow (SQLite), DVC and the request ledger in a temp folder."""

import logging
import shutil

import pytest
import torch
import yaml
from mlflow import MlflowClient

from nhle.adapters.deletions import open_ledger
from nhle.adapters.tracking import configure, run_json
from nhle.core.config import load_params
from nhle.orchestration import pipeline, requests, steps


def test_a_forget_request_is_processed_by_the_plain_functions_step_by_step(tmp_path, mlflow_template):
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"train": {"epochs": 4}, "retrain_baseline": False, "gates": {"min_retain_test_acc": 0.8}})
    )
    params = load_params(tmp_path / "params.yaml")
    configure(params, tmp_path)
    ran = []

    def engine(step, *args):  # what flows/pipeline.py does with Prefect tasks, here a plain call
        ran.append(step.__name__)
        return step(*args)

    def forget(params, root, classes, **options):
        return pipeline.forget(params, root, classes, engine=engine, **options)

    base = pipeline.train_base(params, tmp_path, engine)
    assert base.promoted and ran[:6] == [
        "clean_up_after_dead_runs",
        "versions_with_pending_evidence",
        "training_data",
        "check_settings",
        "version_data",
        "train_candidate",
    ]
    # the time breakdown: every step the engine ran, in order, with its seconds, also in the run
    assert [step for step, _ in base.step_seconds] == ran
    assert all(seconds >= 0 for _, seconds in base.step_seconds)

    run_id = MlflowClient().get_model_version(params.registry.model_name, base.version).run_id

    assert run_json(run_id, "step_seconds.json")["steps"] == base.step_seconds
    submitted = requests.submit(params, tmp_path, "3", "dpo@example.com", "withdrawn")
    result = requests.process_requests(params, tmp_path, engine, forget, logging.getLogger("test"))
    timed = [step for step, _ in result["step_seconds"]]
    assert timed[:3] == ["clean_up_after_dead_runs", "versions_with_pending_evidence", "claim_requests"]
    assert "forget.forget_candidate" in timed and timed[-1] == "close_requests"
    # after the promotion, the evidence: the retrain, the plots, the data deletion
    assert [step for step in timed if step.startswith("forget.complete_evidence.")] == [
        f"forget.complete_evidence.{step}"
        for step in (
            "evidence_work",
            "measure_evidence",
            "draw_evidence_plots",
            "delete_forgotten_samples",
            "record_evidence",
        )
    ]
    assert timed.index("forget.finish_version") < timed.index("forget.complete_evidence")

    done = open_ledger(params, tmp_path).get(submitted.id)
    assert done.status == "done" and done.model_version_after == result["versions"][0] and done.report_uri
    model, checkpoint, version = steps.load_champion(params)
    assert model.forgotten_classes == [3] and str(version.version) == done.model_version_after
    assert "**Outcome: done**" in requests.read_report(done.report_uri)
    assert version.tags["evidence"] == "complete" and done.data_version_after["md5"] == version.tags["data_after.md5"]
    assert {
        "claim_requests",
        "load_champion",
        "forget_candidate",
        "register_candidate",
        "gates_of",
        "finish_version",
        "close_requests",
    } <= set(ran)


def test_the_synthetic_inputs_of_a_version_are_made_once_and_reused_by_its_later_requests(tmp_path, mlflow_template):
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "train": {"epochs": 4},
                "retrain_baseline": False,
                "unlearn": {"max_steps": 5, "synthesis_steps": 5, "relearn_max_steps": 50, "fallbacks": []},
                # No version may pass (the relearn attack brings the class back from the mask-only model
                # within its cap, so a gain of 1000 cannot be met): both requests start from version 1.
                "gates": {"min_relearn_gain": 1000.0},
            }
        )
    )
    params = load_params(tmp_path / "params.yaml")
    configure(params, tmp_path)
    base = pipeline.train_base(params, tmp_path)

    first = pipeline.forget(params, tmp_path, "3")
    run_id = MlflowClient().get_model_version(params.registry.model_name, base.version).run_id
    kept = [f.path for f in MlflowClient().list_artifacts(run_id, "checkpoint")]
    second = pipeline.forget(params, tmp_path, "5")

    assert not first.promoted and not second.promoted
    assert first.report["synthetic_inputs"] == "synthesised" and first.report["seconds"]["synthesis"] > 0
    assert "checkpoint/synthetic.pt" in kept  # beside version 1's checkpoint
    assert second.report["synthetic_inputs"] == "reused" and second.report["seconds"]["synthesis"] == 0.0


@pytest.mark.parametrize(
    "setting, error",
    [
        ({"model": {"arch": "resnet19"}}, "unknown model 'resnet19'"),
        ({"model": {"weights": "weights.pt"}}, "`nhle import` registers your model"),
        ({"train": {"device": "cuda:0"}}, "no CUDA GPU is available"),
    ],
)
def test_a_bad_setting_is_refused_before_any_mlflow_run_starts(tmp_path, mlflow_template, setting, error):
    if "device" in setting.get("train", {}) and torch.cuda.is_available():
        pytest.skip("a GPU is present: cuda:0 is a good setting here")
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(setting))
    params = load_params(tmp_path / "params.yaml")
    configure(params, tmp_path)
    with pytest.raises((ValueError, RuntimeError), match=error):
        pipeline.train_base(params, tmp_path)
    experiments = [e.experiment_id for e in MlflowClient().search_experiments()]
    assert MlflowClient().search_runs(experiments) == []
