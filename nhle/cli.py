"""The `nhle` command.

    nhle train --dataset digits --model smallcnn --seed 0 --out runs/base
    nhle unlearn --checkpoint runs/base/model.pt --forget 3 --seed 0 --out runs/forget3 --retrain-baseline
    nhle run                                      # the main job on the embedded defaults
    nhle bench unlearning --seeds 0,1,2           # every class x seeds x encodings, tables to files
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nhle.config import ENCODINGS, DataConfig, TrainConfig, UnlearnConfig


def add_data_flags(parser):
    parser.add_argument("--dataset", default=DataConfig.dataset, help="digits (embedded), mnist, fashionmnist, "
                        "cifar10, cifar100, svhn or imagefolder")
    parser.add_argument("--data-root", default=None, help="folder with the dataset's files (not needed for digits)")
    parser.add_argument("--download", action="store_true", help="let torchvision download the dataset into --data-root")
    parser.add_argument("--image-size", type=int, default=None, help="resize images to this square size")


def add_train_flags(parser):
    parser.add_argument("--model", default=TrainConfig.model, help="smallcnn or resnet18 (CIFAR stem)")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="training batch size")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="AdamW learning rate (cosine decay)")
    parser.add_argument("--device", default=TrainConfig.device, help="auto, cpu or cuda")


def add_unlearn_flags(parser):
    defaults = UnlearnConfig()
    parser.add_argument("--encoding", default=defaults.encoding, choices=ENCODINGS, help="NHLE label encoding")
    parser.add_argument("--n-samples", type=int, default=defaults.n_samples, help="forget samples per class")
    parser.add_argument("--unlearn-lr", type=float, default=defaults.lr, help="fine-tuning learning rate (Adam)")
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps, help="hard cap on fine-tuning steps")
    parser.add_argument("--anchor-weight", type=float, default=defaults.anchor_weight,
                        help="weight of the retained-class prediction anchor (0 = off)")
    parser.add_argument("--layers", default=defaults.layers, choices=("all", "head"), help="parameters that move")
    parser.add_argument("--no-mask", action="store_true", help="skip class weight masking (ablation only)")


def unlearn_config(args) -> UnlearnConfig:
    return UnlearnConfig(encoding=args.encoding, n_samples=args.n_samples, lr=args.unlearn_lr,
                         max_steps=args.max_steps, anchor_weight=args.anchor_weight, layers=args.layers,
                         mask=not args.no_mask)


def cmd_train(args) -> int:
    from nhle.experiment import train_base
    from nhle.training import save_checkpoint

    data_config = DataConfig(dataset=args.dataset, root=args.data_root, seed=args.seed,
                             download=args.download, image_size=args.image_size)
    train_config = TrainConfig(model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               device=args.device)
    model, meta = train_base(data_config, train_config)
    out = Path(args.out)
    save_checkpoint(out / "model.pt", model, **meta)
    write_json(out / "metrics.json", meta["metrics"])
    print(f"wrote {out / 'model.pt'}: test accuracy {meta['metrics']['test_acc']:.4f}")
    return 0


def cmd_unlearn(args) -> int:
    from nhle.experiment import forget, summary_lines
    from nhle.training import load_checkpoint, save_checkpoint

    model, checkpoint = load_checkpoint(args.checkpoint)
    outcome = forget(model, checkpoint, args.forget, seed=args.seed, config=unlearn_config(args),
                     retrain_baseline=args.retrain_baseline, device=args.device)
    out = Path(args.out)
    meta = {k: checkpoint[k] for k in ("config", "dataset", "class_names", "data_fingerprint")}
    save_checkpoint(out / "model.pt", outcome.result.model, parent=str(args.checkpoint),
                    unlearn=outcome.report["unlearn_config"], **meta)
    write_json(out / "report.json", outcome.report)
    print("\n".join(summary_lines(outcome.report)))
    print(f"wrote {out / 'model.pt'} and {out / 'report.json'}")
    return 0


def cmd_run(args) -> int:
    """Until the pipeline lands: train on digits, forget the default class, print the report."""
    from nhle.experiment import forget, summary_lines, train_base
    from nhle.training import model_spec

    model, meta = train_base(DataConfig(), TrainConfig())
    print(f"base model: test accuracy {meta['metrics']['test_acc']:.4f}")
    checkpoint = {**meta, "model_spec": model_spec(model)}
    outcome = forget(model, checkpoint, args.forget, seed=0, retrain_baseline=True)
    print("\n".join(summary_lines(outcome.report)))
    return 0


def cmd_bench_unlearning(args) -> int:
    from nhle.bench import bench_unlearning

    encodings = list(ENCODINGS) if args.encodings == "all" else args.encodings.split(",")
    bench_unlearning(dataset=args.dataset, seeds=[int(s) for s in args.seeds.split(",")], classes=args.classes,
                     encodings=encodings, out=Path(args.out), quick=args.quick,
                     base=config_with_overrides(UnlearnConfig(), args.set))
    return 0


def config_with_overrides(config, assignments: list[str]):
    """Apply KEY=VALUE strings to a frozen config, converting each value to its field's type."""
    from nhle.config import replace_known

    overrides = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        current = getattr(config, key, None)
        if isinstance(current, bool):
            overrides[key] = value.lower() in ("1", "true", "yes")
        elif current is None:
            overrides[key] = value
        else:
            overrides[key] = type(current)(value)
    return replace_known(config, **overrides)


def write_json(path: Path, payload) -> None:
    from nhle.training import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write((json.dumps(payload, indent=2) + "\n").encode()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nhle", description="Make an image classifier forget whole classes, "
                                     "and measure that it did.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a base model and write DIR/model.pt")
    add_data_flags(train)
    add_train_flags(train)
    train.add_argument("--seed", type=int, default=0, help="seed of the split and the training")
    train.add_argument("--out", required=True, help="output folder (model.pt, metrics.json)")
    train.set_defaults(func=cmd_train)

    unlearn = commands.add_parser("unlearn", help="forget classes of a checkpoint; write OUT/model.pt and report.json")
    unlearn.add_argument("--checkpoint", required=True, help="model.pt written by `nhle train` or `nhle unlearn`")
    unlearn.add_argument("--forget", required=True, help="class(es) to forget: an index or name, or a comma list")
    unlearn.add_argument("--seed", type=int, default=0, help="seed of the forget-sample draw and the retrain")
    unlearn.add_argument("--out", required=True, help="output folder")
    unlearn.add_argument("--retrain-baseline", action="store_true",
                         help="also retrain from scratch without the classes and report it")
    unlearn.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_unlearn_flags(unlearn)
    unlearn.set_defaults(func=cmd_unlearn)

    run = commands.add_parser("run", help="the main job on the embedded defaults")
    run.add_argument("--forget", default="3", help="class(es) to forget")
    run.set_defaults(func=cmd_run)

    bench = commands.add_parser("bench", help="benchmarks that write their results to files")
    benches = bench.add_subparsers(dest="bench", required=True)
    unlearning = benches.add_parser("unlearning", help="every class x seeds x encodings against retraining")
    unlearning.add_argument("--dataset", default="digits", help="dataset (digits by default)")
    unlearning.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    unlearning.add_argument("--classes", default="all", help="'all' (each class in turn) or a comma list")
    unlearning.add_argument("--encodings", default="all", help="'all' or a comma list of encodings")
    unlearning.add_argument("--out", default="bench/unlearning", help="folder for runs.jsonl and summary.md")
    unlearning.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override an NHLE setting for every run, e.g. --set lr=3e-5 (repeatable)")
    unlearning.add_argument("--quick", action="store_true", help="a reduced grid for CI: 2 classes, 1 seed, 3 epochs")
    unlearning.set_defaults(func=cmd_bench_unlearning)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"nhle {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
