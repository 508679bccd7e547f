"""`nhle bench serve` end to end with tiny counts: a base model trained and registered in a scratch
project, nhle serve (micro-batching off and on) and mlflow models serve as real processes, every
variant, in-process ONNX Runtime and PyTorch, and two forget requests each timed three ways:
accepted -> suppressed, processing started -> the new version served, -> the process ended.

    .venv/bin/python -m pytest -q tests/serving/test_serve_bench.py
"""

import json

import prefect.settings

from nhle.bench.configs import ServeBench
from nhle.bench.serving import BASELINE, VARIANTS, bench_serve


def test_bench_serve_writes_its_figures(tmp_path, prefect_harness, monkeypatch):

    # `nhle request process` (the timed child) uses the session's Prefect API, as a user's would
    # with PREFECT_API_URL set, instead of starting a temporary server of its own (~20 s in CI).
    monkeypatch.setenv("PREFECT_API_URL", prefect.settings.PREFECT_API_URL.value())

    out = tmp_path / "out"
    result = bench_serve(
        tmp_path,
        None,
        ServeBench(
            out=str(out),
            rounds=2,
            single_requests=20,
            batch_requests=4,
            batch_size=64,
            concurrency=2,
            seconds=120,
            swap_requests=2,
        ),
        assignments=(
            "train.epochs=4",
            "retrain_baseline=false",
            "gates.max_retained_drop_pp=50",
            "gates.min_retain_test_acc=0.5",
        ),
        round_seconds=0.05,
    )  # timing, not quality
    assert json.loads((out / "serve.json").read_text()) == result
    assert set(result["http"]) == {"single", "batch_64"}
    for payload, rows in result["http"].items():
        assert [label for label, *_ in VARIANTS] == list(rows)
        for label, row in rows.items():
            assert row["errors"] == 0 and row["requests_per_s"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0, (label, row)
            assert row["requests"] == (20 if payload == "single" else 4)
            assert result["ratios"][payload][label]["share_of_onnxruntime"] > 0
        assert result["ratios"][payload][BASELINE]["over_mlflow"] == 1.0
        assert result["in_process"][payload]["ort_images_per_s"] > 0
    swap = result["swap"]
    assert len(swap["requests"]) == 2 and len({r["classes"] for r in swap["requests"]}) == 2
    for row in swap["requests"]:
        assert row["process_exit"] == 0 and row["to_version"] != row["from_version"]
        assert 0 < row["seconds_to_new_version"] <= row["process_seconds"] + 1
        assert 0 <= row["accepted_to_suppressed_seconds"] < 30  # told at submission, not at a poll
    for key in ("accepted_to_suppressed_seconds", "seconds_to_new_version", "process_seconds"):
        assert swap["seconds"][key]["min"] <= swap["seconds"][key]["median"] <= swap["seconds"][key]["max"]
    table = (out / "serve.md").read_text()
    assert "| nhle V2 binary | 4 |" in table and "accepted -> the server suppresses the class |" in table
