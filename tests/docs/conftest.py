"""Fixtures of the doc tests (test_docs.py): the inputs the docs assume a user has, and the
session's scratch projects (doc_projects.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from doc_inputs import (
    photo_splits,
    resnet50_for_photos,
    torchvision_accuracy,
    train_their_net,
    write_photos,
    write_their_store,
)
from doc_projects import DocProjects, base_environment


@pytest.fixture(scope="session")
def doc_home(tmp_path_factory) -> Path:
    """The blocks' $HOME (nothing is read from or written to the real one): ~/photos lives here,
    and a git identity, as a developer has one (`dvc exp run` commits each experiment and stops
    with "Git user name and email must be configured" without it)."""
    home = tmp_path_factory.mktemp("doc-home")
    (home / ".gitconfig").write_text("[user]\n\tname = Doc Tester\n\temail = doc-tester@example.com\n")
    return home


@pytest.fixture(scope="session")
def doc_photos(doc_home) -> dict[str, str]:
    """~/photos: the ImageFolder of docs/own-model.md (doc_inputs.write_photos)."""
    return {"photos": str(write_photos(doc_home / "photos"))}


@pytest.fixture(scope="session")
def doc_weights(doc_photos, tmp_path_factory) -> dict[str, str]:
    """ResNet-50 weights that read the photos: yours.pth (a bare state_dict) and my_resnet50.pth
    (a checkpoint dict holding it under `state_dict`)."""
    data = photo_splits(Path(doc_photos["photos"]), image_size=32)
    weights = resnet50_for_photos(data)
    accuracy = torchvision_accuracy("resnet50", weights, data)
    assert accuracy >= 0.95, f"the ResNet-50 made for the photos reads only {accuracy:.2%} of their test split"
    files = tmp_path_factory.mktemp("doc-weights")
    torch.save(weights, files / "yours.pth")
    torch.save({"epoch": 90, "state_dict": weights}, files / "my_resnet50.pth")
    return {"yours_pth": str(files / "yours.pth"), "my_resnet50_pth": str(files / "my_resnet50.pth")}


@pytest.fixture(scope="session")
def doc_their_store(doc_photos, tmp_path_factory, mlflow_template) -> dict[str, str]:
    """Another team's MLflow store with 'their-model' versions 1 (pickled), 2 (default format,
    input example of two images) and 3 (default format, input example of one image)."""
    data = photo_splits(Path(doc_photos["photos"]), image_size=32)
    folder = tmp_path_factory.mktemp("their-mlflow")
    return {"their_store_uri": write_their_store(folder, mlflow_template, data, train_their_net(data, steps=100))}


@pytest.fixture(scope="session")
def doc_projects(tmp_path_factory, doc_home):
    base = tmp_path_factory.mktemp("doc-projects")
    prefect_home = tmp_path_factory.mktemp("doc-prefect-home")
    dvc_site = tmp_path_factory.mktemp("doc-dvc-site")
    projects = DocProjects(base, base_environment(doc_home, prefect_home, dvc_site))
    try:
        yield projects
    finally:
        projects.stop_all()
