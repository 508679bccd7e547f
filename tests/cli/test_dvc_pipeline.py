"""dvc.yaml for real: `dvc repro` runs the chain through the nhle CLI, a second repro does nothing,
and `dvc exp run --temp -S` changes a parameter in an experiment, not in params.yaml. In a temp git repo, with this checkout's dvc.yaml."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def run(args, cwd, env):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_dvc_repro_runs_the_chain_once_and_experiments_change_params(tmp_path):
    """As the README writes it: `.venv/bin/dvc repro` with the venv not on PATH (not activated).
    The checkout's code is there too, because every stage depends on the code it runs."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p).resolve() != Path(bin_dir).resolve())
    env = {**os.environ, "PATH": path, "DVC_NO_ANALYTICS": "1"}
    env.pop("VIRTUAL_ENV", None)
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parents[1])
    (tmp_path / ".gitignore").write_text(".venv\n")
    shutil.copy(REPO / "dvc.yaml", tmp_path)
    shutil.copytree(REPO / "nhle", tmp_path / "nhle", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["epochs"] = 2  # a tiny budget; the chain is what is under test
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    git = ["git", "-c", "user.name=nhle-test", "-c", "user.email=nhle@test.invalid"]
    run(["git", "init", "-q"], tmp_path, env)
    run([f"{bin_dir}/dvc", "init", "-q"], tmp_path, env)
    run([*git, "add", "-A"], tmp_path, env)
    run([*git, "commit", "-qm", "project"], tmp_path, env)

    first = run([f"{bin_dir}/dvc", "repro"], tmp_path, env)
    for stage in ("prepare", "train", "unlearn", "evaluate", "export"):
        assert f"Running stage '{stage}'" in first
    report = json.loads((tmp_path / "models/unlearned/report.json").read_text())
    assert report["forget_classes"] == [int(params["forget"])] and report["n_forget_samples"] == 32
    assert set(report["metrics"]) == {"original", "unlearned", "retrained"}
    assert json.loads((tmp_path / "models/onnx/parity.json").read_text())["passed"] is True
    assert {p.name for p in (tmp_path / "reports/plots").iterdir()} >= {"per_class_accuracy.png"}
    assert all(g["passed"] for g in json.loads((tmp_path / "reports/gates.json").read_text()))

    second = run([f"{bin_dir}/dvc", "repro"], tmp_path, env)
    assert "Running stage" not in second and "up to date" in second
    gates = tmp_path / "nhle" / "core" / "gates.py"
    gates.write_text(gates.read_text() + "\n# a change of the gate code\n")
    third = run([f"{bin_dir}/dvc", "repro"], tmp_path, env)
    assert "Running stage 'evaluate'" in third and "Running stage 'train'" not in third

    run([*git, "add", "-A"], tmp_path, env)
    run([*git, "commit", "-qm", "pipeline outputs"], tmp_path, env)
    # As docs/usage.md writes it: the experiment runs in a temporary copy, so params.yaml (which
    # `nhle run` reads too) and the workspace's outputs stay as they were.
    before = (tmp_path / "params.yaml").read_text()
    run([f"{bin_dir}/dvc", "exp", "run", "--temp", "-S", "unlearn.n_samples=16"], tmp_path, env)
    assert (tmp_path / "params.yaml").read_text() == before
    assert json.loads((tmp_path / "models/unlearned/report.json").read_text())["n_forget_samples"] == 32
    shown = json.loads(run([f"{bin_dir}/dvc", "exp", "show", "--json"], tmp_path, env))
    experiments = [rev for row in shown for exp in row.get("experiments") or [] for rev in exp["revs"]]
    assert [e["data"]["params"]["params.yaml"]["data"]["unlearn"]["n_samples"] for e in experiments] == [16]
