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
