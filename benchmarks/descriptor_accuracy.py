"""Test errors of the linear model on the stock and the contracted lambda-SOAP.

Trains :func:`rholearn.workflow.fit` (linear model, overlap loss, gradient
training with LBFGS as in the learning curve) once per descriptor on the same explicit split
of a target dataset (default: the strongly distorted waters of
``benchmarks/datasets.py``), and reports the test-set relative L2 and SALTED
% RMSE (:func:`rholearn.workflow.evaluate`, no real-space grid), the feature
count of the O ``o3_lambda = 0`` block, the fit time and the time per epoch.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/descriptor_accuracy.py \\
        [--dataset benchmarks/output/waters] [--n-train 100] [--channels 6 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from rholearn import workflow
from rholearn.dataset import read_dataset
from rholearn.train import TrainOptions

OUTPUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
"""Git-ignored folder of the benchmarks' results."""


def accuracy_point(dataset: str, split: dict, descriptor: str, options: dict, args) -> dict:
    """Fit the linear model with one descriptor on ``split``; test errors and timings."""
    train = TrainOptions(
        epochs=args.epochs, optimizer="lbfgs", learning_rate=1.0, batch_size=16,
        scheduler=None, early_stopping_patience=10, checkpoint_every=5, verbose=False,
        seed=args.seed,
    )
    fit_options = workflow.FitOptions(
        model="linear", solver="gradient", loss="overlap", descriptor=descriptor,
        descriptor_options=options, train=train,
    )
    with tempfile.TemporaryDirectory(prefix="descriptor-accuracy-") as run_dir:
        start = time.perf_counter()
        result = workflow.fit(dataset, run_dir, fit_options, split=split)
        fit_seconds = time.perf_counter() - start
    errors = workflow.evaluate(result.model, dataset, split["test"], real_space=False, progress=False)
    features = dict(zip(result.model.keys, result.model.in_features))
    return {
        "descriptor": descriptor,
        "options": options,
        "n_train": len(split["train"]),
        "n_test": len(split["test"]),
        "features_O_lambda0": features.get((0, 1, 8)),
        "features_total": sum(result.model.in_features),
        "relative_l2_percent": errors["summary"]["relative_l2_percent"],
        "rmse_percent": errors["summary"]["rmse_percent"],
        "fit_seconds": fit_seconds,
        "epochs_run": len(result.history),
        "seconds_per_epoch": statistics.mean(epoch["seconds"] for epoch in result.history),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=os.path.join(OUTPUT_DIR, "waters"))
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--n-val", type=int, default=10)
    parser.add_argument("--n-test", type=int, default=20)
    parser.add_argument("--channels", type=int, nargs="+", default=[6, 12],
                        help="n_channels of the contracted descriptor")
    parser.add_argument("--epochs", type=int, default=30, help="LBFGS epochs")
    parser.add_argument("--seed", type=int, default=0, help="split and training")
    parser.add_argument("--output", default=os.path.join(OUTPUT_DIR, "descriptor_accuracy.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    indices = read_dataset(args.dataset).indices
    shuffled = [int(i) for i in np.random.default_rng(args.seed).permutation(indices)]
    n_test, n_val = args.n_test, args.n_val
    split = {
        "test": shuffled[:n_test],
        "val": shuffled[n_test : n_test + n_val],
        "train": shuffled[n_test + n_val : n_test + n_val + args.n_train],
    }
    runs = [("stock", {})] + [("contracted", {"n_channels": k}) for k in args.channels]
    results = []
    for descriptor, options in runs:
        print(f"{descriptor} {options}", flush=True)
        results.append(accuracy_point(args.dataset, split, descriptor, options, args))

    print(f"\n{args.dataset}: {len(split['train'])} train, {n_val} val, {n_test} test; "
          "linear model, overlap loss, LBFGS; 1 torch thread")
    print(f"{'descriptor':>22}  {'O l=0 feat':>10}  {'all feat':>8}  {'L2 %':>7}  "
          f"{'RMSE %':>7}  {'s/epoch':>7}  {'fit s':>6}")
    for r in results:
        name = r["descriptor"] + (f" K={r['options']['n_channels']}" if r["options"] else "")
        print(f"{name:>22}  {r['features_O_lambda0']:>10}  {r['features_total']:>8}  "
              f"{r['relative_l2_percent']:>7.4f}  {r['rmse_percent']:>7.3f}  "
              f"{r['seconds_per_epoch']:>7.2f}  {r['fit_seconds']:>6.1f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"dataset": os.path.abspath(args.dataset), "split": split,
                   "torch": torch.__version__, "results": results}, f, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
