"""The pipeline's steps (pipeline) and the forget-request loop (requests): plain functions over
nhle.core and nhle.adapters. Whatever runs them as steps (Prefect tasks in flows/, or a plain
call) is passed in as `run(step, *args)`, as nhle.bench.unlearning.run_grid takes `submit`."""
