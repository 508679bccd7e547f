"""Serving benchmark: every way into `nhle serve`, `mlflow models serve` on the same champion, and
in-process ONNX Runtime, from one client process, interleaved in rounds.

    nhle bench serve --out bench/serve                 # a few minutes on 2 CPU cores
    python -m nhle.bench.serving --out bench/serve --rounds 5 --single-requests 600 --batch-requests 100

The champion is the project's (PROJECT_DIR's registry) when it has one; otherwise the benchmark
trains and registers a base model in a scratch project (the pipeline's train_base, without
Prefect). Four servers run as child processes on loopback: `nhle serve` with the project's
serving settings, the same with micro-batching on, the same with ort_threads 0 (ONNX Runtime's
own thread count), and `mlflow models serve` of the same models:/ URI. Each
round sends, for single images and for batches of `batch_size`, a share of the requests to every
variant in turn (JSON /predict, /invocations, Open Inference Protocol JSON and binary, and MLflow's
/invocations), `concurrency` keep-alive connections at a time from threads of this process; then
ONNX Runtime and PyTorch eager run the same batches in process. Clients and servers share the
machine's cores: on 2 cores the HTTP figures are what one box serving itself gets.

Last, in a scratch project with its own server: a forget request is submitted and
`nhle request process` started; the time until the running server answers with the new version
is measured (the flow tells the server to reload through serving.notify).
Writes OUT/serve.json and OUT/serve.md; each phase stops at its count or at the `seconds` cap.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import yaml

from nhle.adapters.processes import free_port, stop_process
from nhle.bench.configs import ServeBench
from nhle.core.config import load_params, params_as_dict, resolve_uri, with_assignments
from nhle.core.flags import add_config_flags, config_from
from nhle.core.outputs import OUTPUT_NAME

ADMIN_TOKEN = "nhle-bench-serve-admin-token-32-characters"
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
# (variant, server, path, body format): what each round sends, in this order.
VARIANTS = [
    ("nhle /predict (JSON)", "nhle", "/predict", "predict"),
    ("nhle /invocations (JSON)", "nhle", "/invocations", "invocations"),
    ("nhle V2 JSON", "nhle", "/v2/models/{name}/infer", "v2_json"),
    ("nhle V2 binary", "nhle", "/v2/models/{name}/infer", "v2_binary"),
    ("nhle V2 binary, micro-batching", "nhle_batching", "/v2/models/{name}/infer", "v2_binary"),
    ("nhle V2 binary, ort_threads 0", "nhle_ort_all_cores", "/v2/models/{name}/infer", "v2_binary"),
    ("mlflow models serve /invocations (JSON)", "mlflow", "/invocations", "invocations"),
]
# Settings (NHLE_<FIELD>) of each nhle server beyond the project's params.yaml.
NHLE_SERVERS = {"nhle": {}, "nhle_batching": {"micro_batching": "true"}, "nhle_ort_all_cores": {"ort_threads": 0}}
BASELINE = "mlflow models serve /invocations (JSON)"


# --------------------------------------------------------------------------------------------
# The champion, and the servers


def scratch_project(params, folder: Path) -> tuple[Path, object]:
    """A project folder with its own MLflow store, ledger and data repository, whose champion is
    a base model trained by the pipeline (plain function calls, no Prefect)."""
    from nhle.adapters.tracking import configure  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.orchestration import pipeline  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    folder.mkdir(parents=True, exist_ok=True)
    settings = params_as_dict(params)
    settings["tracking"].update(tracking_uri="sqlite:///mlflow.db", artifact_location="")
    settings["requests"]["database"] = "sqlite:///requests.db"
    (folder / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    params = load_params(folder / "params.yaml")
    configure(params, folder)
    result = pipeline.train_base(params, folder)
    if not result.promoted:
        raise RuntimeError(f"the scratch project's base model was not promoted: {result.reason}")
    return folder, params


def champion_of(params, project_dir: Path):
    """(model version, tracking URI) of the project's champion, or None. Only reads."""
    from mlflow import MlflowClient  # noqa: PLC0415 - lazy: MLflow
    from mlflow.exceptions import MlflowException  # noqa: PLC0415 - lazy: MLflow

    uri = resolve_uri(params.tracking_uri(), project_dir)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        return None
    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        return client.get_model_version_by_alias(params.registry.model_name, params.registry.champion_alias), uri
    except MlflowException:
        return None


class ServerProcess:
    """A server started as a child process on a free loopback port, waited on until ready."""

    def __init__(self, command: list[str], env: dict, log_path: Path, port: int | None = None, cwd=None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [c.replace("{port}", str(self.port)) for c in command],
            cwd=cwd,
            env={**os.environ, **QUIET, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, path: str, timeout: float = 120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self._log.flush()
        raise RuntimeError(
            f"{self.log_path.stem} did not become ready on {path}:\n{self.log_path.read_text(errors='replace')[-3000:]}"
        )

    def stop(self):
        stop_process(self.proc)
        self._log.close()


def nhle_server(project_dir: Path, log_path: Path, port: int | None = None, **settings) -> ServerProcess:
    env = {
        "NHLE_PROJECT_DIR": str(project_dir),
        "NHLE_PARAMS": str(project_dir / "params.yaml"),
        "NHLE_ADMIN_TOKEN": ADMIN_TOKEN,
        **{f"NHLE_{k.upper()}": str(v) for k, v in settings.items()},
    }
    return ServerProcess([*uvicorn_command("{port}"), "--log-level", "warning"], env, log_path, port, cwd=project_dir)


def uvicorn_command(port) -> list[str]:
    """nhle's server as a child process on loopback: uvicorn with the app factory and nhle's
    bounded HTTP protocol (nhle_serving.http.GuardedProtocol), as docs/deploy.md starts it."""
    app, protocol = "nhle_serving.server:create_app", "nhle_serving.http:GuardedProtocol"
    flags = f"--factory --http {protocol} --host 127.0.0.1 --port {port} --no-access-log"
    return [sys.executable, "-m", "uvicorn", app, *flags.split()]


def mlflow_server(model_uri: str, tracking_uri: str, log_path: Path) -> ServerProcess:
    # `mlflow models serve --env-manager local` runs uvicorn from PATH: put this interpreter's first.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return ServerProcess(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            model_uri,
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
        ],
        {"MLFLOW_TRACKING_URI": tracking_uri, "PATH": path},
        log_path,
    )


# --------------------------------------------------------------------------------------------
# Request bodies and the client


def request_body(fmt: str, images: np.ndarray) -> tuple[bytes, dict]:
    """(body, headers) of one request carrying `images` (float32 N x C x H x W in [0, 1])."""
    if fmt == "predict":
        return json.dumps({"instances": images.tolist(), "top_k": 1}).encode(), {"Content-Type": "application/json"}
    if fmt == "invocations":
        return json.dumps({"inputs": images.tolist()}).encode(), {"Content-Type": "application/json"}
    tensor = {"name": "images", "shape": list(images.shape), "datatype": "FP32"}
    if fmt == "v2_json":
        body = {"inputs": [{**tensor, "data": images.ravel().tolist()}]}
        return json.dumps(body).encode(), {"Content-Type": "application/json"}
    raw = images.astype("<f4").tobytes()
    head = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
            "outputs": [{"name": OUTPUT_NAME, "parameters": {"binary_data": True}}],
        }
    ).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def process_tree_cpu(pid: int | None) -> float | None:
    """CPU seconds (user + system) used so far by process `pid` and its descendants (Linux /proc;
    None elsewhere): `mlflow models serve` answers from a child process of the command."""
    if pid is None or not Path("/proc/self/stat").exists():
        return None
    stats = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        stats[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    tree = {pid}
    for _ in range(4):  # children, grandchildren, ...
        tree |= {p for p, (parent, _) in stats.items() if parent in tree}
    return sum(stats[p][1] for p in tree if p in stats)


def load_phase(
    url: str,
    path: str,
    bodies: list[tuple[bytes, dict]],
    requests: int,
    concurrency: int,
    deadline: float,
    server_pid: int | None = None,
) -> dict:
    """`requests` POSTs, `concurrency` keep-alive connections at a time; latency of each, and the
    CPU seconds the client (this process) and the server process tree spent meanwhile."""
    host, port = url.removeprefix("http://").split(":")
    latencies, errors, lock = [], [], threading.Lock()
    issued = 0

    def worker(k: int):
        nonlocal issued
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            while True:
                with lock:
                    if issued >= requests or time.monotonic() > deadline:
                        return
                    i = issued
                    issued += 1
                body, headers = bodies[i % len(bodies)]
                start = time.perf_counter()
                try:
                    connection.request("POST", path, body, headers)
                    response = connection.getresponse()
                    answer = response.read()
                    ok, why = response.status == 200, f"{response.status}: {answer[:200]!r}"
                except (OSError, http.client.HTTPException) as err:
                    ok, why = False, repr(err)[:200]
                    connection.close()
                    connection = http.client.HTTPConnection(host, int(port), timeout=60)
                elapsed = time.perf_counter() - start
                with lock:
                    (latencies if ok else errors).append(elapsed if ok else why)
        finally:
            connection.close()

    started, client_cpu, server_cpu = time.perf_counter(), time.process_time(), process_tree_cpu(server_pid)
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    server_after = process_tree_cpu(server_pid)
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "seconds": time.perf_counter() - started,
        "latencies": latencies,
        "client_cpu": time.process_time() - client_cpu,
        "server_cpu": None if server_cpu is None else server_after - server_cpu,
    }


def summary(phases: list[dict], images_per_request: int, requested: int, concurrency: int) -> dict:
    latencies = np.array([t for p in phases for t in p["latencies"]]) * 1000
    done, seconds = len(latencies), sum(p["seconds"] for p in phases)
    return {
        "requests": done,
        "errors": sum(p["errors"] for p in phases),
        "first_errors": [e for p in phases for e in p["first_errors"]][:3],
        "capped": done < requested,
        "concurrency": concurrency,
        "images_per_request": images_per_request,
        "seconds": round(seconds, 3),
        "requests_per_s": round(done / seconds, 1) if seconds else 0.0,
        "images_per_s": round(done * images_per_request / seconds, 1) if seconds else 0.0,
        "p50_ms": round(float(np.percentile(latencies, 50)), 2) if done else None,
        "p99_ms": round(float(np.percentile(latencies, 99)), 2) if done else None,
        # CPU per answered request: where the cores went (client and servers share them)
        "client_cpu_ms": round(sum(p["client_cpu"] for p in phases) * 1000 / done, 3) if done else None,
        "server_cpu_ms": (
            round(sum(p["server_cpu"] for p in phases) * 1000 / done, 3)
            if done and all(p["server_cpu"] is not None for p in phases)
            else None
        ),
    }


def torch_version() -> str:
    import torch  # noqa: PLC0415 - lazy: torch (the CLI imports this module)

    return torch.__version__


def compare_runtimes(
    model, onnx_path: Path, batches: list[np.ndarray], rounds: int, deadline: float, round_seconds: float = 0.5
) -> dict:
    """Images/s of an in-process ONNX Runtime session and of PyTorch eager on the same batches,
    interleaved round by round; both on the CPU, each with its default thread count. Each round
    passes over the batches often enough to take about `round_seconds` per runtime."""
    import onnxruntime  # noqa: PLC0415 - lazy: onnxruntime: with torch, only when measuring
    import torch  # noqa: PLC0415 - lazy: torch: `nhle serve` builds its parser from this module

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    model = model.cpu().eval()
    tensors = [torch.from_numpy(b) for b in batches]
    runners = {
        "onnxruntime": lambda: [session.run(None, {name: b}) for b in batches],
        "pytorch": lambda: [model(t) for t in tensors],
    }
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
    return {
        "device": "cpu",
        "batch_size": int(batches[0].shape[0]),
        "rounds": done,
        "capped": done < rounds,
        "images": images,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "torch_threads": torch.get_num_threads(),
        "ort_images_per_s": round(rate["onnxruntime"], 1),
        "torch_images_per_s": round(rate["pytorch"], 1),
        "ort_over_torch": round(rate["onnxruntime"] / rate["pytorch"], 2) if rate["pytorch"] else None,
    }


def in_process(
    onnx_path: Path, model, batches: dict[str, list[np.ndarray]], rounds: int, deadline: float, round_seconds: float
) -> dict:
    """compare_runtimes for each payload (single images, batches)."""
    return {
        payload: compare_runtimes(model, onnx_path, arrays, rounds, deadline, round_seconds)
        for payload, arrays in batches.items()
    }


# --------------------------------------------------------------------------------------------
# Swap time: `nhle request process` starting -> the running server answering with the new version


def swap_time(root: Path, work: Path, requests: int = 3, timeout: float = 900.0) -> dict:
    """`requests` forget requests, one after another, each timed three ways: accepted -> the
    running server suppresses its class (the ledger's "suppressed" event, written when the server
    answered the notification), `nhle request process` started -> the server answers with the new
    version, and -> the process ended with the evidence complete. Returns each request's row and
    the min / median / max of each time."""
    from nhle.adapters.deletions import open_ledger  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.orchestration.requests import submit  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    port = free_port()
    settings = yaml.safe_load((root / "params.yaml").read_text())
    settings.setdefault("serving", {})["notify"] = [f"http://127.0.0.1:{port}"]
    (root / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    params = load_params(root / "params.yaml")
    server = nhle_server(root, work / "swap-server.log", port).wait_ready("/readyz")
    rows, token = [], os.environ.get("NHLE_ADMIN_TOKEN")
    os.environ["NHLE_ADMIN_TOKEN"] = ADMIN_TOKEN  # submit tells the server with the server's token
    try:
        for _ in range(requests):
            before = httpx.get(server.url + "/model").json()
            names, gone = before["class_names"], set(before["forgotten_classes"])
            wanted = [c.strip() for c in params.forget.split(",")] + names
            spec = next((c for c in wanted if c in names and names.index(c) not in gone), None)
            if spec is None or len(gone) + 2 > len(names):
                raise ValueError(f"no class left to forget for a timed request ({names}, forgotten {sorted(gone)})")
            request = submit(params, root, spec, "bench@nhle", "nhle bench serve: time to serve a forget request")
            told = [e for e in open_ledger(params, root).events(request.id) if e.kind == "suppressed"]
            suppressed_at = told[0].detail["servers"][0]["at"] if told else None
            rows.append(
                {
                    "request_id": request.id,
                    "classes": spec,
                    "from_version": before["version"],
                    "accepted_to_suppressed_seconds": (
                        round((datetime.fromisoformat(suppressed_at) - request.submitted_at).total_seconds(), 3)
                        if suppressed_at
                        else None
                    ),
                    **process_until_served(root, work, server.url, before, timeout),
                }
            )
    finally:
        server.stop()
        if token is None:
            os.environ.pop("NHLE_ADMIN_TOKEN", None)
        else:
            os.environ["NHLE_ADMIN_TOKEN"] = token
    times = ("accepted_to_suppressed_seconds", "seconds_to_new_version", "process_seconds")
    return {
        "requests": rows,
        "retrain_baseline": params.retrain_baseline,
        "poll_seconds": params.serving.poll_seconds,
        "server_told_by": "serving.notify (POST /admin/reload)",
        "seconds": {key: spread([row[key] for row in rows if row[key] is not None]) for key in times},
    }


def spread(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"min": ordered[0], "median": round(float(np.median(ordered)), 3), "max": ordered[-1]} if ordered else {}


def process_until_served(root: Path, work: Path, url: str, before: dict, timeout: float) -> dict:
    """`nhle request process` of the pending request, timed from its start to the server at `url`
    answering with a new version, and to its end."""
    started = time.monotonic()
    command = [sys.executable, "-m", "nhle.cli", "request", "process", "--project-dir", str(root)]
    with open(work / "request-process.log", "ab") as log:
        proc = subprocess.Popen(
            command,
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **QUIET, "NHLE_ADMIN_TOKEN": ADMIN_TOKEN},
        )
        answered = version = None
        while time.monotonic() - started < timeout:
            version = httpx.post(
                url + "/invocations", json={"inputs": [np.zeros(before["input_shape"]).tolist()]}
            ).headers.get("x-model-version")
            if version != before["version"]:
                answered = time.monotonic() - started
                break
            if proc.poll() is not None and proc.returncode != 0:
                break
            time.sleep(0.05)
        rc = proc.wait(timeout=max(1.0, timeout - (time.monotonic() - started)))
        finished = time.monotonic() - started
    if answered is None:
        raise RuntimeError(
            f"the server never answered with a new version (nhle request process exit {rc}):\n"
            f"{(work / 'request-process.log').read_text(errors='replace')[-3000:]}"
        )
    return {
        "to_version": version,
        "seconds_to_new_version": round(answered, 2),
        "process_seconds": round(finished, 2),
        "process_exit": rc,
    }


# --------------------------------------------------------------------------------------------
# The benchmark


def bench_serve(
    project_dir: str | Path = ".",
    params_path: str | Path | None = None,
    config: ServeBench = ServeBench(),
    assignments: tuple[str, ...] = (),
    round_seconds: float = 0.5,
) -> dict:
    """Run the whole benchmark once; write OUT/serve.json and OUT/serve.md; return the dict.
    Requests per variant are spread over `rounds`; `assignments` are --set overrides of the params."""
    import mlflow.artifacts  # noqa: PLC0415 - lazy: MLflow
    import onnxruntime  # noqa: PLC0415 - lazy: onnxruntime: with torch, only when measuring

    from nhle.adapters.tracking import download_checkpoint  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.core.training import load_checkpoint  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    out = Path(config.out)
    started = time.monotonic()
    deadline = started + config.seconds
    project_dir = Path(project_dir).resolve()
    params = with_assignments(
        load_params(Path(params_path) if params_path else project_dir / "params.yaml"), list(assignments)
    )
    out.mkdir(parents=True, exist_ok=True)
    servers, result = [], {}
    with tempfile.TemporaryDirectory(prefix="nhle-bench-serve-") as tmp:
        work = Path(tmp)
        found, scratch = champion_of(params, project_dir), None
        if found is None:  # no champion here: one trained and registered in a scratch project
            scratch = scratch_project(params, work / "project")
            found, root = champion_of(scratch[1], scratch[0]), scratch[0]
            origin = f"base {params.model.arch} trained by the benchmark ({params.train.epochs} epochs)"
        else:
            root, origin = project_dir, f"the project's champion ({project_dir})"
        version, tracking_uri = found
        model_uri = f"models:/{version.name}/{version.version}"
        mlflow.set_tracking_uri(tracking_uri)
        onnx_path = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(work / "onnx"))) / "model.onnx"
        model, _ = load_checkpoint(download_checkpoint(version, work / "checkpoint"))
        try:
            max_instances = str(max(256, config.batch_size))
            for key, extra in NHLE_SERVERS.items():
                servers.append(
                    (
                        key,
                        nhle_server(
                            root,
                            work / f"{key}.log",
                            model=model_uri,
                            poll_seconds=3600,
                            max_instances=max_instances,
                            **extra,
                        ),
                    )
                )
            servers.append(("mlflow", mlflow_server(model_uri, tracking_uri, work / "mlflow.log")))
            urls = {key: server.wait_ready("/ping" if key == "mlflow" else "/readyz").url for key, server in servers}
            pids = {key: server.proc.pid for key, server in servers}
            result["http"] = http_rounds(
                urls,
                pids,
                version.name,
                params,
                config.rounds,
                config.single_requests,
                config.batch_requests,
                config.batch_size,
                config.concurrency,
                deadline,
            )
        finally:
            for _, server in servers:
                server.stop()
        batches = result["http"].pop("_batches")
        runtimes = in_process(onnx_path, model, batches, config.rounds, deadline, round_seconds)
        if config.swap:
            if scratch is None:
                scratch = scratch_project(params, work / "project")
            result["swap"] = swap_time(scratch[0], work, config.swap_requests)
    result = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {
            "node": platform.node(),
            "processor": platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch_version(),
            "onnxruntime": onnxruntime.__version__,
        },
        "model": {
            "source": origin,
            "uri": model_uri,
            "dataset": params.data.dataset,
            "forgotten_classes": model.forgotten_classes,
        },
        "client": f"one process, {config.concurrency} keep-alive HTTP/1.1 connections (http.client threads) on "
        "127.0.0.1; variants interleaved in rounds",
        **result,
        "in_process": runtimes,
        "ratios": ratios(result["http"], runtimes, config.batch_size),
        "seconds_cap": config.seconds,
        "total_seconds": round(time.monotonic() - started, 1),
    }
    (out / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "serve.md").write_text(markdown(result, config.batch_size) + "\n")
    return result


def http_rounds(
    urls: dict,
    pids: dict,
    name: str,
    params,
    rounds: int,
    single_requests: int,
    batch_requests: int,
    batch_size: int,
    concurrency: int,
    deadline: float,
) -> dict:
    """Every variant at single images and at batch_size, a 1/rounds share of the requests each
    time, in turn; the figures summed over the rounds."""
    from nhle.core.experiment import load_data  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    test = load_data(params.data).test.float_images().numpy()
    rng = np.random.default_rng(0)
    payloads = {"single": (1, single_requests), f"batch_{batch_size}": (batch_size, batch_requests)}
    arrays = {
        p: [test[rng.integers(0, len(test), n)] for _ in range(8 if n > 1 else 64)] for p, (n, _) in payloads.items()
    }
    bodies = {(p, fmt): [request_body(fmt, a) for a in arrays[p]] for p in payloads for *_, fmt in VARIANTS}
    phases = {(label, p): [] for label, *_ in VARIANTS for p in payloads}
    for _label, server, path, fmt in VARIANTS:  # warm-up, not reported
        load_phase(urls[server], path.format(name=name), bodies[("single", fmt)], 20, concurrency, deadline)
    for _ in range(rounds):
        for p, (_n, total) in payloads.items():
            for label, server, path, fmt in VARIANTS:
                share = max(1, total // rounds)
                phases[(label, p)].append(
                    load_phase(
                        urls[server],
                        path.format(name=name),
                        bodies[(p, fmt)],
                        share,
                        concurrency,
                        deadline,
                        pids[server],
                    )
                )
    table = {
        p: {
            label: summary(phases[(label, p)], n, max(1, total // rounds) * rounds, concurrency)
            for label, *_ in VARIANTS
        }
        for p, (n, total) in payloads.items()
    }
    return {**table, "_batches": {p: arrays[p][:8] for p in payloads}}


def ratios(http: dict, runtimes: dict, batch_size: int) -> dict:
    """Each variant's requests/s over mlflow models serve's, and images/s over in-process ONNX
    Runtime's on the same batches."""
    out = {}
    for payload, rows in http.items():
        base = rows[BASELINE]["requests_per_s"]
        ort_rate = runtimes[payload]["ort_images_per_s"]
        out[payload] = {
            label: {
                "over_mlflow": round(row["requests_per_s"] / base, 2) if base else None,
                "share_of_onnxruntime": round(row["images_per_s"] / ort_rate, 3) if ort_rate else None,
            }
            for label, row in rows.items()
        }
    return out


def markdown(result: dict, batch_size: int) -> str:
    machine = result["machine"]
    lines = [
        f"Serving benchmark, measured {result['measured_at']} on {machine['node']} ({machine['processor']}, "
        f"{machine['cpu_count']} CPUs; torch {machine['torch']}, onnxruntime {machine['onnxruntime']}). "
        f"Model: {result['model']['source']}, {result['model']['uri']}, forgotten classes "
        f"{result['model']['forgotten_classes']}. Client: {result['client']}.",
        "",
    ]
    for payload, rows in result["http"].items():
        n = rows[BASELINE]["images_per_request"]
        ort_rate = result["in_process"][payload]["ort_images_per_s"]
        lines += [
            f"**{'single image' if n == 1 else f'batch of {n}'}** (in-process ONNX Runtime on the same "
            f"batches: {ort_rate:,.0f} images/s)",
            "",
            "| variant | requests | requests/s | images/s | p50 ms | p99 ms | errors | x mlflow | share of ORT "
            "| CPU ms/request: server, client |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, row in rows.items():
            ratio = result["ratios"][payload][label]
            lines.append(
                f"| {label} | {row['requests']} | {row['requests_per_s']:,} | {row['images_per_s']:,} | "
                f"{row['p50_ms']} | {row['p99_ms']} | {row['errors']} | {ratio['over_mlflow']} | "
                f"{ratio['share_of_onnxruntime']:.1%} | {row['server_cpu_ms']}, {row['client_cpu_ms']} |"
            )
        lines.append("")
    runtimes = result["in_process"]
    lines += [
        "In process, the same batches (CPU, default threads): "
        + "; ".join(
            f"{p}: ONNX Runtime {r['ort_images_per_s']:,.0f} images/s, PyTorch eager {r['torch_images_per_s']:,.0f} "
            f"(ratio {r['ort_over_torch']})"
            for p, r in runtimes.items()
        )
        + "."
    ]
    if "swap" in result:
        s = result["swap"]
        lines += [
            "",
            f"{len(s['requests'])} forget requests, one after another (retrain_baseline "
            f"{s['retrain_baseline']}; the server was told by {s['server_told_by']}), "
            "min / median / max:",
            "",
            "| time | min | median | max |",
            "|---|---|---|---|",
        ]
        for key, what in (
            ("accepted_to_suppressed_seconds", "accepted -> the server suppresses the class"),
            ("seconds_to_new_version", "`nhle request process` started -> the server answers with the new version"),
            ("process_seconds", "`nhle request process` started -> it ended, the evidence complete"),
        ):
            spread_of = s["seconds"][key]
            lines.append(
                f"| {what} | "
                + " | ".join(f"{spread_of[k]} s" if spread_of else "-" for k in ("min", "median", "max"))
                + " |"
            )
        lines += [""] + [
            f"- request {r['request_id']} (class {r['classes']}): version {r['from_version']} -> {r['to_version']}"
            for r in s["requests"]
        ]
    return "\n".join(lines)


def run(project_dir, params_path, assignments, name: str | None, config: ServeBench) -> int:
    """`nhle bench serve`: the benchmark, its table printed; 1 when a request failed."""
    name_set = (f"registry.model_name={name}",) if name else ()
    result = bench_serve(project_dir, params_path, config, tuple(assignments) + name_set)
    print((Path(config.out) / "serve.md").read_text())
    return 0 if not any(row["errors"] for rows in result["http"].values() for row in rows.values()) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nhle.bench.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--project-dir", default=".", help="the project whose champion is served (else one is trained)")
    parser.add_argument("--params", help="params.yaml (default: PROJECT_DIR/params.yaml)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting of params.yaml (repeatable)",
    )
    add_config_flags(parser, ServeBench)
    args = parser.parse_args(argv)
    return run(args.project_dir, args.params, args.set, None, config_from(ServeBench, args))


if __name__ == "__main__":
    sys.exit(main())
