"""`nhle ...`: the command line (main), its forget-request commands (requests) and the jobs that
run the flows and print what happened (jobs)."""
from nhle.cli.main import main

__all__ = ["main"]
