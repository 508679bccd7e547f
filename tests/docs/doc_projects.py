"""Scratch projects for the doc tests: each is a fresh copy of the checkout (its tracked and
untracked-but-not-ignored files, as they are in the working tree) made a git repository of its
own, with `.venv` a link to this checkout's environment, so that `.venv/bin/nhle` in a doc block
is this repository's code. Blocks run there with bash, in a home folder of their own (`~/photos`
lives there), with telemetry off and Prefect's home in a temp folder.

    project = doc_projects.get(spec, inputs)   # made on first use: copy, params, git, setup commands
    outcome = project.run(script_text, label, env_extra, timeout)
    project.stop_background(doc)          # the servers a doc's blocks left running
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from doc_blocks import PRELUDE, REPO

from nhle.cli.commands import QUIET_DEFAULTS

# What the CLI sets where the user has not (no telemetry, a start-up timeout for the first
# temporary Prefect server on 2 cores), and Prefect's rich console output unwrapped, so that a
# readiness line can be found.
QUIET = {**QUIET_DEFAULTS, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "COLUMNS": "200"}
# What a developer's shell or CI may carry that would make a block use something else than the
# scratch project's own stores and settings.
DROPPED = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "PREFECT_API_URL",
    "PREFECT_API_KEY",
    "VIRTUAL_ENV",
    "PYTHONPATH",
    "DASK_ADDRESS",
    "PYTEST_CURRENT_TEST",
    "PYTEST_ADDOPTS",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkout_files() -> list[str]:
    """The working tree's files a fresh clone would have (plus untracked files that git does not
    ignore: others' work in progress is tested as it stands)."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    return [f for f in listed if f and (REPO / f).is_file()]


def base_environment(home: Path, prefect_home: Path, dvc_site: Path) -> dict[str, str]:
    """os.environ without this checkout's venv on PATH (a block that needs an activated venv says
    so in its case), without settings that point elsewhere, with the quiet settings."""
    venv_bins = {str((REPO / ".venv" / "bin").resolve()), str(Path(sys.prefix) / "bin"), str(REPO / ".venv" / "bin")}
    path = [
        p
        for p in os.environ.get("PATH", "").split(os.pathsep)
        if p and str(Path(p).resolve()) not in venv_bins and p not in venv_bins
    ]
    env = {k: v for k, v in os.environ.items() if k not in DROPPED and not k.startswith("NHLE_")}
    env.update(
        QUIET,
        PATH=os.pathsep.join(path),
        HOME=str(home),
        PREFECT_HOME=str(prefect_home),
        DVC_SITE_CACHE_DIR=str(dvc_site),
        GIT_CONFIG_NOSYSTEM="1",
    )
    return env


@dataclass
class Outcome:
    returncode: int | None  # None: timed out
    output: str
    script: Path
    seconds: float

    def tail(self, n: int = 6000) -> str:
        return self.output[-n:]


@dataclass
class Project:
    """One scratch project: a folder laid out like a fresh clone, and what ran in it."""

    key: str
    root: Path
    state: Path
    env: dict[str, str]
    values: dict[str, str]
    done: dict[str, Outcome] = field(default_factory=dict)  # item id -> outcome, in run order
    setup_error: str | None = None

    def run(
        self,
        text: str,
        label: str,
        env_extra: dict[str, str] | None = None,
        timeout: float = 600,
        doc_state: str = "setup",
    ) -> Outcome:
        """Run `text` with bash in the project (PRELUDE first). Background servers it starts are
        recorded under the doc's state folder (see stop_background)."""
        slug = "".join(c if c.isalnum() else "-" for c in label)[:90]
        state = self.state / doc_state
        state.mkdir(parents=True, exist_ok=True)
        script = state / f"{slug}.sh"
        script.write_text(PRELUDE + "\n# --- the block ---\n" + text + "\n")
        log = state / f"{slug}.log"
        env = {**self.env, **(env_extra or {}), "DOCTEST_STATE": str(state)}
        started = time.monotonic()
        with open(log, "wb") as out:
            process = subprocess.Popen(
                ["bash", str(script)],
                cwd=self.root,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                code = process.wait(timeout)
            except subprocess.TimeoutExpired:
                stop_group(process.pid)
                process.wait()
                code = None
        return Outcome(code, log.read_text(errors="replace"), script, time.monotonic() - started)

    def stop_background(self, doc_state: str | None = None) -> list[str]:
        """Stop the background servers of one doc's blocks (or of all), each with what it started
        (its process group, from `set -m`); returns what was stopped."""
        stopped = []
        folders = [self.state / doc_state] if doc_state else [p for p in self.state.iterdir() if p.is_dir()]
        for folder in folders:
            servers = folder / "servers"
            if not servers.exists():
                continue
            for line in servers.read_text().split("\n"):
                fields = line.split()
                if len(fields) == 3 and leader_start_time(int(fields[0])) == fields[2]:
                    if stop_group(int(fields[0])):
                        stopped.append(line)
            servers.unlink()
        return stopped


def leader_start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (the start time): tells the process group a block started from
    a later one that got the same number."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def stop_group(pgid: int, grace: float = 15.0) -> bool:
    """SIGTERM to a process group this test started, SIGKILL if it is still there after `grace` s."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return True
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return True


@dataclass(frozen=True)
class ProjectSpec:
    """How a doc's scratch project starts. `params`: --set assignments written into its
    params.yaml by `nhle params` (each with its reason in the test's table); `setup`: what the
    doc says has happened before its first block (bash, run after the params and git steps);
    `needs`: the input fixtures (doc_weights, ...) whose values the project's blocks use;
    `files`: (name in the project root, value key) linked to an input file."""

    key: str
    params: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    files: tuple[tuple[str, str], ...] = ()


class DocProjects:
    """The scratch projects of one session, made on first use."""

    def __init__(self, base: Path, base_env: dict[str, str]):
        self.base, self.base_env = base, base_env
        self.projects: dict[str, Project] = {}

    def get(self, spec: ProjectSpec, inputs: dict[str, str]) -> Project:
        if spec.key not in self.projects:
            self.projects[spec.key] = self.make(spec, inputs)
        project = self.projects[spec.key]
        if project.setup_error:
            pytest.fail(f"the scratch project {spec.key!r} could not be set up:\n{project.setup_error}", pytrace=False)
        return project

    def make(self, spec: ProjectSpec, inputs: dict[str, str]) -> Project:
        root = self.base / spec.key / "project"
        state = self.base / spec.key / "state"
        state.mkdir(parents=True)
        for name in checkout_files():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)  # mtimes kept: make must see .venv's install as current
        (root / ".venv").symlink_to((REPO / ".venv").resolve())
        for name, key in spec.files:
            (root / name).symlink_to(inputs[key])
        values = {**inputs, "serve_port": str(free_port()), "ui_port": str(free_port()), "root": str(root)}
        project = Project(spec.key, root, state, dict(self.base_env), values)
        steps = []
        if spec.params:
            # the scratch project's params.yaml, written by nhle itself (its comments kept)
            steps.append(
                ".venv/bin/nhle params --params params.yaml "
                + " ".join(f"--set {a}" for a in spec.params)
                + " --write params.yaml"
            )
        steps.append(
            "git init -q && git add -A && git -c user.name=doctest -c user.email=doctest@localhost "
            "commit -q -m 'scratch clone'"
        )  # a clone is a git repository (dvc exp needs one)
        # `make` with a stale .venv would pip-install this scratch copy into the shared environment
        steps.append(
            "if make -n run test | grep -n 'pip install'; then echo 'make would reinstall .venv here "
            "(is pyproject.toml newer than .venv/.installed?)' >&2; exit 1; fi"
        )
        steps += list(spec.setup)
        for i, step in enumerate(steps):
            outcome = project.run(step, f"setup-{i}", timeout=900)
            if outcome.returncode != 0:
                how = "timed out" if outcome.returncode is None else f"exit {outcome.returncode}"
                project.setup_error = (
                    f"setup step failed ({how}, {outcome.seconds:.0f} s): {step}\n"
                    f"script: {outcome.script}\n{outcome.tail()}"
                )
                break
        project.stop_background("setup")
        return project

    def stop_all(self) -> None:
        for project in self.projects.values():
            project.stop_background()
