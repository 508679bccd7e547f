"""nhle's side of the systems it works with: MLflow (tracking, registry, models), DVC (dataset
versions), SQLAlchemy (the forget-request ledger), Prefect's API server process, OS processes.
They import nhle.core; nothing in nhle.core imports them."""
