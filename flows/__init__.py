"""nhle's Prefect flows (installed as nhle_flows): pipeline (train_base, import, forget,
process-forget-requests) and bench_grid (the benchmark grid on Dask). Each task is a call into
nhle.orchestration."""
