"""Serving benchmark: the real server process on loopback, and ONNX Runtime against PyTorch eager.

    nhle bench serve --out bench/serve                 # about a minute on 2 CPU cores
    python -m nhle.bench.serving --out bench/serve --single-requests 300 --batch-requests 50

One run, one machine: the model (the registry's champion checkpoint when there is one, else a
SmallCNN freshly trained for a few epochs) is exported to a temporary model.onnx with its
preprocessing json beside it, `uvicorn nhle_serving.server:create_app` serves it (NHLE_MODEL=<path>) on
a free 127.0.0.1 port, and a pool of `concurrency` httpx clients sends single-image and
batch-of-64 /predict requests. Then the same batches of 64 go through an in-process ONNX Runtime
session and the PyTorch model (eager, no_grad), interleaved in rounds so that drift of the
machine hits both alike. Clients and server share the machine's cores: on 2 cores the HTTP
figures are what one box serving itself gets, not a server's ceiling.
Writes OUT/serve.json and OUT/serve.md; every phase stops at its request count or at the
`seconds` cap, whichever comes first (serve.json says which).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from nhle.core.config import load_params
from nhle.adapters.processes import free_port, stop_process


def champion_model(params, project_dir: Path):
    """The champion's PyTorch checkpoint, or None when the store or the alias does not exist.
    Only reads: no experiment or database is created."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from nhle.adapters.tracking import download_checkpoint, resolve_uri
    from nhle.core.training import load_checkpoint

    uri = resolve_uri(params.tracking_uri(), project_dir)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return None
    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        version = client.get_model_version_by_alias(params.registry.model_name, params.registry.champion_alias)
        import mlflow

        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        model, _ = load_checkpoint(download_checkpoint(version))
    except (MlflowException, OSError, ValueError):
        return None
    return model, f"{params.registry.model_name} version {version.version} ({params.registry.champion_alias})"


def export_for_serving(model, data, folder: Path) -> Path:
    from nhle.core.export import export_onnx, preprocessing

    path = export_onnx(model, folder / "model.onnx", data.image_shape)
    (folder / "model.preprocessing.json").write_text(json.dumps(preprocessing(model, data.image_shape,
                                                                              data.class_names)))
    return path


class ServerProcess:
    """uvicorn nhle_serving.server:create_app --factory as a child process on a free loopback port."""

    def __init__(self, model_path: Path, log_path: Path, max_instances: int):
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, "NHLE_MODEL": str(model_path), "NHLE_POLL_SECONDS": "3600",
               "NHLE_MAX_INSTANCES": str(max_instances), "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "nhle_serving.server:create_app", "--factory",
             "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], "--no-access-log", "--log-level", "warning"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0):
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self._log.flush()
        raise RuntimeError(f"the server did not become ready:\n{self.log_path.read_text(errors='replace')[-3000:]}")

    def stop(self):
        stop_process(self.proc)
        self._log.close()


def load_phase(url: str, bodies: list[bytes], requests: int, concurrency: int, deadline: float,
               images_per_request: int) -> dict:
    """`requests` POSTs of the pre-encoded bodies, `concurrency` at a time; latencies per request."""
    import httpx

    latencies, errors, lock = [], [], threading.Lock()
    issued = 0

    def worker(k: int):
        nonlocal issued
        with httpx.Client(base_url=url, timeout=30, headers={"content-type": "application/json"}) as client:
            while True:
                with lock:
                    if issued >= requests or time.monotonic() > deadline:
                        return
                    i = issued
                    issued += 1
                start = time.perf_counter()
                try:
                    r = client.post("/predict", content=bodies[i % len(bodies)])
                    ok = r.status_code == 200
                except httpx.HTTPError as err:
                    ok, r = False, err
                elapsed = time.perf_counter() - start
                with lock:
                    (latencies if ok else errors).append(elapsed if ok else repr(r)[:200])

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "errors": len(errors), "first_errors": errors[:3],
            "capped": len(latencies) + len(errors) < requests, "concurrency": concurrency,
            "images_per_request": images_per_request, "seconds": round(wall, 3),
            "requests_per_s": round(len(latencies) / wall, 1),
            "images_per_s": round(len(latencies) * images_per_request / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None}


def compare_runtimes(model, onnx_path: Path, batches: list[np.ndarray], rounds: int, deadline: float,
                     round_seconds: float = 0.5) -> dict:
    """Images/s of an in-process ONNX Runtime session and of PyTorch eager on the same batches,
    interleaved round by round; both on the CPU, each with its default thread count. Each round
    passes over the batches often enough to take about `round_seconds` per runtime."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    model = model.cpu().eval()
    tensors = [torch.from_numpy(b) for b in batches]
    runners = {"onnxruntime": lambda: [session.run(None, {name: b}) for b in batches],
               "pytorch": lambda: [model(t) for t in tensors]}
    seconds = dict.fromkeys(runners, 0.0)
    images = dict.fromkeys(runners, 0)
    per_pass = sum(len(b) for b in batches)
    with torch.no_grad():
        repeats = {}
        for key, run in runners.items():  # warm-up, and the passes a round needs
            run()
            start = time.perf_counter()
            run()
            repeats[key] = max(1, int(round_seconds / max(time.perf_counter() - start, 1e-6)))
        done = 0
        for _ in range(rounds):
            if time.monotonic() > deadline and done:  # at least one round, however slow
                break
            for key, run in runners.items():
                start = time.perf_counter()
                for _ in range(repeats[key]):
                    run()
                seconds[key] += time.perf_counter() - start
                images[key] += repeats[key] * per_pass
            done += 1
    rate = {k: images[k] / seconds[k] if seconds[k] else 0.0 for k in runners}
    return {"device": "cpu", "batch_size": int(batches[0].shape[0]), "rounds": done, "capped": done < rounds,
            "images": images, "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "torch_threads": torch.get_num_threads(),
            "ort_images_per_s": round(rate["onnxruntime"], 1), "torch_images_per_s": round(rate["pytorch"], 1),
            "ort_over_torch": round(rate["onnxruntime"] / rate["pytorch"], 2) if rate["pytorch"] else None}


def bench_serve(project_dir: str | Path = ".", params_path: str | Path | None = None,
                out: Path = Path("bench/serve"), single_requests: int = 300, batch_requests: int = 50,
                batch_size: int = 64, concurrency: int = 4, seconds: float = 180.0, compare_rounds: int = 5,
                round_seconds: float = 0.5, model=None) -> dict:
    """Run the whole benchmark once; write OUT/serve.json and OUT/serve.md; return the dict.
    `model` (a MaskedClassifier) skips the champion lookup and the training."""
    from nhle.core.experiment import load_data
    from nhle.core.training import train_model

    started = time.monotonic()
    deadline = started + seconds
    project_dir = Path(project_dir).resolve()
    params = load_params(Path(params_path) if params_path else project_dir / "params.yaml")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(params.data)
    if model is not None:
        source = "given model"
    else:
        found = champion_model(params, project_dir)
        if found:
            model, source = found
        else:  # no registry yet: a quick model is as good for timing
            model, _ = train_model(data, replace(params.train, epochs=3, device="cpu"), seed=params.data.seed,
                                   progress=False)
            source = "SmallCNN trained for 3 epochs (no champion found)"
    model = model.cpu().eval()

    test = data.test.float_images()
    rng = np.random.default_rng(0)

    def batch(n: int) -> np.ndarray:
        return test[rng.integers(0, len(test), n)].numpy()

    singles = [json.dumps({"instances": batch(1).tolist(), "top_k": 1}).encode() for _ in range(64)]
    batches = [batch(batch_size) for _ in range(8)]
    batch_bodies = [json.dumps({"instances": b.tolist(), "top_k": 1}).encode() for b in batches]

    with tempfile.TemporaryDirectory(prefix="nhle-bench-serve-") as tmp:
        onnx_path = export_for_serving(model, data, Path(tmp))
        server = ServerProcess(onnx_path, Path(tmp) / "server.log",
                               max_instances=max(256, batch_size))
        try:
            server.wait_ready()
            load_phase(server.url, singles, 20, concurrency, deadline, 1)  # warm-up, not reported
            single = load_phase(server.url, singles, single_requests, concurrency, deadline, 1)
            batched = load_phase(server.url, batch_bodies, batch_requests, concurrency, deadline, batch_size)
        finally:
            server.stop()
        runtimes = compare_runtimes(model, onnx_path, batches, compare_rounds, deadline, round_seconds)

    import onnxruntime

    result = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {"node": platform.node(), "processor": platform.machine(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__},
        "model": {"source": source, "dataset": data.name, "input_shape": list(data.image_shape),
                  "forgotten_classes": model.forgotten_classes},
        "server": {"transport": "HTTP/1.1 on 127.0.0.1, JSON arrays to /predict, clients on the same machine",
                   "single": single, f"batch_{batch_size}": batched},
        "in_process": runtimes,
        "seconds_cap": seconds,
        "total_seconds": round(time.monotonic() - started, 1),
    }
    (out / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "serve.md").write_text(markdown(result, batch_size) + "\n")
    return result


def markdown(result: dict, batch_size: int) -> str:
    machine, server, runtimes = result["machine"], result["server"], result["in_process"]
    lines = [f"Serving benchmark, measured {result['measured_at']} on {machine['node']} ({machine['processor']}, "
             f"{machine['cpu_count']} CPUs; torch {machine['torch']}, onnxruntime {machine['onnxruntime']}). "
             f"Model: {result['model']['source']}, input {result['model']['input_shape']}.",
             "",
             f"HTTP ({server['transport']}):",
             "",
             "| payload | images/request | concurrency | requests | requests/s | images/s | p50 ms | p99 ms | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, key in (("single image", "single"), (f"batch of {batch_size}", f"batch_{batch_size}")):
        row = server[key]
        lines.append(f"| {label} | {row['images_per_request']} | {row['concurrency']} | {row['requests']} | "
                     f"{row['requests_per_s']} | {row['images_per_s']} | {row['p50_ms']} | {row['p99_ms']} | "
                     f"{row['errors']} |")
    lines += ["",
              f"In process, the same batches of {runtimes['batch_size']} on the CPU ({runtimes['rounds']} interleaved "
              f"rounds, {runtimes['images']['onnxruntime']} and {runtimes['images']['pytorch']} images; "
              f"torch threads {runtimes['torch_threads']}):",
              "",
              "| runtime | images/s |",
              "|---|---|",
              f"| ONNX Runtime | {runtimes['ort_images_per_s']} |",
              f"| PyTorch eager | {runtimes['torch_images_per_s']} |",
              f"| ratio ORT / PyTorch | {runtimes['ort_over_torch']} |"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nhle bench serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/serve", help="folder for serve.json and serve.md")
    parser.add_argument("--project-dir", default=".", help="the nhle checkout (serving/, params.yaml, MLflow store)")
    parser.add_argument("--params", help="params.yaml (default: PROJECT_DIR/params.yaml)")
    parser.add_argument("--single-requests", type=int, default=300)
    parser.add_argument("--batch-requests", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=180.0, help="cap on the whole run")
    args = parser.parse_args(argv)
    result = bench_serve(args.project_dir, args.params, Path(args.out), single_requests=args.single_requests,
                         batch_requests=args.batch_requests, batch_size=args.batch_size,
                         concurrency=args.concurrency, seconds=args.seconds)
    print((Path(args.out) / "serve.md").read_text())
    return 0 if not result["server"]["single"]["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
