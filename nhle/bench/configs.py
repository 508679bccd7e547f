"""What each `nhle bench` command takes: one frozen dataclass per benchmark, a docstring per field.
The command's flags, their types, defaults, choices and --help text come from these fields
(nhle.core.flags.add_config_flags), as the main commands' flags come from params.yaml's sections; `python -m
nhle.bench.gpu` and `python -m nhle.bench.serving` build their parsers from the same classes.

No torch here: `nhle --help` and `nhle serve` build every parser.
"""

from __future__ import annotations

from dataclasses import dataclass

from nhle.core.config import AMP_MODES, Section, setting


@dataclass(frozen=True)
class UnlearningBench(Section):
    """`nhle bench unlearning`; the dataset, architecture, training and device are params.yaml's
    (and their flags), as for `nhle train`."""

    seeds: str = "0,1,2"
    """Comma list of seeds: each trains its own base model and draws its own samples."""
    classes: str = "all"
    """The classes forgotten, one case each: 'all' (each class in turn) or a comma list."""
    multi: str = "2,5,8"
    """Classes forgotten together as one more case, or none."""
    methods: str = "all"
    """'all' or a comma list: nhle, retrain, the baselines (finetune, neggrad, random_label,
    boundary_shrink, ssd, scrub, salun) and ablations (mask_only, nhle_no_mask, nhle_no_anchor,
    nhle_head_only, encoding_<name>)."""
    out: str = "bench/unlearning"
    """Folder for runs.jsonl, summary.* and tradeoff.png."""
    resume: bool = False
    """Keep the cases OUT/runs.jsonl already holds for every method and run only the rest
    (sequential engine)."""
    quick: bool = False
    """A reduced grid for CI: 1 seed, 2 classes and the multi-class case, 3 epochs, short
    unlearning, synthesis and relearn (Grid.quick)."""
    engine: str = setting("sequential", choices=("sequential", "dask"))
    """Run the grid here one unit after another, or as Prefect tasks on a Dask cluster
    (params.yaml dask.address, else a local cluster of dask.n_workers processes)."""


@dataclass(frozen=True)
class ScalingBench(Section):
    """`nhle bench scaling`."""

    sizes: str = "2000,20000,200000"
    """Comma list of synthetic training-set sizes."""
    epochs: int = setting(5, at_least=1)
    """Training epochs of the base and retrained models."""
    device: str = "auto"
    """auto, cpu or cuda."""
    out: str = "bench/scaling"
    """Folder for scaling.json, scaling.md, scaling.png."""
    quick: bool = False
    """Sizes 2000 and 5000, 2 epochs (CI)."""

    def size_list(self) -> list[int]:
        return [2000, 5000] if self.quick else [int(s) for s in self.sizes.split(",")]

    def epochs_run(self) -> int:
        return 2 if self.quick else self.epochs


@dataclass(frozen=True)
class InferenceBench(Section):
    """`nhle bench inference`."""

    out: str = "bench/inference"
    """Folder for inference.json and inference.md."""
    quick: bool = False
    """One short round per model (CI)."""

    def rounds(self) -> int:
        return 1 if self.quick else 5

    def seconds_per_model(self) -> float:
        return 5.0 if self.quick else 40.0


@dataclass(frozen=True)
class ServeBench(Section):
    """`nhle bench serve` (the project, params and registered model are the command's --project-dir,
    --params, --set and --name)."""

    out: str = "bench/serve"
    """Folder for serve.json and serve.md."""
    rounds: int = setting(3, at_least=1)
    """Interleaved rounds the requests are spread over."""
    single_requests: int = setting(300, at_least=1)
    """Single-image requests per variant."""
    batch_requests: int = setting(60, at_least=1)
    """Batch requests per variant."""
    batch_size: int = setting(64, at_least=1)
    """Images in each batch request."""
    concurrency: int = setting(4, at_least=1)
    """Connections sending at once."""
    seconds: float = setting(900.0, above=0.0)
    """Cap on the load phases and the in-process runs."""
    swap: bool = True
    """Time forget requests to the new version served (--no-swap skips it)."""
    swap_requests: int = setting(3, at_least=1)
    """Forget requests timed one after another."""


@dataclass(frozen=True)
class GpuBench(Section):
    """`nhle bench gpu` (= python -m nhle.bench.gpu). Sizes left unset take the full check's
    (nhle.bench.gpu.FULL: 50,000 training images, 3 epochs, ...) or, with --quick, the smoke
    test's (QUICK)."""

    device: str = "auto"
    """auto (CUDA when present), cpu or cuda."""
    amp: str = setting("off", choices=AMP_MODES)
    """Mixed precision of training and unlearning (weights and the ONNX model stay fp32)."""
    cifar_root: str | None = None
    """Folder with torchvision's CIFAR-10 files (cifar-10-batches-py); without it, synthetic
    CIFAR-shaped data."""
    train_size: int | None = setting(None, at_least=1)
    """Training images."""
    test_size: int | None = setting(None, at_least=1)
    """Test images, also the parity set."""
    epochs: int | None = setting(None, at_least=1)
    """Training epochs."""
    batch_size: int | None = setting(None, at_least=1)
    """Training batch, also the timed inference batch."""
    max_steps: int | None = setting(None, at_least=1)
    """Cap on NHLE fine-tuning steps."""
    forget_class: int = setting(0, at_least=0)
    """The class to forget."""
    seed: int = 0
    """Seed of the data, training and forget samples."""
    quick: bool = False
    """A smoke test at small sizes; sizes given explicitly win."""
    out: str = "bench/gpu"
    """Folder for gpu_check.json and gpu_check.md."""
