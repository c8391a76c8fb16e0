"""Learning curve on distorted water molecules: test errors and timings against training-set size.

One dataset of ``--n-structures`` distorted waters
(:func:`rhocalc.structures.distorted_waters`; PBE/def2-svp, fitted onto
def2-universal-jkfit, as in ``examples/water/run.py``) is computed once with
:func:`rhocalc.batch.run_batch` into ``--dataset`` (resumable: a rerun skips it).
Its completed structures are shuffled once into a fixed test set, a fixed
validation set and a pool of training structures; the training sets are nested
prefixes of the pool. For each model and training-set size:

- :func:`rholearn.workflow.fit` trains on that explicit split (linear: LBFGS and
  the overlap loss with the settings of the example; nonlinear: Adam);
- :func:`rholearn.workflow.evaluate` gives the test errors: relative L2 and
  SALTED % RMSE against the RI coefficients, real-space L1 against the RI and
  the SCF densities (and the RI basis's own L1 error against the SCF);
- the prediction of one structure is timed, split into the lambda-SOAP
  descriptor and the network (median over the test set), next to the
  descriptor per structure of the whole test set in one call and the mean
  time per structure of ``evaluate``'s predictions (first call included).

Prints a table and writes JSON.

Usage::

    python benchmarks/learning_curve.py [--train-sizes 10 30 100] [--models linear nonlinear]
                                        [--dataset DIR] [--output FILE]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time

import numpy as np
import pyscf
import torch

from rhocalc.batch import run_batch
from rhocalc.pyscf import PySCFOptions, basis_set, compute_targets
from rhocalc.structures import distorted_waters
from rholearn import workflow
from rholearn.data import read_dataset
from rholearn.train import TrainOptions

OUTPUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
"""Git-ignored folder of the benchmarks' results."""

PYSCF_OPTIONS = PySCFOptions(xc="PBE", basis="def2-svp", auxbasis="def2-universal-jkfit")

ERRORS = ("relative_l2_percent", "rmse_percent", "l1_vs_ri_percent", "l1_vs_scf_percent",
          "ri_l1_vs_scf_percent")
"""Test-set errors of :func:`rholearn.workflow.evaluate` reported, in %."""


def compute_dataset(path: str, n_structures: int, seed: int, workers: int) -> dict:
    """Targets of the distorted waters into ``path`` (skipping those already there).

    Each of the ``workers`` processes runs PySCF with ``cpu_count // workers``
    OpenMP threads. Returns what was computed and how long it took (seconds).
    """
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the spawned workers
    start = time.perf_counter()
    report = run_batch(
        distorted_waters(n_structures, seed), path,
        functools.partial(compute_targets, options=PYSCF_OPTIONS),
        basis_set(PYSCF_OPTIONS.auxbasis, ["H", "O"]), n_workers=workers,
        settings=PYSCF_OPTIONS.dataset_settings(),
    )
    return {
        "path": os.path.abspath(path), "n_structures": n_structures, "seed": seed,
        "computed_now": len(report.done), "already_there": len(report.skipped),
        "failed": len(report.failed), "workers": workers, "omp_threads_per_worker": threads,
        "seconds": time.perf_counter() - start,
    }


def nested_splits(indices, n_test: int, n_val: int, train_sizes, seed: int):
    """``{n_train: {"train", "val", "test"}}``: the same test and validation
    structures for every size, the training sets nested (each contains the smaller)."""
    shuffled = [int(i) for i in np.random.default_rng(seed).permutation(indices)]
    test, val, pool = shuffled[:n_test], shuffled[n_test : n_test + n_val], shuffled[n_test + n_val :]
    if max(train_sizes) > len(pool):
        raise ValueError(
            f"{len(indices)} completed structures leave {len(pool)} for training after "
            f"{n_test} test and {n_val} validation ones, fewer than {max(train_sizes)}"
        )
    return {n: {"train": pool[:n], "val": val, "test": test} for n in train_sizes}


def train_options(model: str, args) -> TrainOptions:
    """Linear: full-batch LBFGS as in ``examples/water/run.py``; nonlinear: Adam."""
    if model == "linear":
        return TrainOptions(
            epochs=args.epochs, optimizer="lbfgs", learning_rate=1.0, batch_size=16,
            scheduler=None, early_stopping_patience=10, checkpoint_every=5, verbose=False,
            seed=args.seed,
        )
    return TrainOptions(
        epochs=args.adam_epochs, optimizer="adam", learning_rate=1e-2, batch_size=8,
        scheduler="plateau", early_stopping_patience=20, checkpoint_every=10, verbose=False,
        seed=args.seed,
    )


def prediction_milliseconds(model, frames, system_ids) -> dict:
    """Time (ms) to predict one structure: median of the descriptor and the
    network called on one structure at a time, and the descriptor per
    structure when all are computed in one call."""
    descriptor_ms, network_ms = [], []
    with torch.no_grad():
        for atoms, system in zip(frames, system_ids):
            start = time.perf_counter()
            descriptor = model.descriptor.compute([atoms], [system])
            middle = time.perf_counter()
            model(descriptor)
            descriptor_ms.append(1e3 * (middle - start))
            network_ms.append(1e3 * (time.perf_counter() - middle))
    start = time.perf_counter()
    model.descriptor.compute(frames, system_ids)
    batched_ms = 1e3 * (time.perf_counter() - start) / len(frames)
    return {
        "descriptor_ms": statistics.median(descriptor_ms),
        "network_ms": statistics.median(network_ms),
        "descriptor_batched_ms": batched_ms,
    }


def learning_point(model: str, split, dataset: str, run_dir: str, args) -> dict:
    """Fit one model on one split, evaluate it on the test set, time it."""
    options = workflow.FitOptions(model=model, loss="overlap", train=train_options(model, args))
    start = time.perf_counter()
    result = workflow.fit(dataset, run_dir, options, split=split)
    fit_seconds = time.perf_counter() - start
    errors = workflow.evaluate(
        result.model, dataset, split["test"], grid_level=args.grid_level, progress=False
    )
    frames = read_dataset(dataset).frames
    epoch_seconds = [epoch["seconds"] for epoch in result.history]
    return {
        "model": model,
        "n_train": len(split["train"]),
        "n_val": len(split["val"]),
        "n_test": len(split["test"]),
        "epochs_run": len(result.history),
        "seconds_per_epoch": statistics.mean(epoch_seconds),
        "fit_seconds": fit_seconds,
        **{name: errors["summary"][name] for name in ERRORS},
        "predict_ms_mean_in_evaluate": 1e3 * errors["seconds"]["predict_per_structure"],
        **prediction_milliseconds(result.model, [frames[i] for i in split["test"]], split["test"]),
        "split": split,
        "structures": errors["structures"],
    }


COLUMNS = [  # result key, title, width, format
    ("model", "model", 9, ""), ("n_train", "n_train", 7, ""), ("epochs_run", "epochs", 6, ""),
    ("seconds_per_epoch", "s/epoch", 7, ".3f"), ("fit_seconds", "fit s", 6, ".1f"),
    ("relative_l2_percent", "L2 %", 6, ".3f"), ("rmse_percent", "RMSE %", 6, ".2f"),
    ("l1_vs_ri_percent", "L1 RI %", 7, ".3f"), ("l1_vs_scf_percent", "L1 SCF %", 8, ".3f"),
    ("ri_l1_vs_scf_percent", "RI-SCF %", 8, ".3f"),
    ("descriptor_ms", "desc ms", 7, ".1f"), ("network_ms", "net ms", 6, ".2f"),
    ("descriptor_batched_ms", "batch ms", 8, ".1f"),
    ("predict_ms_mean_in_evaluate", "eval ms", 7, ".1f"),
]


def print_table(results) -> None:
    print("  ".join(f"{title:>{width}}" for _, title, width, _ in COLUMNS))
    for result in results:
        print("  ".join(f"{result[key]:>{width}{spec}}" for key, _, width, spec in COLUMNS))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="target dataset folder (default: under benchmarks/output)")
    parser.add_argument("--n-structures", type=int, default=130)
    parser.add_argument("--n-test", type=int, default=20)
    parser.add_argument("--n-val", type=int, default=10)
    parser.add_argument("--train-sizes", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--models", nargs="+", choices=["linear", "nonlinear"], default=["linear"])
    parser.add_argument("--epochs", type=int, default=30, help="LBFGS epochs (linear)")
    parser.add_argument("--adam-epochs", type=int, default=100, help="Adam epochs (nonlinear)")
    parser.add_argument("--grid-level", type=int, default=3, help="PySCF grid of the L1 errors")
    parser.add_argument("--workers", type=int, default=2, help="PySCF processes for the dataset")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and PySCF threads of this process (training, evaluation)")
    parser.add_argument("--seed", type=int, default=0, help="structures, split and training")
    parser.add_argument("--output", default=os.path.join(OUTPUT_DIR, "learning_curve.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pyscf.lib.num_threads(args.threads)
    dataset = args.dataset or os.path.join(
        OUTPUT_DIR, f"waters-{args.n_structures}-seed{args.seed}"
    )

    print(f"targets of {args.n_structures} distorted waters -> {dataset}", flush=True)
    dataset_report = compute_dataset(dataset, args.n_structures, args.seed, args.workers)
    splits = nested_splits(
        read_dataset(dataset).indices, args.n_test, args.n_val, args.train_sizes, args.seed
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="learning-curve-") as runs:
        for model in args.models:
            for n_train, split in splits.items():
                print(f"{model} model, {n_train} training structures", flush=True)
                run_dir = os.path.join(runs, f"{model}-{n_train}")
                results.append(learning_point(model, split, dataset, run_dir, args))

    print(f"\ntest set: {args.n_test} structures, validation: {args.n_val}; "
          f"{torch.get_num_threads()} torch thread(s), CPU")
    print_table(results)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(
            {"dataset": dataset_report, "pyscf_options": PYSCF_OPTIONS.to_dict(),
             "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
             "results": results},
            f,
            indent=1,
        )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
