import os
import tempfile

# Before any library import: no telemetry, no writes to the home directory.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="nhle-prefect-home-"))
os.environ.setdefault("DVC_SITE_CACHE_DIR", tempfile.mkdtemp(prefix="nhle-dvc-site-"))
# Under pytest-xdist (`make test` runs a worker per core) each worker, and every process it
# starts, computes on one thread, so that the workers do not fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for threads in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(threads, "1")

import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest  # noqa: E402
from mlflow import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from nhle.adapters.ledger import new_owner
from nhle.core.config import TrainConfig  # noqa: E402
from nhle.core.data import load_digits  # noqa: E402
from nhle.core.training import train_model  # noqa: E402


@pytest.fixture(scope="session")
def digits():
    return load_digits(seed=0)


@pytest.fixture(scope="session")
def trained(digits):
    """A small CNN trained on digits for a few epochs (about 2 s)."""
    model, _ = train_model(digits, TrainConfig(epochs=6), seed=0, progress=False)
    return model


@pytest.fixture(autouse=True)
def no_tracking_uri_left_behind():
    """A test that sets MLFLOW_TRACKING_URI itself (mlflow.set_tracking_uri does) must not send
    the next test's project to its store (`configure` leaves the environment as it found it)."""
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("MLFLOW_REGISTRY_URI", None)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (its start-up costs ~20 s on 2 cores)."""
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory):
    """A migrated, empty MLflow SQLite store; copy it per project instead of migrating again."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def dead_owner() -> str:
    """A ledger owner string naming a process of this host that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return new_owner().rsplit(":", 2)[0] + f":{process.pid}:dead"


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server on loopback in a temp folder (skipped where its binaries are
    missing). Run as the `postgres` user when the tests run as root, as PostgreSQL requires."""
    pytest.importorskip("psycopg")
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if not (initdb and postgres):
        pytest.skip("PostgreSQL server binaries (initdb, postgres) are not on this machine")
    user = "postgres" if os.geteuid() == 0 else None  # PostgreSQL refuses to run as root
    if user:
        try:
            pwd.getpwnam(user)
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run PostgreSQL as")
    folder = Path(tempfile.mkdtemp(prefix="nhle-postgres-"))  # pytest's tmp dirs are closed to other users
    data = folder / "data"
    if user:
        shutil.chown(folder, user)
        os.chmod(folder, 0o755)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    made = subprocess.run(
        [initdb, "-D", str(data), "-U", "nhle", "--auth=trust", "--no-sync"], user=user, capture_output=True, text=True
    )
    if made.returncode != 0:  # the machine cannot host a server (e.g. no postgres user): not nhle's failure
        pytest.skip(f"initdb could not create a PostgreSQL cluster here: {made.stderr.strip()[-500:]}")
    server = subprocess.Popen(
        [postgres, "-D", str(data), "-p", str(port), "-h", "127.0.0.1", "-k", str(folder), "-c", "fsync=off"],
        user=user,
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "server.log", "wb"),
    )  # a pipe nobody reads could fill up

    deadline = time.monotonic() + 60
    while True:
        try:
            psycopg.connect(f"host=127.0.0.1 port={port} user=nhle dbname=postgres").close()
            break
        except psycopg.OperationalError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.skip(f"PostgreSQL did not start here: {(folder / 'server.log').read_text()[-500:]}")
            time.sleep(0.3)
    yield port
    server.send_signal(signal.SIGINT)  # fast shutdown: pooled ledger connections may still be open
    server.wait(timeout=30)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_database(postgres_server, request):
    """A new, empty database on the test PostgreSQL server; its SQLAlchemy URL."""
    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[-50:]
    with psycopg.connect(f"host=127.0.0.1 port={postgres_server} user=nhle dbname=postgres", autocommit=True) as db:
        db.execute(f"DROP DATABASE IF EXISTS {name}")
        db.execute(f"CREATE DATABASE {name}")
    return f"postgresql+psycopg://nhle@127.0.0.1:{postgres_server}/{name}"
