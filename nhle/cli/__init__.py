"""`nhle ...`: the command line (commands), its forget-request commands (requests) and the
commands that run flows and print what happened (jobs). `python -m nhle.cli` is `nhle`."""

from nhle.cli.commands import main

__all__ = ["main"]
