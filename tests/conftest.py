import os
import tempfile

# Before any library import: no telemetry, no writes to the home directory.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="nhle-prefect-home-"))
os.environ.setdefault("DVC_SITE_CACHE_DIR", tempfile.mkdtemp(prefix="nhle-dvc-site-"))

import pytest  # noqa: E402

from nhle.config import TrainConfig  # noqa: E402
from nhle.data import load_digits  # noqa: E402
from nhle.training import train_model  # noqa: E402


@pytest.fixture(scope="session")
def digits():
    return load_digits(seed=0)


@pytest.fixture(scope="session")
def trained(digits):
    """A small CNN trained on digits for a few epochs (about 2 s)."""
    model, _ = train_model(digits, TrainConfig(epochs=6), seed=0, progress=False)
    return model


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (its start-up costs ~20 s on 2 cores)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory):
    """A migrated, empty MLflow SQLite store; copy it per project instead of migrating again."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def dead_owner() -> str:
    """A ledger owner string naming a process of this host that has exited."""
    import subprocess
    import sys

    from nhle.ledger import new_owner

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return new_owner().rsplit(":", 2)[0] + f":{process.pid}:dead"
