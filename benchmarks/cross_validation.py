"""Leave-one-structure-out against k-fold cross-validation: cost and choice of the default fit.

For each dataset and training-set size, the default direct fit (no validation
structures; the search over zeta switched off so that one solve is timed) is run
twice on the same split as ``salted_comparison.py``: with the default
cross-validation (leave-one-structure-out from one eigendecomposition, for
molecules) and with ``solve.folds = 5`` (one eigendecomposition per fold, the
former default). Both get ``solve.cv_seconds = inf``, so that every weight is
cross-validated. Prints, per method, the seconds of the selection and of the
whole fit, the chosen strength, the cross-validation % RMSE of the chosen strength
and the test % RMSE. Writes JSON (``--output``).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cross_validation.py methanol g2 --train-sizes 30
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import datasets  # noqa: E402  (the benchmark datasets, next to this script)
from learning_curve import splits  # noqa: E402
from salted_comparison import default_fit  # noqa: E402

from rholearn import workflow  # noqa: E402
from rholearn.dataset import read_dataset  # noqa: E402
from rholearn.solve import SolveOptions  # noqa: E402

METHODS = {"leave-one-out": None, "5-fold": 5}
"""The methods compared, by their ``solve.folds``."""


def fit_point(dataset: str, run_dir: str, split, folds) -> dict:
    """One default fit cross-validated on every weight with ``folds``; its record."""
    options = workflow.FitOptions(solve=SolveOptions(folds=folds, cv_seconds=math.inf),
                                  search={"seconds": 0})
    _, fit_seconds, rmse, solve = default_fit(dataset, run_dir, split, options)
    chosen = next(row for row in solve["grid"] if row["regularisation"] == solve["regularisation"])
    return {"fit_seconds": fit_seconds, "selection_seconds": solve["seconds"]["selection"],
            "n_weights": solve["n_weights"], "cv_method": solve["cv_method"],
            "regularisation": solve["regularisation"], "cv_rmse_percent": chosen["cv_rmse_percent"],
            "test_rmse_percent": rmse}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", choices=sorted(datasets.datasets()))
    parser.add_argument("--train-sizes", type=int, nargs="+", default=[30])
    parser.add_argument("--n-test", type=int, default=20)
    parser.add_argument("--g2-test-molecules", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=os.path.join(datasets.OUTPUT_DIR, "cross_validation.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    record = {}
    print(f"{'dataset':>9} {'N':>4} {'method':>14} {'weights':>8} {'selection s':>12} {'fit s':>7} "
          f"{'strength':>9} {'CV %':>7} {'test %':>7}")
    with tempfile.TemporaryDirectory(prefix="cross-validation-") as runs:
        for name in args.datasets:
            dataset = datasets.compute(name, datasets.datasets()[name]())
            points = splits(name, read_dataset(dataset), args.train_sizes, args.n_test, 0,
                            args.g2_test_molecules, args.seed, unseen_molecules=name == "g2")
            for n, split in points.items():
                for method, folds in METHODS.items():
                    row = fit_point(dataset, os.path.join(runs, f"{name}-{n}-{method}"), split, folds)
                    record.setdefault(name, {}).setdefault(str(n), {})[method] = row
                    print(f"{name:>9} {n:>4} {method:>14} {row['n_weights']:>8} "
                          f"{row['selection_seconds']:>12.1f} {row['fit_seconds']:>7.1f} "
                          f"{row['regularisation']:>9.0e} {row['cv_rmse_percent']:>7.2f} "
                          f"{row['test_rmse_percent']:>7.2f}", flush=True)
                    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
                    with open(args.output, "w") as f:
                        json.dump(record, f, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
