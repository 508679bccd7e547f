"""`nhle bench serve` end to end, with tiny counts: real server process, ORT vs PyTorch.

    .venv/bin/python -m pytest -q tests/serving/test_serve_bench.py
"""
import json

from serving_support import REPO


def test_bench_serve_writes_its_figures(trained, tmp_path):
    from nhle.bench.serving import bench_serve

    out = tmp_path / "out"
    result = bench_serve(REPO, tmp_path / "params.yaml", out, single_requests=30, batch_requests=4, batch_size=64,
                         concurrency=2, seconds=90, compare_rounds=1, round_seconds=0.05, model=trained)
    assert json.loads((out / "serve.json").read_text()) == result
    for key in ("single", "batch_64"):
        phase = result["server"][key]
        assert phase["errors"] == 0 and phase["requests_per_s"] > 0 and phase["p99_ms"] >= phase["p50_ms"] > 0
    assert result["server"]["single"]["requests"] == 30 and result["server"]["batch_64"]["requests"] == 4
    assert result["in_process"]["ort_images_per_s"] > 0 and result["in_process"]["torch_images_per_s"] > 0
    table = (out / "serve.md").read_text()
    assert "| batch of 64 | 64 |" in table and "ratio ORT / PyTorch" in table
