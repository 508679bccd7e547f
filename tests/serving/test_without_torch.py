"""The serving side needs no torch: `pip install 'nhle[serve]'` names none of the training or
pipeline stack, and the server, run where torch, torchvision, scikit-learn, Prefect and DVC
cannot be imported at all, loads the registry's champion and answers over HTTP."""

import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
from serving_support import Server

from nhle.adapters.processes import free_port, stop_process

REPO = Path(__file__).resolve().parents[2]
TRAINING_STACK = {
    "torch",
    "torchvision",
    "scikit-learn",
    "onnxscript",
    "prefect",
    "prefect-dask",
    "dvc",
    "mlflow",
    "matplotlib",
}
BLOCKER = """
import sys
from pathlib import Path

BLOCKED = {"torch", "torchvision", "sklearn", "prefect", "dvc"}
Path(__file__).with_name("blocker-active").write_text("yes")


class NotInAServingImage:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            with open(Path(__file__).with_name("refused"), "a") as refused:
                refused.write(name + "\\n")
            raise ImportError(f"{name} is not installed in a serving image")
        return None


sys.meta_path.insert(0, NotInAServingImage())
"""


def requirement_names(requirements) -> set[str]:
    return {
        r.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower() for r in requirements
    }


def test_the_serve_extra_installs_nothing_of_the_training_or_pipeline_stack():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    serving = requirement_names(project["dependencies"]) | requirement_names(project["optional-dependencies"]["serve"])
    assert {"fastapi", "uvicorn", "mlflow-skinny", "sqlalchemy", "numpy", "pyyaml"} <= serving
    assert {"onnxruntime", "onnxruntime-gpu"} & serving
    assert not serving & TRAINING_STACK, serving & TRAINING_STACK


def test_the_server_serves_the_champion_where_torch_cannot_be_imported(
    champion_registry, start_server, tmp_path, monkeypatch
):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the server process imports sitecustomize first
    server = start_server(champion_registry.root)
    assert (tmp_path / "blocker-active").read_text() == "yes"
    described = server.http.get("/model").json()
    response = server.http.post("/predict", json={"instances": [[[0.5] * 8] * 8] * 4, "top_k": 10})
    assert response.status_code == 200, response.text
    returned = {row["index"] for p in response.json()["predictions"] for row in p["top_k"]}
    assert returned and not returned & set(described["forgotten_classes"])
    refused = (tmp_path / "refused").read_text().split() if (tmp_path / "refused").exists() else []
    assert not {name.split(".")[0] for name in refused} & {"torch", "torchvision", "sklearn"}, refused


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def nhle_serve(project_dir: Path, log_path: Path):
    """`nhle serve` of the project as a child process, once it answers /readyz."""
    port = free_port()
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("nhle")), "serve", "--port", str(port)],
        env=Server.environment(project_dir),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=project_dir,
    )
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc, f"http://127.0.0.1:{port}"
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(log_path.read_text())
        time.sleep(0.2)


def test_nhle_serve_never_loads_torch_where_it_is_installed(champion_registry, tmp_path):
    """After `nhle serve` loaded, verified and served the champion, no torch library is mapped
    in its process, and its resident memory is under 400 MiB on the embedded model."""
    proc, url = nhle_serve(champion_registry.root, tmp_path / "serve.log")
    try:
        for _ in range(20):
            response = httpx.post(url + "/predict", json={"instances": [[[0.5] * 8] * 8] * 16, "top_k": 3})
            assert response.status_code == 200, response.text
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        torch_libraries = sorted({line.split()[-1] for line in maps.splitlines() if "/torch/" in line})
        resident = resident_mib(proc.pid)
    finally:
        stop_process(proc)
    assert not torch_libraries, torch_libraries[:5]
    assert resident < 400, resident
