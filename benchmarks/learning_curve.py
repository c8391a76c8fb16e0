"""Learning curves: test errors and training time against the number of training structures.

Datasets (:mod:`datasets`, computed there once and reused; PBE/def2-svp fitted
onto def2-universal-jkfit):

- ``waters``: 130 strongly distorted waters (Gaussian noise of 0.1 Angstrom on
  every coordinate, O-H 0.62-1.50 Angstrom); a fixed test set of ``--n-test``
  (20) structures, training sets the first N of the rest (nested), no
  validation structures (``--n-val 0``);
- ``g2``: the closed-shell H/C/N/O molecules of ``ase.collections.g2`` with at
  most 3 heavy atoms, 4 distorted copies each; the test set is every copy of
  ``--g2-test-molecules`` (7) molecules never seen in training.

Models (``--models``), each fitted with :func:`rholearn.workflow.fit` on the
explicit split and the overlap loss:

- ``kernel``: the sparse kernel model, direct solve (the defaults);
- ``linear-direct``: the linear model, direct solve (conjugate gradients: its
  normal matrix is too large to store);
- ``linear-lbfgs``: the linear model, LBFGS (``--epochs``);
- ``nonlinear``: the nonlinear model, Adam (``--adam-epochs``).

Reported on the test set by :func:`rholearn.workflow.evaluate`: SALTED's %
RMSE, real-space L1 against the RI and the SCF densities (``--real-space``
``all`` sizes, ``largest`` only or ``none``), and the training time after the
descriptors (direct: references + solve; gradient: the epochs). Prints a
table and writes JSON (rewritten after every point).

A dataset folder written by ``rhocalc`` (your own structures) works as well: its
test set is ``--n-test`` random structures, as for ``waters``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/learning_curve.py waters --models kernel linear-lbfgs
    OMP_NUM_THREADS=1 python benchmarks/learning_curve.py path/to/dataset \
        --train-sizes 20 50 100 --n-test 30 --output my-curve.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np
import pyscf
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import datasets  # noqa: E402  (the benchmark datasets, next to this script)

from rholearn import workflow  # noqa: E402
from rholearn.dataset import read_dataset  # noqa: E402
from rholearn.plots import plot_learning_curve  # noqa: E402
from rholearn.train import TrainOptions  # noqa: E402

MODELS = ("kernel", "linear-direct", "linear-lbfgs", "nonlinear")


def splits(name: str, folder, train_sizes, n_test: int, n_val: int, n_test_molecules: int,
           seed: int, unseen_molecules: bool = False):
    """``{n_train: split}``: nested training sets, one fixed test (and validation) set;
    with ``unseen_molecules`` (g2) the test set is every copy of some molecules."""
    rng = np.random.default_rng(seed)
    indices = list(folder.indices)
    if unseen_molecules:  # test: every copy of unseen molecules
        molecules = sorted({folder.frames[i].info["name"].rsplit("-", 1)[0] for i in indices})
        unseen = set(rng.choice(molecules, n_test_molecules, replace=False).tolist())
        test = [i for i in indices if folder.frames[i].info["name"].rsplit("-", 1)[0] in unseen]
        rest = [i for i in indices if i not in set(test)]
    else:
        shuffled = [int(i) for i in rng.permutation(indices)]
        test, rest = shuffled[:n_test], shuffled[n_test:]
    rest = [int(i) for i in rng.permutation(rest)]
    val, pool = rest[:n_val], rest[n_val:]
    if max(train_sizes) > len(pool):
        raise ValueError(f"{name}: {len(pool)} structures left for training, fewer than {max(train_sizes)}")
    return {n: {"train": pool[:n], "val": val, "test": test} for n in train_sizes}


def small_to_large_splits(folder, train_sizes, seed: int):
    """``{n_train: split}`` of a set of molecules (g2): the test set is every copy of the
    molecules with the most non-hydrogen atoms, the nested training sets come from the
    smaller molecules (a shuffled pool)."""
    def heavy(i):
        return int((folder.frames[i].numbers > 1).sum())

    largest = max(heavy(i) for i in folder.indices)
    test = [int(i) for i in folder.indices if heavy(i) == largest]
    pool = [int(i) for i in np.random.default_rng(seed).permutation(
        [i for i in folder.indices if heavy(i) < largest])]
    if max(train_sizes) > len(pool):
        raise ValueError(f"{len(pool)} structures of molecules smaller than the largest, fewer "
                         f"than {max(train_sizes)}")
    return {n: {"train": pool[:n], "val": [], "test": test} for n in train_sizes}


def fit_options(model: str, args) -> workflow.FitOptions:
    """The options of each benchmarked model (``--descriptor`` for all)."""
    return dataclasses.replace(_model_options(model, args), descriptor=args.descriptor,
                               descriptor_options={})  # the chosen descriptor's defaults


def _model_options(model: str, args) -> workflow.FitOptions:
    if model == "kernel":
        return workflow.FitOptions()
    if model == "linear-direct":
        return workflow.FitOptions(model="linear")
    if model == "linear-lbfgs":
        train = TrainOptions(epochs=args.epochs, optimizer="lbfgs", learning_rate=1.0, batch_size=16,
                             scheduler=None, early_stopping_patience=10, checkpoint_every=50,
                             verbose=False)
        return workflow.FitOptions(model="linear", solver="gradient", train=train)
    train = TrainOptions(epochs=args.adam_epochs, optimizer="adam", learning_rate=1e-2, batch_size=8,
                         scheduler="plateau", early_stopping_patience=20, checkpoint_every=50,
                         verbose=False)
    return workflow.FitOptions(model="nonlinear", solver="gradient", train=train)


def training_seconds(result) -> float:
    """Time spent training after the descriptors were computed."""
    path = os.path.join(result.run_dir, workflow.SOLVE_FILE)
    if os.path.exists(path):
        with open(path) as f:
            seconds = json.load(f)["seconds"]
        return seconds["total"] + seconds["references"]
    return sum(epoch["seconds"] for epoch in result.history)


def learning_point(name, model, split, dataset, run_dir, real_space, args) -> dict:
    options = fit_options(model, args)
    start = time.perf_counter()
    result = workflow.fit(dataset, run_dir, options, split=split)
    fit_seconds = time.perf_counter() - start
    errors = workflow.evaluate(result.model, dataset, split["test"], real_space=real_space,
                               grid_level=args.grid_level, progress=False)
    row = {
        "dataset": name, "model": model, "descriptor": options.descriptor,
        "n_train": len(split["train"]), "n_val": len(split["val"]),
        "n_test": len(split["test"]), "train_seconds": training_seconds(result),
        "fit_seconds": fit_seconds, **errors["summary"], "split": split,
    }
    solve_path = os.path.join(run_dir, workflow.SOLVE_FILE)
    if os.path.exists(solve_path):
        with open(solve_path) as f:
            row["solve"] = json.load(f)
    return row


COLUMNS = [  # key, title, format
    ("dataset", "dataset", "8"), ("model", "model", "13"), ("n_train", "N", "4"),
    ("rmse_percent", "RMSE %", "7.2f"), ("l1_vs_ri_percent", "L1 RI %", "7.3f"),
    ("l1_vs_scf_percent", "L1 SCF %", "8.3f"), ("ri_l1_vs_scf_percent", "RI-SCF %", "8.3f"),
    ("train_seconds", "train s", "8.1f"), ("fit_seconds", "fit s", "7.1f"),
]


def print_table(rows) -> None:
    print("  ".join(f"{title:>{spec.split('.')[0]}}" for _, title, spec in COLUMNS))
    for row in rows:
        cells = []
        for key, _, spec in COLUMNS:
            value = row.get(key)
            cells.append(f"{'-':>{spec.split('.')[0]}}" if value is None else f"{value:>{spec}}")
        print("  ".join(cells))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", metavar="DATASET",
                        help="'waters' or 'g2' (computed by datasets.py), or a dataset folder "
                        "written by rhocalc")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=["kernel"])
    parser.add_argument("--train-sizes", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--n-test", type=int, default=20, help="test structures (waters)")
    parser.add_argument("--g2-test-molecules", type=int, default=7)
    parser.add_argument("--n-val", type=int, default=0, help="validation structures")
    parser.add_argument("--descriptor", choices=["stock", "contracted"], default="contracted",
                        help="lambda-SOAP of every model (rholearn.descriptors)")
    parser.add_argument("--epochs", type=int, default=30, help="LBFGS epochs")
    parser.add_argument("--adam-epochs", type=int, default=100)
    parser.add_argument("--real-space", choices=["all", "largest", "none"], default="all")
    parser.add_argument("--grid-level", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=os.path.join(datasets.OUTPUT_DIR, "learning_curve.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    pyscf.lib.num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="learning-curve-") as runs:
        for name in args.datasets:
            own = os.path.isdir(name)  # the user's own dataset
            if own:
                dataset, name = name, os.path.basename(os.path.normpath(name))
            elif name in datasets.datasets():
                dataset = datasets.compute(name, datasets.datasets()[name]())
            else:
                parser.error(f"'{name}' is neither a benchmark dataset "
                             f"({', '.join(datasets.datasets())}) nor a dataset folder")
            folder = read_dataset(dataset)
            unseen = name == "g2" and not own
            for model in args.models:
                for n_train, split in splits(name, folder, args.train_sizes, args.n_test, args.n_val,
                                             args.g2_test_molecules, args.seed, unseen).items():
                    real_space = args.real_space == "all" or (
                        args.real_space == "largest" and n_train == max(args.train_sizes)
                    )
                    print(f"{name}: {model}, {n_train} training structures", flush=True)
                    run_dir = os.path.join(runs, f"{name}-{model}-{n_train}")
                    rows.append(learning_point(name, model, split, dataset, run_dir, real_space, args))
                    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
                    with open(args.output, "w") as f:
                        json.dump({"torch_threads": 1, "torch": torch.__version__, "results": rows},
                                  f, indent=1)
                    print_table(rows[-1:])
    print("\n1 torch / PySCF thread; train s: after the descriptors")
    print_table(rows)
    figure = os.path.splitext(args.output)[0] + ".png"
    curves = {}
    for row in rows:
        curves.setdefault(f"{row['dataset']} {row['model']}", []).append(
            (row["n_train"], row["rmse_percent"]))
    slopes = plot_learning_curve(curves, figure, ylabel="test % RMSE (SALTED)")
    print("log-log slopes: " + ", ".join(f"{name} {slope:.2f}" for name, slope in slopes.items()))
    print(f"wrote {args.output} and {figure}")


if __name__ == "__main__":
    main()
