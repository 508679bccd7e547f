"""Dataset versions with DVC: the exact bytes a model was trained on, retrievable later.

    from nhle.core.data import load_digits
    from nhle.adapters.versioning import ensure_data_repo, version_dataset, open_dataset_version

    ensure_data_repo("data-repo", remote_url="/mnt/dvc-remote")    # git + dvc + default remote
    version = version_dataset(load_digits(seed=0), "data-repo", "/mnt/dvc-remote")
    version.md5, version.git_rev       # 'a1b2...dir', the commit that holds datasets/digits.dvc
    mlflow.set_tags(version.as_tags())  # data.path, data.md5, data.git_rev, data.repo
    ...
    splits = open_dataset_version(version)  # the same bytes, even after the DVC cache is cleared

A data repo is a git repository with DVC in it: `version_dataset` writes the splits with
`nhle.core.data.save_splits` to `datasets/<name>/` (train.npz, test.npz, classes.json), runs `dvc add`,
commits the `.dvc` file when it changed and `dvc push`es the data to the remote, so every version
stays retrievable from the remote by its git revision. Versioning the same bytes twice returns the
same version and makes no commit.

The `git` and `dvc` command lines run as subprocesses (the `dvc` beside this Python first, else the
one on PATH), exactly as a user would type them, with DVC_NO_ANALYTICS=1; DVC_SITE_CACHE_DIR is
passed through. A failed command raises RuntimeError with the command and its stderr.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from nhle.core.data import Splits, load_splits, save_splits

DATASETS_DIR = "datasets"
SPLIT_FILES = ("train.npz", "test.npz", "classes.json")


@dataclass(frozen=True)
class DataVersion:
    """One version of a dataset folder in a DVC data repo."""

    path: str  # the folder, relative to the repo, e.g. 'datasets/digits'
    md5: str  # DVC's hash of the folder, from its .dvc file, e.g. '3f...e1.dir'
    git_rev: str  # the commit that holds that .dvc file
    repo: str  # absolute path of the data repo
    remote: str  # the DVC remote the data was pushed to

    def as_tags(self, prefix: str = "data.") -> dict[str, str]:
        return {
            f"{prefix}path": self.path,
            f"{prefix}md5": self.md5,
            f"{prefix}git_rev": self.git_rev,
            f"{prefix}repo": self.repo,
        }

    @classmethod
    def from_tags(cls, tags: dict, remote: str, prefix: str = "data.") -> DataVersion | None:
        """The version as_tags(prefix) wrote, or None when the tags do not hold one."""
        try:
            return cls(
                tags[f"{prefix}path"], tags[f"{prefix}md5"], tags[f"{prefix}git_rev"], tags[f"{prefix}repo"], remote
            )
        except KeyError:
            return None


def dvc_executable() -> str:
    """The dvc installed beside this Python, else 'dvc' from PATH."""
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.is_file() else "dvc"


def _env() -> dict[str, str]:
    env = dict(os.environ)  # passes DVC_SITE_CACHE_DIR through when it is set
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def _run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True)
    except FileNotFoundError as err:
        raise RuntimeError(f"`{' '.join(args)}` could not start: {err}") from err
    if check and result.returncode != 0:
        output = result.stderr.strip() or result.stdout.strip() or "(no output)"
        raise RuntimeError(f"`{' '.join(args)}` failed with exit code {result.returncode} in {cwd}:\n{output}")
    return result


def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["git", *args], repo, check=check)


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return _run([dvc_executable(), *args], repo)


def _resolve_remote(remote_url: str | Path) -> str:
    """A path (relative ones against the current directory) becomes absolute; URLs stay."""
    text = str(remote_url)
    if "://" in text:
        return text
    return str(Path(text).expanduser().resolve())


def _commit(repo: Path, paths: list[str], message: str) -> bool:
    """git add + commit only `paths`, if any of them changed. True when a commit was made."""
    _git(repo, "add", "--", *paths)
    if _git(repo, "diff", "--cached", "--quiet", "--", *paths, check=False).returncode == 0:
        return False
    _git(repo, "commit", "-q", "-m", message, "--", *paths)
    return True


def _default_remote_is(repo: Path, name: str, url: str) -> bool:
    """Whether the repo's .dvc/config already makes `name` at `url` the default remote (read as
    `dvc remote add -d` writes it; anything else reads as no, and the command sets it)."""
    config = configparser.ConfigParser()
    try:
        config.read(repo / ".dvc" / "config")
        return (
            config.get("core", "remote", fallback=None) == name
            and config.get(f"'remote \"{name}\"'", "url", fallback=None) == url
        )
    except configparser.Error:
        return False


def ensure_data_repo(repo_dir: str | Path, remote_url: str | Path, remote_name: str = "local") -> Path:
    """Make repo_dir a git repo with DVC initialised and remote_url as the default remote.

    Idempotent: a second call changes nothing (and commits nothing). Returns the absolute path."""
    repo = Path(repo_dir).expanduser().resolve()
    repo.mkdir(parents=True, exist_ok=True)
    if not (repo / ".git").exists():
        _git(repo, "init", "-q")
    for key, value in (("user.name", "nhle"), ("user.email", "nhle@localhost")):
        if _git(repo, "config", key, check=False).returncode != 0:  # none set anywhere: CI machines
            _git(repo, "config", "--local", key, value)
    if not (repo / ".dvc").is_dir():
        _dvc(repo, "init")
    if not _default_remote_is(repo, remote_name, _resolve_remote(remote_url)):  # each dvc call starts Python
        _dvc(repo, "remote", "add", "-d", "-f", remote_name, _resolve_remote(remote_url))
    scaffolding = [p for p in (".dvc/config", ".dvc/.gitignore", ".dvcignore") if (repo / p).exists()]
    _commit(repo, scaffolding, "Initialise DVC data repo")
    return repo


def version_dataset(
    splits: Splits,
    repo_dir: str | Path,
    remote_url: str | Path,
    dataset_path: str | Path | None = None,
    message: str | None = None,
) -> DataVersion:
    """Save splits into the data repo, `dvc add` + commit + `dvc push` them; their DataVersion.

    dataset_path (relative to the repo, or absolute inside it) defaults to datasets/<name>.
    The same bytes twice give the same version and no new commit."""
    remote = _resolve_remote(remote_url)
    repo = ensure_data_repo(repo_dir, remote)
    folder = Path(dataset_path) if dataset_path is not None else Path(DATASETS_DIR) / splits.name
    folder = (repo / folder).resolve() if not folder.is_absolute() else folder.resolve()
    try:
        rel = folder.relative_to(repo)
    except ValueError:
        raise ValueError(f"dataset path {folder} is outside the data repo {repo}") from None
    if rel == Path("."):
        raise ValueError("dataset path must be a folder inside the data repo, not the repo itself")
    rel_posix = rel.as_posix()

    save_splits(splits, folder)
    _dvc(repo, "add", rel_posix)
    dvc_file = f"{rel_posix}.dvc"
    gitignore = (rel.parent / ".gitignore").as_posix()
    tracked = [dvc_file] + ([gitignore] if (repo / gitignore).exists() else [])
    _commit(repo, tracked, message or f"Version dataset {splits.name} at {rel_posix}")
    _dvc(repo, "push", dvc_file)  # push now: `dvc push` only sees the current workspace later

    md5 = _dvc_file_md5((repo / dvc_file).read_text(), dvc_file)
    rev = _git(repo, "log", "-1", "--format=%H", "--", dvc_file).stdout.strip()
    return DataVersion(path=rel_posix, md5=md5, git_rev=rev, repo=str(repo), remote=remote)


def _dvc_file_md5(text: str, where: str) -> str:
    outs = (yaml.safe_load(text) or {}).get("outs") or []
    if len(outs) != 1 or "md5" not in outs[0]:
        raise RuntimeError(f"{where} does not hold exactly one output with an md5")
    return str(outs[0]["md5"])


def dvc_dir_md5(folder: str | Path) -> str:
    """DVC's hash of a folder ('<md5>.dir'): md5 of the JSON list of its files' md5 and path.

    Lets a reader check that the bytes it got are the version it asked for."""
    folder = Path(folder)
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        entries.append((rel.parts, {"md5": hashlib.md5(path.read_bytes()).hexdigest(), "relpath": rel.as_posix()}))
    listing = [entry for _, entry in sorted(entries, key=lambda e: e[0])]
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"


def _copy_from_cache(repo: Path, dir_md5: str, out: Path) -> bool:
    """Copy the folder `dir_md5` names out of the repo's own DVC cache (DVC 3's layout,
    .dvc/cache/files/md5/ab/cdef...), without starting dvc; False when any of it is not there
    (a cache elsewhere, or purged), for `dvc get` to fetch. The caller checks the bytes' md5."""
    cache = repo / ".dvc" / "cache" / "files" / "md5"

    def cached(md5: str) -> Path:
        return cache / md5[:2] / md5[2:]

    try:
        listing = json.loads(cached(dir_md5).read_text())
        sources = [(cached(entry["md5"]), entry["relpath"]) for entry in listing]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not all(source.is_file() for source, _ in sources):
        return False
    for source, relpath in sources:
        target = out / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return True


def open_dataset_version(version: DataVersion) -> Splits:
    """The exact Splits of that version: `dvc get` from the repo at its git rev.

    Read from the repo's DVC cache when it holds the version; data missing from it comes from
    the remote recorded in that revision's DVC config (`dvc get`). Raises RuntimeError if the
    bytes do not hash to version.md5."""
    repo = Path(version.repo)
    if not re.fullmatch(r"[0-9a-f]{4,40}", version.git_rev):
        raise ValueError(f"not a git revision: {version.git_rev!r}")
    recorded = _git(repo, "show", f"{version.git_rev}:{version.path}.dvc").stdout
    recorded_md5 = _dvc_file_md5(recorded, f"{version.path}.dvc at {version.git_rev}")
    if recorded_md5 != version.md5:
        raise RuntimeError(
            f"{version.path}.dvc at {version.git_rev} records {recorded_md5}, not the version's {version.md5}"
        )
    with tempfile.TemporaryDirectory(prefix="nhle-data-") as tmp:
        out = Path(tmp) / "data"
        if not _copy_from_cache(repo, version.md5, out):
            shutil.rmtree(out, ignore_errors=True)
            _run(
                [dvc_executable(), "get", str(repo), version.path, "--rev", version.git_rev, "-o", str(out)],
                cwd=Path(tmp),
            )
        got = dvc_dir_md5(out)
        if got != version.md5:
            raise RuntimeError(
                f"dvc get of {version.path}@{version.git_rev} gave data hashing to {got}, not {version.md5}"
            )
        return load_splits(out)


__all__ = [
    "DataVersion",
    "dvc_executable",
    "dvc_dir_md5",
    "ensure_data_repo",
    "open_dataset_version",
    "version_dataset",
]
