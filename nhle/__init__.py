"""nhle: make a trained image classifier forget whole classes, and prove it.

The package is layered; each folder imports only from the folders listed before it:

    nhle/core/           the method and its measurements: data, models, training, NHLE and
                         masking, metrics, ONNX export, plots, gates, audit, the typed config
                         and the command-line flags made from it
                         (torch, torchvision, numpy, scikit-learn, onnx, onnxruntime only)
    nhle/adapters/       the outside systems: MLflow (tracking, registry), DVC (data versions),
                         the SQL request ledger and the record of deletions, signatures,
                         Prefect's server process, the running servers, OS processes
    nhle/orchestration/  the pipeline's steps and the forget-request loop, as plain functions
                         that take the engine running each step as an argument
    nhle/bench/          `nhle bench ...`: benchmarks that write their results to files
    nhle/cli/            `nhle ...`: the command line

Beside the package: flows/ (installed as nhle_flows: the Prefect flows, decorators over
nhle.orchestration) and serving/ (installed as nhle_serving: the ONNX Runtime server, which
imports nhle.core.config, nhle.core.gates, nhle.core.outputs, and the ledger, the record of
deletions and the signatures of nhle.adapters, never torch). No two modules import each other. tests/test_layers.py
holds these rules.
"""
