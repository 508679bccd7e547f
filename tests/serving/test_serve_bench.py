"""`nhle bench serve` end to end with tiny counts: a base model trained and registered in a scratch
project, nhle serve (micro-batching off and on) and mlflow models serve as real processes, every
variant, in-process ONNX Runtime and PyTorch, and a forget request timed until the server answers
with the new version.

    .venv/bin/python -m pytest -q tests/serving/test_serve_bench.py
"""
import json

from nhle.bench.serving import BASELINE, VARIANTS


def test_bench_serve_writes_its_figures(tmp_path, prefect_harness, monkeypatch):
    import prefect.settings

    from nhle.bench.serving import bench_serve

    # `nhle request process` (the timed child) uses the session's Prefect API, as a user's would
    # with PREFECT_API_URL set, instead of starting a temporary server of its own (~20 s in CI).
    monkeypatch.setenv("PREFECT_API_URL", prefect.settings.PREFECT_API_URL.value())

    out = tmp_path / "out"
    result = bench_serve(tmp_path, None, out, rounds=2, single_requests=20, batch_requests=4, batch_size=64,
                         concurrency=2, seconds=120, round_seconds=0.05,
                         assignments=("train.epochs=4", "retrain_baseline=false"))
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
    assert swap["process_exit"] == 0 and swap["to_version"] != swap["from_version"]
    assert 0 < swap["seconds_to_new_version"] <= swap["process_seconds"] + 1
    table = (out / "serve.md").read_text()
    assert "| nhle V2 binary | 4 |" in table and "`nhle request process` started" in table
