"""The `nhle` command. Settings come from params.yaml (--params); a flag, or --set section.key=value,
overrides its field.

    nhle train --dataset digits --arch smallcnn --split-seed 0 --out runs/base
    nhle unlearn --checkpoint runs/base/model.pt --classes 3 --sample-seed 0 --out runs/forget3 --retrain-baseline
    nhle params                                   # every setting with its default and meaning (= params.yaml)
    nhle run                                      # the main job: Prefect flows, MLflow registry, ONNX
    nhle rollback                                 # move the champion alias back to the previous version
    nhle request submit --classes 3 --requester WHO --reason WHY   # forget requests (nhle.cli.requests)
    nhle request process | list | show ID         # and `nhle schedule` for the cron deployment
    nhle bench unlearning --seeds 0,1,2           # NHLE vs retrain, baselines, ablations; tables to files
    nhle serve --host 127.0.0.1 --port 8000      # ONNX Runtime server of the champion, hot-swapped
    nhle prepare | evaluate | export              # the dvc.yaml stages
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from nhle.adapters.signing import create_key_pair
from nhle.bench.configs import GpuBench, InferenceBench, ScalingBench, ServeBench, UnlearningBench
from nhle.bench.serving import run as run_serve_bench
from nhle.cli.jobs import import_command, run_command
from nhle.cli.requests import add_commands
from nhle.core.audit import terminal_text
from nhle.core.config import SECTIONS, Params, load_params, params_yaml, with_assignments
from nhle.core.files import GATES, PARITY, REPORT, atomic_write, write_json
from nhle.core.flags import Deprecated, add_config_flags, config_from, flag_name, flag_options
from nhle.core.gates import advice, evaluate_gates

# A flag is a short spelling of `--set section.field=VALUE`: its help is the field's docstring and
# its type the field's (nhle.core.config), so neither is written twice. Flags default to None so
# that params.yaml supplies the value.
FLAG_FIELDS = {
    "dataset": ("data", "dataset"),
    "data_root": ("data", "root"),
    "download": ("data", "download"),
    "image_size": ("data", "image_size"),
    "class_names": ("data", "class_names"),
    "split_seed": ("data", "seed"),
    "arch": ("model", "arch"),
    "weights": ("model", "weights"),
    "weights_key": ("model", "weights_key"),
    "from_mlflow": ("model", "from_mlflow"),
    "mlflow_tracking_uri": ("model", "mlflow_tracking_uri"),
    "head": ("model", "head"),
    "mean": ("model", "mean"),
    "std": ("model", "std"),
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"),
    "lr": ("train", "lr"),
    "device": ("train", "device"),
    "encoding": ("unlearn", "encoding"),
    "n_samples": ("unlearn", "n_samples"),
    "unlearn_lr": ("unlearn", "lr"),
    "max_steps": ("unlearn", "max_steps"),
    "anchor_weight": ("unlearn", "anchor_weight"),
    "layers": ("unlearn", "layers"),
    "forget_rank": ("unlearn", "forget_rank"),
    "name": ("registry", "model_name"),
}


def resolve_params(args) -> Params:
    """params.yaml (or defaults when it does not exist) with every flag that was given and every
    --set (they win) applied together and checked once."""
    params = load_params(args.params)
    assignments = [
        f"{section}.{name}={json.dumps(list(value) if isinstance(value, tuple) else value)}"
        for flag, (section, name) in FLAG_FIELDS.items()
        if (value := getattr(args, flag, None)) is not None
    ]
    if getattr(args, "no_mask", False):
        assignments.append("unlearn.mask=false")
    return with_assignments(params, assignments + list(getattr(args, "set", None) or []))


def params_parent() -> argparse.ArgumentParser:
    """--params and --set: the parent of every command that reads the settings."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--params",
        help="the params file to read (default: params.yaml, or the built-in defaults "
        "when there is none; a file named here must exist)",
    )
    parent.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set unlearn.lr=3e-5 or --set forget=5 (repeatable; "
        "`nhle params` lists every key with its meaning)",
    )
    return parent


def project_parent() -> argparse.ArgumentParser:
    """--params, --set and --project-dir: the parent of every command that works on a project."""
    parent = argparse.ArgumentParser(add_help=False, parents=[params_parent()])
    parent.add_argument(
        "--project-dir",
        default=".",
        help="the project folder: the relative paths of params.yaml "
        "(MLflow store, data repository, request ledger) are taken in it",
    )
    return parent


def model_parent() -> argparse.ArgumentParser:
    """--name: the parent of every command that acts on one registered model of the project."""
    parent = argparse.ArgumentParser(add_help=False)
    add_field_flags(parent, "name")
    return parent


def add_classes_flag(parser, help: str) -> None:
    """--classes, the classes to forget, in every command that forgets (--forget: its old spelling)."""
    parser.add_argument("--classes", help=help)
    parser.add_argument("--forget", dest="classes", action=Deprecated, use="--classes")


def add_field_flags(parser, *flags: str) -> None:
    """--flag for each name of FLAG_FIELDS, typed, documented and limited to its choices by its
    config field. Values are checked with the rest of the settings (resolve_params), so a flag
    that goes with another (--mean with --std) is checked once both are in."""
    for flag in flags:
        section, name = FLAG_FIELDS[flag]
        options = flag_options(SECTIONS[section], name)
        options["help"] += f" ({section}.{name})"
        parser.add_argument(flag_name(flag), dest=flag, default=None, **options)


def add_data_flags(parser):
    add_field_flags(parser, "dataset", "data_root", "download", "image_size", "class_names")


def add_arch_flags(parser):
    add_field_flags(parser, "arch", "head", "mean", "std")


def add_train_flags(parser):
    add_arch_flags(parser)
    add_field_flags(parser, "epochs", "batch_size", "lr", "device")


def add_unlearn_flags(parser):
    add_field_flags(
        parser, "encoding", "n_samples", "unlearn_lr", "max_steps", "anchor_weight", "layers", "forget_rank"
    )
    parser.add_argument(
        "--no-mask", action="store_true", help="skip class weight masking (ablation only; unlearn.mask)"
    )


def cmd_train(args) -> int:
    from nhle.core.experiment import train_base_model  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.core.training import save_checkpoint  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    params = resolve_params(args)
    model, meta = train_base_model(params.data, params.train, model_config=params.model)
    out = Path(args.out)
    save_checkpoint(out / "model.pt", model, **meta)
    write_json(out / "metrics.json", meta["metrics"])
    print(f"wrote {out / 'model.pt'}: test accuracy {meta['metrics']['test_acc']:.4f}")
    return 0


def cmd_prepare(args) -> int:
    from nhle.core.data import save_splits  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.core.experiment import load_data  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    data = load_data(resolve_params(args).data)
    save_splits(data, args.out)
    print(f"wrote {data.name} ({len(data.train)} train, {len(data.test)} test) to {args.out}")
    return 0


def cmd_unlearn(args) -> int:
    from nhle.core.experiment import (  # noqa: PLC0415 - lazy: torch
        forget_and_measure,
        save_unlearned,
        summary_lines,
        validate_forget,
    )
    from nhle.core.training import load_checkpoint  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    params = resolve_params(args)
    model, checkpoint = load_checkpoint(args.checkpoint)
    classes = validate_forget(model, args.classes or params.forget, checkpoint["class_names"])
    outcome = forget_and_measure(
        model,
        checkpoint,
        classes,
        seed=args.sample_seed,
        config=params.unlearn,
        retrain_baseline=args.retrain_baseline,
        device=params.train.device,
    )
    save_unlearned(args.out, outcome, checkpoint, parent=str(args.checkpoint))
    print("\n".join(summary_lines(outcome.report)))
    print(f"wrote {Path(args.out) / 'model.pt'} and {Path(args.out) / REPORT}")
    return 0


def cmd_evaluate(args) -> int:
    from nhle.core.experiment import data_for_checkpoint  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.core.plots import write_evidence_plots  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.core.training import load_checkpoint  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    params = resolve_params(args)
    original, checkpoint = load_checkpoint(args.original)
    unlearned, _ = load_checkpoint(Path(args.unlearned) / "model.pt")
    report = json.loads((Path(args.unlearned) / REPORT).read_text())
    out = Path(args.out)
    write_evidence_plots(original, unlearned, data_for_checkpoint(checkpoint), report["forget_classes"], out / "plots")
    gates = evaluate_gates(report, None, replace(params.gates, require_parity=False))
    write_json(out / GATES, [g.as_dict() for g in gates])
    flat = {f"{block}.{key}": value for block, values in report["metrics"].items() for key, value in values.items()}
    write_json(out / "metrics.json", {**flat, **{f"seconds.{k}": v for k, v in report["seconds"].items()}})
    for gate in gates:
        print(gate.describe())
    for line in advice(gates):
        print(f"what to try - {line}")
    return 0


def cmd_export(args) -> int:
    from nhle.core.experiment import data_for_checkpoint  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.core.export import check_parity, export_onnx  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.core.training import load_checkpoint  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    params = resolve_params(args)
    model, checkpoint = load_checkpoint(args.checkpoint)
    data = data_for_checkpoint(checkpoint)
    out = Path(args.out)
    path = export_onnx(model, out / "model.onnx", data.image_shape, params.export.exporter)
    parity = check_parity(model, path, data.test, params.export.parity_batch_sizes, params.export.parity_tolerance)
    write_json(out / PARITY, parity)
    print(
        f"wrote {path}; parity {'passed' if parity['passed'] else 'FAILED'}: argmax agreement "
        f"{parity['argmax_agreement']:.4f}, max |dp| {parity['max_abs_prob_diff']:.2e}"
    )
    return 0 if parity["passed"] else 1


def cmd_params(args) -> int:
    """Every setting with its value and meaning, as params.yaml holds them (the defaults, or
    --params and --set applied)."""
    text = params_yaml(resolve_params(args))
    if args.write:
        atomic_write(Path(args.write), lambda f: f.write(text.encode()))
        print(f"wrote {args.write}")
    else:
        print(text, end="")
    return 0


def cmd_keys(args) -> int:
    """The project's signing key pair (registry.signing_key, serving.verify_key), made on purpose;
    refused where either file exists."""
    from nhle.orchestration.steps import project_path  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    params = resolve_params(args)
    key, public = (
        project_path(Path(args.project_dir), params.registry.signing_key),
        project_path(Path(args.project_dir), params.serving.verify_key),
    )
    try:
        create_key_pair(key, public)
    except FileExistsError as err:
        raise ValueError(str(err)) from None
    print(
        f"wrote {key} (private: keep it out of git, where the pipeline runs) and {public} (public: where servers run)"
    )
    return 0


def cmd_run(args) -> int:
    return run_command(
        resolve_params(args), forget_spec=args.classes, project_dir=Path(args.project_dir), started=args.started
    )


def cmd_import(args) -> int:
    return import_command(resolve_params(args), project_dir=Path(args.project_dir), started=args.started)


def cmd_rollback(args) -> int:
    """Refuses a version that predicts a class deleted on record (the ledger and the registered
    model's own record), unless the operator reopens the requests that deleted it (--reopen ID
    --reason ...), which both records then keep."""
    from mlflow import MlflowClient  # noqa: PLC0415 - lazy: MLflow

    from nhle.adapters.deletions import open_ledger, reopen_on_registry  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.adapters.tracking import configure, rollback  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.orchestration.steps import deleted_on_record  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    params = resolve_params(args)
    configure(params, args.project_dir)
    name = params.registry.model_name
    deleted, _ = deleted_on_record(params, args.project_dir)
    ledger = open_ledger(params, args.project_dir)
    asked = sorted(set(args.reopen or []))
    if asked and not (args.reason or "").strip():
        raise ValueError("--reopen needs --reason: say on record why the deleted classes may come back")
    reopened, elsewhere = [], set()

    for request_id in asked:  # a request of another registered model is not this rollback's to reopen
        try:
            owner = ledger.get(request_id).model_name
        except KeyError as err:
            if not any(request_id in ids for ids in deleted.values()):
                raise ValueError(f"{err.args[0]}. Nothing was moved.") from None
            elsewhere.add(request_id)  # known to the registered model's record only: the ledger was made anew
            continue
        if owner not in (None, name):
            raise ValueError(
                f"forget request {request_id} is for model {owner!r}, not {name!r}: "
                f"reopen it with --name {owner}. Nothing was moved."
            )

    def reopen(needed, before, after):
        if set(needed) - set(asked):
            raise ValueError(
                f"rolling back to version {after} needs forget request(s) {needed} reopened, but "
                f"--reopen names {asked or 'none'}. Nothing was moved."
            )
        for request_id in asked:
            reopened.append(
                ledger.reopen(
                    request_id,
                    args.operator,
                    args.reason,
                    {"action": "rollback", "model_version_from": before, "model_version_to": after},
                    recorded_elsewhere=request_id in elsewhere,
                )
            )
        reopen_on_registry(MlflowClient(), name, asked)

    before, after = rollback(params.registry, deleted, reopen if asked else None)
    print(f"{name}: {params.registry.champion_alias} moved from version {before} to {after}")
    for event in reopened:
        print(terminal_text(f"forget request {event.request_id} reopened by {event.operator}: {event.reason}"))
    return 0


def cmd_serve(args) -> int:
    """uvicorn on nhle_serving.server (serving/ of the checkout); the server itself never imports torch."""
    import uvicorn  # noqa: PLC0415 - lazy: uvicorn: only `nhle serve`

    params = resolve_params(args)
    if args.model and args.name:
        raise ValueError(
            "--model (a model URI or .onnx file) and --name (a registered model) both name what to serve: give one"
        )
    os.environ["NHLE_PARAMS"] = str(Path(args.params).resolve())
    os.environ["NHLE_PROJECT_DIR"] = str(Path(args.project_dir).resolve())
    if args.model or args.name:
        os.environ["NHLE_MODEL"] = args.model or params.registry.champion_uri()
    uvicorn.run(
        "nhle_serving.server:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        http="nhle_serving.http:GuardedProtocol",
    )
    return 0


def cmd_bench_serve(args) -> int:
    return run_serve_bench(args.project_dir, args.params, args.set, args.name, config_from(ServeBench, args))


def cmd_bench_unlearning(args) -> int:
    from nhle.bench.unlearning import Grid, bench_unlearning  # noqa: PLC0415 - lazy: torch

    config, params = config_from(UnlearningBench, args), resolve_params(args)
    grid = Grid(
        dataset=params.data.dataset,
        seeds=tuple(int(s) for s in config.seeds.split(",")),
        classes=config.classes,
        multi=config.multi,
        methods=config.methods,
        base=params.unlearn,
        arch=params.model.arch,
        train_config=params.train,
        image_size=params.data.image_size,
        device=params.train.device,
        root=params.data.root,
        quick=config.quick,
    )
    if config.engine == "sequential":
        bench_unlearning(grid, Path(config.out), resume=config.resume)
        return 0
    from nhle.adapters.prefect_server import temporary_prefect_server  # noqa: PLC0415 - lazy: Prefect
    from nhle_flows.bench_grid import run_on_dask  # noqa: PLC0415 - lazy: the flows load Prefect

    with temporary_prefect_server():
        run_on_dask(grid, Path(config.out), params.dask, params.dask_address())
    return 0


def cmd_bench_scaling(args) -> int:
    from nhle.bench.scaling import bench_scaling  # noqa: PLC0415 - lazy: torch

    config = config_from(ScalingBench, args)
    bench_scaling(sizes=config.size_list(), out=Path(config.out), epochs=config.epochs_run(), device=config.device)
    return 0


def cmd_bench_inference(args) -> int:
    from nhle.bench.inference import bench_inference  # noqa: PLC0415 - lazy: torch

    config = config_from(InferenceBench, args)
    bench_inference(out=Path(config.out), rounds=config.rounds(), seconds_per_model=config.seconds_per_model())
    return 0


def cmd_bench_gpu(args) -> int:
    from nhle.bench.gpu import check_and_report  # noqa: PLC0415 - lazy: torch

    return check_and_report(config_from(GpuBench, args))


def add_model_command(subparsers, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand that acts on one registered model of a project: --project-dir, --params,
    --set and --name."""
    return add_command(subparsers, name, parents=[project_parent(), model_parent()], help=help)


def add_command(subparsers, name: str, **options) -> argparse.ArgumentParser:
    """A subcommand whose --help starts with the line `nhle --help` lists for it."""
    if "help" in options:
        options.setdefault("description", options["help"][0].upper() + options["help"][1:] + ".")
    return subparsers.add_parser(name, **options)


def build_parser() -> argparse.ArgumentParser:
    from nhle.adapters.ledger import operator_name  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    parser = argparse.ArgumentParser(
        prog="nhle", description="Make an image classifier forget whole classes, and measure that it did."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = add_command(commands, "train", parents=[params_parent()], help="train a base model and write DIR/model.pt")
    add_data_flags(train)
    add_train_flags(train)
    add_field_flags(train, "split_seed")
    train.add_argument("--out", required=True, help="output folder (model.pt, metrics.json)")
    train.set_defaults(func=cmd_train)

    prepare = add_command(
        commands,
        "prepare",
        parents=[params_parent()],
        help="materialise the dataset as files (train.npz, test.npz, classes.json)",
    )
    add_data_flags(prepare)
    add_field_flags(prepare, "split_seed")
    prepare.add_argument("--out", required=True, help="output folder")
    prepare.set_defaults(func=cmd_prepare)

    unlearn = add_command(
        commands,
        "unlearn",
        parents=[params_parent()],
        help="forget classes of a checkpoint; write OUT/model.pt and report.json",
    )
    unlearn.add_argument("--checkpoint", required=True, help="model.pt written by `nhle train` or `nhle unlearn`")
    add_classes_flag(
        unlearn, "class(es) to forget: an index or name, or a comma list (default: `forget` in params.yaml)"
    )
    unlearn.add_argument(
        "--sample-seed",
        type=int,
        default=0,
        help="seed of the forget-sample draw and of the "
        "retrained reference (the split's seed is data.seed, --split-seed of `nhle train`)",
    )
    unlearn.add_argument("--out", required=True, help="output folder")
    unlearn.add_argument(
        "--retrain-baseline", action="store_true", help="also retrain from scratch without the classes and report it"
    )
    add_field_flags(unlearn, "device")
    add_unlearn_flags(unlearn)
    unlearn.set_defaults(func=cmd_unlearn)

    evaluate = add_command(
        commands, "evaluate", parents=[params_parent()], help="plots, flat metrics and gate verdicts of an unlearning"
    )
    evaluate.add_argument("--original", required=True, help="the original model.pt")
    evaluate.add_argument("--unlearned", required=True, help="folder written by `nhle unlearn`")
    evaluate.add_argument("--out", required=True, help="output folder (plots, metrics.json, gates.json)")
    evaluate.set_defaults(func=cmd_evaluate)

    export = add_command(
        commands,
        "export",
        parents=[params_parent()],
        help="export a checkpoint to ONNX and check parity with ONNX Runtime",
    )
    export.add_argument("--checkpoint", required=True, help="model.pt to export")
    export.add_argument("--out", required=True, help="output folder (model.onnx, parity.json)")
    export.set_defaults(func=cmd_export)

    settings = add_command(
        commands,
        "params",
        parents=[params_parent()],
        help="print every setting with its value and meaning (params.yaml's format); --write FILE writes it",
    )
    settings.add_argument("--write", metavar="FILE", help="write it to FILE instead of printing it")
    settings.set_defaults(func=cmd_params)

    keys = add_command(commands, "keys", help="the signing key pair every version is signed and verified with")
    key_actions = keys.add_subparsers(dest="action", required=True)
    add_command(
        key_actions,
        "create",
        parents=[project_parent()],
        help="write registry.signing_key and serving.verify_key (the first promotion of a new registered "
        "model makes them too)",
    ).set_defaults(func=cmd_keys)

    run = add_model_command(
        commands,
        "run",
        "the main job: train a base model if there is no champion, run one forget flow, print the registry state",
    )
    add_classes_flag(run, "class(es) to forget: an index or name, or a comma list (default: `forget` in params.yaml)")
    run.set_defaults(func=cmd_run)

    imports = add_model_command(
        commands,
        "import",
        "register your own model (torchvision / timm weights, or a PyTorch "
        "model in MLflow) as a base version, after the same evaluation, export and gates",
    )
    add_data_flags(imports)
    add_arch_flags(imports)
    add_field_flags(imports, "weights", "weights_key", "from_mlflow", "mlflow_tracking_uri")
    imports.set_defaults(func=cmd_import)

    rollback = add_model_command(commands, "rollback", "move the champion alias back to the previous version")
    rollback.add_argument(
        "--reopen",
        type=int,
        action="append",
        metavar="REQUEST_ID",
        help="reopen this done forget request on record, so that the version rolled back to may "
        "predict its classes again (repeat for several)",
    )
    rollback.add_argument("--reason", help="why the requests are reopened (stored in the ledger)")
    rollback.add_argument("--operator", default=operator_name(), help="who reopens them (default: %(default)s)")
    rollback.set_defaults(func=cmd_rollback)

    serve = add_model_command(commands, "serve", "serve the champion with ONNX Runtime (FastAPI + uvicorn)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--model", help="models:/NAME@ALIAS or a local .onnx file (default: the champion alias)")
    serve.set_defaults(func=cmd_serve)

    add_commands(commands, add_command, add_model_command)

    bench = add_command(commands, "bench", help="benchmarks that write their results to files")
    benches = bench.add_subparsers(dest="bench", required=True)
    unlearning = add_command(
        benches,
        "unlearning",
        parents=[project_parent()],
        help="NHLE vs retrain, baselines and ablations: every class x seeds, plus a multi-class case",
    )
    add_field_flags(unlearning, "dataset", "data_root", "image_size", "arch", "epochs", "batch_size", "device")
    add_config_flags(unlearning, UnlearningBench, renamed={"--model": "arch"})
    unlearning.set_defaults(func=cmd_bench_unlearning)
    scaling = add_command(benches, "scaling", help="NHLE vs retrain time as a synthetic training set grows")
    add_config_flags(scaling, ScalingBench)
    scaling.set_defaults(func=cmd_bench_scaling)
    inference = add_command(
        benches,
        "inference",
        help="ONNX Runtime vs PyTorch eager for both models; ResNet-18 GFLOP/s against this machine's fp32 matmul rate",
    )
    add_config_flags(inference, InferenceBench)
    inference.set_defaults(func=cmd_bench_inference)
    serving = add_model_command(
        benches,
        "serve",
        "nhle serve (JSON, Open Inference "
        "Protocol JSON and binary, micro-batching) against mlflow models serve and in-process "
        "ONNX Runtime; time from a forget request to the new version served",
    )
    add_config_flags(serving, ServeBench)
    serving.set_defaults(func=cmd_bench_serve)
    gpu = add_command(
        benches,
        "gpu",
        help="train, NHLE, ONNX export and parity on a GPU, with timings (= python -m nhle.bench.gpu)",
    )
    add_config_flags(gpu, GpuBench)
    gpu.set_defaults(func=cmd_bench_gpu)
    return parser


# What the Makefile and CI set, set by the CLI itself where the user has not: no usage data
# leaves the machine (and no "Failed to send telemetry" error on one without internet), nhle's
# log lines outside a flow run stay local without a warning, and the first temporary Prefect
# server gets time to start on a small machine.
QUIET_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def main(argv=None) -> int:
    started = time.perf_counter()  # the "in all" time the flow commands print counts from here
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # nhle's own INFO lines (e.g. unlearning progress) go through Prefect's handlers inside flows.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "nhle")
    logging.getLogger("nhle").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    args.started = started
    try:
        if hasattr(args, "params"):
            if args.params is not None and not Path(args.params).is_file():
                raise FileNotFoundError(
                    f"--params {args.params}: no such file (leave --params out to use "
                    "params.yaml, or the built-in defaults when there is none)"
                )
            args.params = args.params or "params.yaml"
        if args.command in ("request", "schedule", "deploy"):
            return args.func(args, resolve_params(args))
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"nhle {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
