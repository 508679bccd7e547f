"""Dataset versioning with DVC, all in temp folders: a temp git repo as the data repo and a temp
folder as the local DVC remote. Each dvc command costs about 1 s, so the versions are made once."""

import json
import re
import shutil
import subprocess
import zipfile

import numpy as np
import pytest
import torch

import nhle.adapters.versioning as versioning
from nhle.adapters.versioning import (
    DataVersion,
    dvc_dir_md5,
    dvc_executable,
    ensure_data_repo,
    open_dataset_version,
    version_dataset,
)
from nhle.core.data import ImageSet, Splits, drop_classes, load_splits, save_splits


def commit_count(repo) -> int:
    out = subprocess.run(["git", "rev-list", "--count", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.fixture(scope="module")
def versions(digits, tmp_path_factory):
    """v1: digits; v1_again: the same bytes again; v2: digits without class 3 (same path)."""
    base = tmp_path_factory.mktemp("versioning")
    repo, remote = base / "data-repo", base / "remote"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)  # a relative remote resolves against the current directory
        v1 = version_dataset(digits, repo, "remote")
    commits_after_v1 = commit_count(repo)
    v1_again = version_dataset(digits, repo, remote)
    commits_after_again = commit_count(repo)
    v2 = version_dataset(drop_classes(digits, [3]), repo, remote, message="digits without 3")
    return {
        "repo": repo,
        "remote": remote,
        "v1": v1,
        "v1_again": v1_again,
        "v2": v2,
        "commits": (commits_after_v1, commits_after_again, commit_count(repo)),
    }


def test_version_has_dir_md5_and_git_rev(versions, digits):
    v1 = versions["v1"]
    assert isinstance(v1, DataVersion)
    assert re.fullmatch(r"[0-9a-f]{32}\.dir", v1.md5)
    assert re.fullmatch(r"[0-9a-f]{40}", v1.git_rev)
    assert v1.path == "datasets/digits"
    assert v1.repo == str(versions["repo"].resolve())
    assert v1.remote == str(versions["remote"].resolve())  # relative url made absolute
    assert v1.as_tags() == {"data.path": v1.path, "data.md5": v1.md5, "data.git_rev": v1.git_rev, "data.repo": v1.repo}
    # DVC's hash is the hash of the bytes save_splits writes
    assert dvc_dir_md5(save_splits(digits, versions["repo"].parent / "copy")) == v1.md5
    # the remote holds the data, the repo's git history holds the .dvc file, and nothing is left over
    assert any(p.is_file() for p in versions["remote"].rglob("*"))
    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=versions["repo"], capture_output=True, text=True, check=True
    )
    assert status.stdout == ""


def test_same_bytes_give_same_version_and_no_commit(versions):
    assert versions["v1_again"] == versions["v1"]
    after_v1, after_again, _ = versions["commits"]
    assert after_again == after_v1 == 2  # DVC scaffolding, then the dataset


def test_changed_data_gives_new_version(versions):
    v1, v2 = versions["v1"], versions["v2"]
    assert v2.path == v1.path
    assert v2.md5 != v1.md5 and v2.git_rev != v1.git_rev
    assert versions["commits"][2] == versions["commits"][1] + 1


def test_a_version_in_the_repos_cache_is_read_without_starting_dvc_and_checked(digits, tmp_path, monkeypatch):
    """The repo's DVC cache holds the version: its files are copied out of it (no dvc process,
    whose start costs a Python start), and their md5 is still checked."""
    version = version_dataset(digits, tmp_path / "repo", tmp_path / "remote")
    monkeypatch.setattr(versioning, "dvc_executable", lambda: str(tmp_path / "no-dvc-here"))
    assert open_dataset_version(version).fingerprint() == digits.fingerprint()
    cache = tmp_path / "repo" / ".dvc" / "cache" / "files" / "md5"
    listing = json.loads((cache / version.md5[:2] / version.md5[2:]).read_text())
    train = next(e["md5"] for e in listing if e["relpath"] == "train.npz")
    cached = cache / train[:2] / train[2:]
    cached.chmod(0o644)
    cached.write_bytes(cached.read_bytes()[:-1] + b"x")  # a cache file changed behind DVC's back
    with pytest.raises(RuntimeError, match="hashing to"):
        open_dataset_version(version)


def test_old_version_comes_back_from_remote_after_cache_is_cleared(versions, digits):
    repo = versions["repo"]
    shutil.rmtree(repo / ".dvc" / "cache")
    # the workspace now holds v2, the cache nothing: v1's bytes can only come from the remote
    old = open_dataset_version(versions["v1"])
    assert old.fingerprint() == digits.fingerprint()
    assert old.name == digits.name and old.class_names == digits.class_names
    assert 3 not in load_splits(repo / "datasets" / "digits").train.labels.tolist()


def test_open_rejects_a_version_whose_md5_is_not_at_its_rev(versions):
    v1, v2 = versions["v1"], versions["v2"]
    mixed = DataVersion(v1.path, v2.md5, v1.git_rev, v1.repo, v1.remote)
    with pytest.raises(RuntimeError, match="records"):
        open_dataset_version(mixed)


def test_ensure_data_repo_is_idempotent(versions):
    repo = versions["repo"]
    before = commit_count(repo)
    assert ensure_data_repo(repo, versions["remote"]) == repo.resolve()
    assert commit_count(repo) == before


def test_a_data_repo_moved_to_another_remote_gets_it_as_default(tmp_path):
    """The remote is set only when .dvc/config does not name it already (each dvc call costs a
    Python start), so a changed remote must still be written, and committed."""
    repo = ensure_data_repo(tmp_path / "repo", tmp_path / "first")
    before = commit_count(repo)
    ensure_data_repo(repo, tmp_path / "second")
    listed = subprocess.run([dvc_executable(), "remote", "list"], cwd=repo, capture_output=True, text=True).stdout
    assert str(tmp_path / "second") in listed and str(tmp_path / "first") not in listed
    assert commit_count(repo) == before + 1


def test_save_load_round_trip_and_deterministic_bytes(digits, tmp_path):
    first = save_splits(digits, tmp_path / "a")
    second = save_splits(digits, tmp_path / "b")
    for name in ("train.npz", "test.npz", "classes.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    with zipfile.ZipFile(first / "train.npz") as archive:
        assert {i.date_time for i in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    with np.load(first / "train.npz") as arrays:  # a plain npz that numpy reads
        assert arrays["images"].dtype == np.float32 and arrays["labels"].dtype == np.int64
    loaded = load_splits(first)
    assert loaded.fingerprint() == digits.fingerprint()
    assert loaded.train.images.dtype == digits.train.images.dtype
    assert not list(first.glob(".*.tmp"))  # atomic writes leave no temp files


def test_round_trip_keeps_uint8(tmp_path):
    images = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8)
    part = ImageSet(images, torch.tensor([0, 1, 0, 1, 0, 1]))
    splits = Splits("tiny", part, part.subset([0, 1]), ["cat", "dog"])
    loaded = load_splits(save_splits(splits, tmp_path))
    assert loaded.train.images.dtype == torch.uint8
    assert loaded.fingerprint() == splits.fingerprint()


def test_load_splits_names_the_missing_file(digits, tmp_path):
    folder = save_splits(digits, tmp_path / "d")
    (folder / "test.npz").unlink()
    with pytest.raises(FileNotFoundError, match="test.npz"):
        load_splits(folder)


def test_bad_remote_raises_runtime_error_naming_the_command(digits, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the remote's parent folder should be")
    tiny = Splits("tiny", digits.train.subset(range(8)), digits.test.subset(range(4)), digits.class_names)
    with pytest.raises(RuntimeError, match="dvc.* push") as err:
        version_dataset(tiny, tmp_path / "repo", blocker / "remote")
    assert str(blocker) in str(err.value) or "not-a-folder" in str(err.value)


def test_dvc_gc_purges_deleted_samples_from_cache_and_remote(versions, digits):
    """The README's purge after a forget request: `dvc gc --workspace --cloud` leaves only what
    the current version (without class 3) uses; the old version cannot be fetched any more."""
    repo, remote = versions["repo"], versions["remote"]
    remote_files = lambda: {p.name for p in remote.rglob("*") if p.is_file()}  # noqa: E731
    before = remote_files()
    subprocess.run(
        [dvc_executable(), "gc", "--workspace", "--cloud", "--force"], cwd=repo, check=True, capture_output=True
    )
    assert remote_files() < before
    with pytest.raises(RuntimeError, match="dvc get"):
        open_dataset_version(versions["v1"])
    current = open_dataset_version(versions["v2"])
    assert 3 not in current.train.labels.tolist() and len(current.train) > 0
