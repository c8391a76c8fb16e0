"""Direct-solve assembly and gradient epochs with 1, 2, ... processes; print a table, write JSON.

Builds a dataset of ``--n-waters`` distorted waters (:func:`rhocalc.structures.distorted_waters`;
HF/sto-3g fitted on def2-universal-jfit: cheap targets, the fit is what is timed) or uses
``--dataset``, then runs ``rholearn train`` under ``torchrun --standalone
--nproc_per_node N`` (gloo on the CPU, one OpenMP thread per process) for each N of
``--processes``, twice per N, into fresh run folders:

- ``direct``: the default kernel model, one regularisation strength (no model
  selection): ``assembly structures/s`` is the number of training structures over the
  ``features + assembly`` seconds of ``solve.json`` (process 0's share, all-reduce
  included);
- ``gradient``: the linear model, Adam, ``--epochs`` epochs: ``epochs/s`` is one over
  the median ``seconds`` of ``log.csv`` (each epoch all-reduces its gradients).

Descriptors are computed before either is timed. The processes of one run share the
machine: with N processes on fewer than N free cores the figures say nothing about
scaling, only that the run works; compare rows of one run on an otherwise idle machine.

Usage::

    python benchmarks/distributed_fit.py [--n-waters 24] [--processes 1 2] [--epochs 5]
                                         [--dataset DIR] [--output FILE]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile

from rhocalc.batch import run_batch
from rhocalc.pyscf import PySCFOptions, basis_set, compute_targets
from rhocalc.structures import distorted_waters
from rholearn import workflow
from rholearn.options import to_dict, write_yaml
from rholearn.solve import SolveOptions
from rholearn.train import TrainOptions

OUTPUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
HYPERS = {"cutoff": {"radius": 3.0},
          "basis": {"type": "TensorProduct", "max_angular": 3, "radial": {"type": "Gto", "max_radial": 4}}}


def make_dataset(root: str, n_waters: int) -> str:
    options = PySCFOptions(xc="HF", basis="sto-3g", auxbasis="def2-universal-jfit", grid_level=0)
    run_batch(distorted_waters(n_waters), root, functools.partial(compute_targets, options=options),
              basis_set(options.auxbasis, ["H", "O"]), progress=False)
    return root


def rholearn_train(dataset: str, run_dir: str, options: workflow.FitOptions, processes: int) -> None:
    path = f"{run_dir}.yaml"
    write_yaml(path, {"dataset": dataset, "run": run_dir, **to_dict(options)})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", "-m", "rholearn.cli", "train", path]
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-waters", type=int, default=24)
    parser.add_argument("--dataset", help="an existing dataset folder (else waters are computed)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default=os.path.join(OUTPUT_DIR, "distributed_fit.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rholearn-distributed-") as work:
        rows = measure(args, work)
    print(f"{'fit':<9} {'processes':>9} {'repeat':>6} {'n_train':>7} {'seconds':>8} {'rate':>8}  unit")
    for row in rows:
        print(f"{row['fit']:<9} {row['processes']:>9} {row['repeat']:>6} {row['n_train']:>7} "
              f"{row['seconds']:>8.3f} {row['rate']:>8.2f}  {row['unit']}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"cpu_count": os.cpu_count(), "n_waters": args.n_waters, "dataset": args.dataset,
                   "epochs": args.epochs, "hypers": HYPERS, "rows": rows}, f, indent=2)
    print(f"wrote {args.output}")


def measure(args, work: str) -> list:
    """One row per fit, number of processes and repeat."""
    dataset = args.dataset or make_dataset(os.path.join(work, "dataset"), args.n_waters)
    direct = workflow.FitOptions(hypers=HYPERS, n_train=0.8, n_val=0.0,
                                 solve=SolveOptions(regularisation=1e-6))
    gradient = dataclasses.replace(
        direct, model="linear", solver="gradient",
        train=TrainOptions(epochs=args.epochs, batch_size=4, early_stopping_patience=None,
                           verbose=False),
    )
    rows = []
    for processes in args.processes:
        for repeat in range(args.repeats):
            run_dir = os.path.join(work, f"direct-{processes}-{repeat}")
            rholearn_train(dataset, run_dir, direct, processes)
            with open(os.path.join(run_dir, "solve.json")) as f:
                record = json.load(f)
            seconds = record["seconds"]["features"] + record["seconds"]["assembly"]
            rows.append({"fit": "direct", "processes": processes, "repeat": repeat,
                         "n_train": record["n_train"], "seconds": seconds,
                         "rate": record["n_train"] / seconds, "unit": "assembly structures/s"})
            run_dir = os.path.join(work, f"gradient-{processes}-{repeat}")
            rholearn_train(dataset, run_dir, gradient, processes)
            with open(os.path.join(run_dir, "log.csv")) as f:
                epoch_seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
            seconds = statistics.median(epoch_seconds)
            rows.append({"fit": "gradient", "processes": processes, "repeat": repeat,
                         "n_train": record["n_train"], "seconds": seconds, "rate": 1 / seconds,
                         "unit": "epochs/s"})
    return rows


if __name__ == "__main__":
    main()
