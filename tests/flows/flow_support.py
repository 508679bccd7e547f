"""What the flow tests share: the argv of `nhle` run as a child process of a project."""

import sys
from pathlib import Path


def nhle_argv(project: Path, *args: str, params: str = "params.yaml") -> list[str]:
    """`nhle ARGS --params PROJECT/PARAMS --project-dir PROJECT` as a child process (python -m)."""
    return [
        sys.executable,
        "-m",
        "nhle.cli.commands",
        *args,
        "--params",
        str(project / params),
        "--project-dir",
        str(project),
    ]
