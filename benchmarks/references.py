"""Learning curves of the kernel model against its budget of weights (how many references it gets).

For each dataset, training-set size and weight budget (``model_options.max_weights``),
the default direct fit (no validation structures; the search over zeta switched
off so that one solve is timed) runs on the same split as ``salted_comparison.py``.
Within a budget the references per element come from the data
(:func:`rholearn.models.kernel.reference_counts`: every element's environments
covered to one common farthest-point resolution). A budget that takes every pick
(``n_references`` per element, or all of an element's training atoms) gives the
same fit as any larger one, so larger budgets are not rerun at that size (their
rows name the budget whose fit they share). Prints,
per point, the weights, the references per element, the seconds of the whole fit
and the test % RMSE; writes JSON (``--output``) and a figure next to it (test % RMSE
against N, one line per budget).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/references.py waters methanol g2 \\
        --train-sizes 10 30 100 --budgets 2500 5000 10000 20000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from typing import Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import datasets  # noqa: E402  (the benchmark datasets, next to this script)
from learning_curve import splits  # noqa: E402
from salted_comparison import default_fit, learning_curve_axes, save_figure  # noqa: E402

from rholearn import workflow  # noqa: E402
from rholearn.dataset import read_dataset  # noqa: E402


def fit_point(dataset: str, folder, run_dir: str, split, budget: int) -> dict:
    """One default fit within ``budget`` weights; its record."""
    options = workflow.FitOptions(model_options={"max_weights": budget}, search={"seconds": 0})
    result, fit_seconds, rmse, solve = default_fit(dataset, run_dir, split, options)
    chosen, most = solve["references"], result.model.net.features.n_references
    atoms = Counter(symbol for i in split["train"] for symbol in folder.frames[i].get_chemical_symbols())
    return {"budget": budget, "n_weights": solve["n_weights"], "references": chosen,
            "takes_every_pick": all(chosen[symbol] == min(most, n) for symbol, n in atoms.items()),
            "regularisation": solve["regularisation"], "fit_seconds": fit_seconds,
            "test_rmse_percent": rmse}


def plot(name: str, rows: Dict[str, Dict[str, dict]], path: str) -> None:
    """Test % RMSE against N, one line per budget, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(4.4, 3.4))
    budgets = sorted({int(b) for by_budget in rows.values() for b in by_budget})
    sizes = sorted(rows, key=int)
    for budget in budgets:
        x = [int(n) for n in sizes]
        axes.plot(x, [rows[str(n)][str(budget)]["test_rmse_percent"] for n in x], marker="o",
                  label=f"{budget} weights")
    learning_curve_axes(axes, [int(n) for n in sizes], "test % RMSE")
    axes.set_title(f"{name}: kernel model by weight budget", fontsize=10)
    axes.legend(fontsize=8)
    save_figure(figure, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", choices=sorted(datasets.datasets()))
    parser.add_argument("--train-sizes", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--budgets", type=int, nargs="+", default=[2500, 5000, 10000, 20000])
    parser.add_argument("--n-test", type=int, default=20)
    parser.add_argument("--g2-test-molecules", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=os.path.join(datasets.OUTPUT_DIR, "references.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    record: Dict[str, Dict[str, Dict[str, dict]]] = {}
    print(f"{'dataset':>9} {'N':>4} {'budget':>7} {'weights':>8} {'fit s':>7} {'test %':>7}  references")
    with tempfile.TemporaryDirectory(prefix="references-") as runs:
        for name in args.datasets:
            dataset = datasets.compute(name, datasets.datasets()[name]())
            folder = read_dataset(dataset)
            points = splits(name, folder, args.train_sizes, args.n_test, 0,
                            args.g2_test_molecules, args.seed, unseen_molecules=name == "g2")
            for n, split in points.items():
                row = None
                for budget in sorted(args.budgets):
                    if row is not None and row["takes_every_pick"]:  # a larger budget: the same fit
                        row = dict(row, budget=budget, same_fit_as_budget=row["budget"])
                    else:
                        row = fit_point(dataset, folder, os.path.join(runs, f"{name}-{n}-{budget}"),
                                        split, budget)
                    record.setdefault(name, {}).setdefault(str(n), {})[str(budget)] = row
                    references = ", ".join(f"{symbol} {count}" for symbol, count in row["references"].items())
                    same = f" (the fit of budget {row['same_fit_as_budget']})" if "same_fit_as_budget" in row else ""
                    print(f"{name:>9} {n:>4} {budget:>7} {row['n_weights']:>8} {row['fit_seconds']:>7.1f} "
                          f"{row['test_rmse_percent']:>7.2f}  {references}{same}", flush=True)
                    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
                    with open(args.output, "w") as f:
                        json.dump(record, f, indent=1)
            plot(name, record[name], os.path.splitext(args.output)[0] + f"_{name}.png")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
