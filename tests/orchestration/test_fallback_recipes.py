"""A forget falls back to the next recipe (unlearn.fallbacks) when its candidate fails a gate: the
plain functions on real MLflow (SQLite), DVC and the request ledger in a temp folder. One project
is built up test by test: a base champion, then forgets with a recipe made to fail."""

import json
import logging
import shutil

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from nhle.adapters.deletions import open_ledger
from nhle.adapters.tracking import configure, run_json
from nhle.cli.jobs import attempt_lines
from nhle.core.config import RECIPES, params_from_dict
from nhle.orchestration import pipeline, requests, steps

NAME = "nhle-classifier"
# Small and fast: few epochs, no synthetic inputs, a short relearn attack, one fallback. min_relearn_gain 0
# keeps these tests about the fallback, not about that gate's bound.
PARAMS = {
    "train": {"epochs": 4},
    "retrain_baseline": False,
    "gates": {"min_retain_test_acc": 0.8, "min_relearn_gain": 0.0},
    "unlearn": {
        "synthetic_per_class": 0,
        "rows_steps": 0,
        "holdout_per_class": 0,
        "feature_pull": 0.0,
        "relearn_max_steps": 50,
        "fallbacks": ["nhle_conservative"],
    },
}
# No fine-tuning, masking only: the mask-removal attack recovers the class, so the gate
# unmasked_forget_test_acc fails; the fallback recipe (nhle_conservative) sets max_steps again.
NO_FINE_TUNING = {"max_steps": 0}


def params_of(**sections):
    raw = json.loads(json.dumps(PARAMS))
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return params_from_dict(raw)


@pytest.fixture(scope="module")
def project(tmp_path_factory, mlflow_template):
    """A project whose champion is a base model (version 1)."""
    root = tmp_path_factory.mktemp("fallback")
    shutil.copy(mlflow_template, root / "mlflow.db")
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    params = params_of()
    configure(params, root)
    assert pipeline.train_base(params, root).promoted
    return root


@pytest.fixture
def tracked(project):
    configure(params_of(), project)  # other test modules point MLflow elsewhere
    return project


def versions() -> list[int]:
    return sorted(int(v.version) for v in MlflowClient().search_model_versions(f"name = '{NAME}'"))


def champion() -> str:
    return str(MlflowClient().get_model_version_by_alias(NAME, "champion").version)


def attempt_runs(parent_run_id: str) -> list:
    """The attempts' runs nested under a flow's run, in order."""
    runs = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", output_format="list")
    return sorted(runs, key=lambda r: int(r.data.tags["nhle.attempt"]))


def assert_nothing_registered_by(runs) -> None:
    for run in runs:
        assert not MlflowClient().search_model_versions(f"name = '{NAME}' and run_id = '{run.info.run_id}'")


def test_the_attempts_are_the_configured_section_then_each_new_fallback():
    params = params_of()
    tried = steps.unlearning_attempts(params)
    assert [(name, overrides) for name, overrides, _ in tried] == [
        ("configured", {}),
        ("nhle_conservative", RECIPES["nhle_conservative"]),
    ]
    assert tried[1][2].unlearn.max_steps == RECIPES["nhle_conservative"]["max_steps"]
    assert tried[1][2].unlearn.n_samples == params.unlearn.n_samples  # over the configured section
    # A fallback that is the configured section already would make the same candidate: left out.
    same = params_of(unlearn=RECIPES["nhle_conservative"])
    assert [name for name, _, _ in steps.unlearning_attempts(same)] == ["configured"]
    assert [name for name, _, _ in steps.unlearning_attempts(params_of(unlearn={"fallbacks": []}))] == ["configured"]


def test_a_request_whose_candidate_fails_a_gate_completes_with_the_fallback_recipe(tracked):
    root = tracked
    params = params_of(unlearn=NO_FINE_TUNING)
    before, parent = versions(), champion()
    submitted = requests.submit(params, root, "3", "dpo@example.com", "erasure request")
    results = []

    def forget(params, root, classes, **options):
        results.append(pipeline.forget(params, root, classes, **options))
        return results[-1]

    processed = requests.process_requests(params, root, pipeline.call, forget, logging.getLogger("test"))

    [result] = results
    assert result.promoted is True and champion() == result.version != parent
    assert versions() == before + [int(result.version)]  # only the fallback's candidate was registered
    attempts = result.attempts
    assert [(a["attempt"], a["recipe"], a["passed"], a["outcome"]) for a in attempts] == [
        (1, "configured", False, "not registered: the next recipe was tried"),
        (2, "nhle_conservative", True, "registered"),
    ]
    failed = {g["name"]: g for g in attempts[0]["failed_gates"]}
    assert failed["unmasked_forget_test_acc"]["value"] > failed["unmasked_forget_test_acc"]["bound"] == 0.05
    assert "unmasked_forget_test_acc" in attempts[0]["reason"] and attempts[0]["overrides"] == {}
    assert attempts[1]["overrides"] == RECIPES["nhle_conservative"]
    assert attempts[1]["version"] == result.version and attempts[1]["promoted"] is True
    assert processed["attempts"] == attempts

    version = MlflowClient().get_model_version(NAME, result.version)
    assert version.tags["nhle.recipe"] == "nhle_conservative" and version.tags["promoted"] == "true"
    assert "data_after.md5" in version.tags  # the deletion happened, for the published candidate
    flow_run = MlflowClient().get_run(version.run_id)
    assert flow_run.data.tags["nhle.recipe"] == "nhle_conservative" and flow_run.data.tags["nhle.attempts"] == "2"
    assert flow_run.data.tags["nhle.batch"] and flow_run.data.tags["nhle.request_ids"] == str(submitted.id)
    on_record = run_json(version.run_id, "attempts.json")
    assert [(a["recipe"], a["passed"], a["run_id"]) for a in on_record] == [
        (a["recipe"], a["passed"], a["run_id"]) for a in attempts
    ]
    assert on_record[1]["version"] == result.version

    children = attempt_runs(version.run_id)
    assert [c.info.run_id for c in children] == [a["run_id"] for a in attempts]
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED"]
    assert [c.data.params["recipe"] for c in children] == ["configured", "nhle_conservative"]
    assert [c.data.params["unlearn.max_steps"] for c in children] == [
        "0",
        str(RECIPES["nhle_conservative"]["max_steps"]),
    ]
    assert children[0].data.tags["nhle.attempt.passed"] == "false"
    assert "unmasked_forget_test_acc" in children[0].data.tags["nhle.attempt.reason"]
    assert children[1].data.tags["nhle.attempt.passed"] == "true"
    for child in children:
        assert "nhle.batch" not in child.data.tags  # the batch is the flow run's, as before
        assert {a.path for a in MlflowClient().list_artifacts(child.info.run_id)} >= {
            "report.json",
            "gates.json",
            "parity.json",
        }
    assert_nothing_registered_by(children)
    assert run_json(children[0].info.run_id, "report.json")["unlearn_steps"] == 0

    done = open_ledger(params, root).get(submitted.id)
    assert done.status == "done" and done.model_version_after == result.version
    audit = requests.read_report(done.report_uri)
    assert "## Unlearning attempts" in audit and "not registered: the next recipe was tried" in audit
    assert "unmasked_forget_test_acc" in audit and f"registered as version {result.version}, promoted" in audit
    [line] = attempt_lines(attempts)  # what `nhle request process` and `nhle run` print
    assert line.startswith("attempt 1 (configured): not registered") and "unmasked_forget_test_acc" in line


def test_without_fallbacks_the_failing_candidate_is_registered_and_not_promoted(tracked):
    root = tracked
    params = params_of(unlearn={**NO_FINE_TUNING, "fallbacks": []})
    before, parent = versions(), champion()
    result = pipeline.forget(params, root, "5")
    assert result.promoted is False and "unmasked_forget_test_acc" in result.reason
    assert versions() == before + [int(result.version)] and champion() == parent
    version = MlflowClient().get_model_version(NAME, result.version)
    assert version.tags["promoted"] == "false" and "unmasked_forget_test_acc" in version.tags["rejection_reason"]
    assert version.tags["nhle.recipe"] == "configured" and not version.aliases
    assert "data_after.md5" not in version.tags
    [attempt] = result.attempts
    assert attempt["recipe"] == "configured" and attempt["outcome"] == "registered" and not attempt["promoted"]
    assert len(attempt_runs(version.run_id)) == 1


def test_when_every_attempt_fails_the_last_is_registered_and_every_attempt_is_on_record(tracked):
    root = tracked
    params = params_of(export={"parity_tolerance": 1e-15})  # below fp32 rounding: no recipe's export meets it
    before, parent = versions(), champion()
    result = pipeline.forget(params, root, "5")
    assert result.promoted is False and "parity_max_abs_prob_diff" in result.reason
    assert versions() == before + [int(result.version)] and champion() == parent
    version = MlflowClient().get_model_version(NAME, result.version)
    assert version.tags["nhle.recipe"] == "nhle_conservative" and version.tags["promoted"] == "false"
    assert not version.aliases and "data_after.md5" not in version.tags
    attempts = result.attempts
    assert [(a["recipe"], a["passed"]) for a in attempts] == [("configured", False), ("nhle_conservative", False)]
    assert all("parity_max_abs_prob_diff" in {g["name"] for g in a["failed_gates"]} for a in attempts)
    assert "version" not in attempts[0] and attempts[1]["version"] == result.version
    assert [a["recipe"] for a in run_json(version.run_id, "attempts.json")] == ["configured", "nhle_conservative"]
    children = attempt_runs(version.run_id)
    assert [c.data.tags["nhle.attempt.passed"] for c in children] == ["false", "false"]
    assert_nothing_registered_by(children)
    lines = attempt_lines(attempts)
    assert len(lines) == 2 and f"registered as version {result.version}" in lines[1]
