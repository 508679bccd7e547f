import os
import shutil
from pathlib import Path

import pytest
import yaml

from nhle.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def new_project(tmp_path_factory, prefect_harness, mlflow_template):
    """Make a project folder with `params`, run `nhle run` in it (base model, then the forget
    flow for params' `forget` class) and point MLflow at it; returns the folder."""
    def make(name: str, params: dict) -> Path:
        from nhle.config import load_params
        from nhle.tracking import configure

        os.environ.pop("MLFLOW_TRACKING_URI", None)
        root = tmp_path_factory.mktemp(name)
        shutil.copy(mlflow_template, root / "mlflow.db")
        (root / "flows").symlink_to(REPO / "flows")
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        assert main(["run", "--params", str(root / "params.yaml"), "--project-dir", str(root)]) == 0
        configure(load_params(root / "params.yaml"), root)
        return root

    return make
