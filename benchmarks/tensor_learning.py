"""Learning curves of dipoles and polarisabilities: distorted waters, or small organic molecules.

Datasets (PBE/def2-svp with ``--properties dipole,polarizability``: analytic PySCF
response, atomic units), computed here into ``benchmarks/output/<dataset>_tensors`` if
missing (a rerun resumes):

- ``waters``: :func:`datasets.noisy_molecules` of water (0.1 Angstrom of Gaussian noise
  per coordinate, randomly rotated; about 1.1 s per water on one core). The last
  ``--n-test`` structures are the test set, the first N of the others the training set.
- ``g2``: the g2 set of ``datasets.py`` (the 35 closed-shell H/C/N/O molecules of
  ``ase.collections.g2`` with at most 3 heavy atoms, 4 distorted and rotated copies
  each; 2-15 s per structure on one core). Test set: every copy of
  ``--g2-test-molecules`` (7) molecules, never trained on; training sets: nested
  random draws from the other molecules' copies (:func:`learning_curve.splits`, seed
  0, the split of ``salted_comparison.py g2``). For comparison,
  ``--g2-seen-molecules`` tests on ``--n-test`` random structures instead, other
  copies of whose molecules are trained on.

Models are fitted with the defaults (``workflow.FitOptions(target=...)``: kernel model,
contracted lambda-SOAP, direct solve, regularisation by cross-validation over the
training structures; the options each run used, defaults completed, are recorded in
the JSON) and the test % RMSE relative to the targets' spread
(:func:`rholearn.workflow.tensor_evaluation.evaluate_tensors`) is reported.

Baseline for the dipole (``--no-density-baseline`` skips it): the default density
model (kernel, overlap metric) fitted on the same N structures' coefficients, and the
dipole of its predicted density and the nuclei
(:func:`rhocalc.pyscf.properties.dipole_moment`), with the same % RMSE.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/tensor_learning.py [waters|g2] [--sizes 10 30 100]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import time
from typing import Dict, List

import numpy as np
from datasets import ELEMENTS, OUTPUT_DIR, PYSCF_OPTIONS, datasets, noisy_molecules
from learning_curve import splits
from rhocalc.batch import run_batch
from rhocalc.pyscf import basis_set, compute_targets
from rhocalc.pyscf.properties import dipole_moment
from rholearn import workflow
from rholearn.dataset import read_dataset
from rholearn.options import read_yaml

TARGETS = ("dipole", "polarizability")
RECORDED_OPTIONS = ("model", "solver", "loss", "hypers", "descriptor", "descriptor_options",
                    "model_options")


def tensor_dataset(name: str, n_waters: int) -> str:
    """Folder ``benchmarks/output/<name>_tensors`` of dataset ``name`` with dipoles and
    polarisabilities, computed if missing (a rerun resumes): ``waters``, ``n_waters``
    noisy waters; ``g2``, the structures of ``datasets.datasets()["g2"]``."""
    root = os.path.join(OUTPUT_DIR, f"{name}_tensors")
    options = dataclasses.replace(PYSCF_OPTIONS, properties=TARGETS)
    compute = functools.partial(compute_targets, options=options)
    if name == "waters":  # the measured folder was made without settings.json: kept so
        run_batch(noisy_molecules("H2O", n_waters), root, compute,
                  basis_set(options.auxbasis, ["H", "O"]), progress=True)
    else:
        run_batch(datasets()[name](), root, compute, basis_set(options.auxbasis, list(ELEMENTS)),
                  progress=True, settings=options.dataset_settings())
    return root


def fitted_options(run_dir: str) -> dict:
    """The options a run was fitted with (``RUN/options.yaml``, defaults completed) and
    the regularisation its direct solve chose: recorded with each row, since the
    defaults change between versions."""
    options = read_yaml(os.path.join(run_dir, workflow.OPTIONS_FILE))
    recorded = {key: options[key] for key in RECORDED_OPTIONS}
    with open(os.path.join(run_dir, workflow.SOLVE_FILE)) as f:
        recorded["regularisation"] = json.load(f)["regularisation"]
    return recorded


def learning_splits(name: str, root: str, sizes: List[int], n_test: int,
                    g2_test_molecules: int, seen: bool = False) -> Dict[int, dict]:
    """``{N: {"train": [...], "test": [...]}}``, nested training sets and one test set:
    waters, the last ``n_test`` structures for testing and the first N for training;
    g2, every copy of ``g2_test_molecules`` molecules for testing, never trained on
    (:func:`learning_curve.splits`, seed 0, as ``salted_comparison.py``), or with
    ``seen`` ``n_test`` random structures, other copies of whose molecules are trained on."""
    if name == "g2":
        return splits(name, read_dataset(root), sizes, n_test, 0, g2_test_molecules, 0,
                      unseen_molecules=not seen)
    n_total = max(sizes) + n_test
    test = list(range(n_total - n_test, n_total))
    return {size: {"train": list(range(size)), "test": test} for size in sizes}


def density_dipoles(root: str, run_dir: str, split: dict) -> dict:
    """Dipole % RMSE (of the spread around zero) of the density model's predicted
    densities on ``split["test"]``, the default density model fitted on ``split["train"]``."""
    test = split["test"]
    start = time.perf_counter()
    result = workflow.fit(root, run_dir, workflow.FitOptions(train={"verbose": False}),
                          split={"train": split["train"], "test": test}, overwrite=True)
    seconds = time.perf_counter() - start
    folder = read_dataset(root)
    errors, spreads = [], []
    for index, coefficients in workflow.predict_in_batches(result.model, folder.frames, test):
        predicted = dipole_moment(folder.frames[index], coefficients, folder.basis, PYSCF_OPTIONS)
        with open(os.path.join(root, str(index), "info.json")) as f:
            reference = np.array(json.load(f)["dipole_au"])
        errors.append(((predicted - reference) ** 2).sum())
        spreads.append((reference ** 2).sum())
    return {"target": "dipole from the density model", "n_train": len(split["train"]),
            "n_test": len(test), "fit_seconds": seconds,
            "rmse_percent": float(100 * np.sqrt(sum(errors) / sum(spreads))),
            "rmse_au": float(np.sqrt(sum(errors) / len(test))), "options": fitted_options(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?", choices=["waters", "g2"], default="waters")
    parser.add_argument("--sizes", nargs="+", type=int, default=[10, 30, 100])
    parser.add_argument("--n-test", type=int, default=20,
                        help="test structures (waters, or g2 with --g2-seen-molecules)")
    parser.add_argument("--g2-test-molecules", type=int, default=7,
                        help="g2 molecules whose copies are the test set")
    parser.add_argument("--g2-seen-molecules", action="store_true",
                        help="g2: test on --n-test random structures instead, other copies of "
                        "whose molecules are trained on (writes tensor_learning_g2_seen.json)")
    parser.add_argument("--no-density-baseline", action="store_true",
                        help="skip the dipoles of the density model's predicted densities")
    parser.add_argument("--out", help="JSON (default: benchmarks/output/tensor_learning.json for "
                        "waters, tensor_learning_<dataset>.json otherwise)")
    args = parser.parse_args()
    name = args.dataset
    seen = args.g2_seen_molecules and name == "g2"
    label = f"{name}_seen" if seen else name
    out = args.out or os.path.join(
        OUTPUT_DIR, "tensor_learning.json" if name == "waters" else f"tensor_learning_{label}.json")
    root = tensor_dataset(name, max(args.sizes) + args.n_test)
    points = learning_splits(name, root, args.sizes, args.n_test, args.g2_test_molecules, seen)
    runs = os.path.join(OUTPUT_DIR, "tensor_learning_runs", label)
    rows = []
    for target in TARGETS:
        for size, split in points.items():
            run_dir = os.path.join(runs, f"{target}_{size}")
            start = time.perf_counter()
            result = workflow.fit(
                root, run_dir, workflow.FitOptions(target=target, train={"verbose": False}),
                split={"train": split["train"], "test": split["test"]}, overwrite=True,
            )
            seconds = time.perf_counter() - start
            summary = workflow.evaluate(result.model, root, split["test"],
                                        progress=False)["summary"]
            rows.append({"target": target, "n_train": size, "n_test": len(split["test"]),
                         "fit_seconds": seconds, **summary, "options": fitted_options(run_dir)})
            print(f"{target:>15} N={size:4d}: test RMSE {summary['rmse_percent']:6.2f} % of the "
                  f"spread ({summary['rmse_au']:.4f} a.u.), fit {seconds:.1f} s", flush=True)
    if not args.no_density_baseline:
        for size, split in points.items():
            row = density_dipoles(root, os.path.join(runs, f"density_{size}"), split)
            rows.append(row)
            print(f"density-model dipole N={size:4d}: test RMSE {row['rmse_percent']:6.2f} % "
                  f"({row['rmse_au']:.4f} a.u.), fit {row['fit_seconds']:.1f} s", flush=True)
    print(f"\n{'target':>30} {'N':>4} {'RMSE %':>7} {'RMSE a.u.':>10} {'per lambda %':>20}")
    for row in rows:
        lambdas = ", ".join(f"{key[-1]}: {value:.2f}" for key, value in row.items()
                            if key.startswith("rmse_percent_lambda_"))
        print(f"{row['target']:>30} {row['n_train']:4d} {row['rmse_percent']:7.2f} "
              f"{row['rmse_au']:10.4f} {lambdas:>20}")
    folder = read_dataset(root)
    test = points[max(points)]["test"]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": platform.node(), "threads": os.environ.get("OMP_NUM_THREADS"),
                   "dataset": root, "method": "PBE/def2-svp, analytic polarisability",
                   "test_molecules": sorted({folder.frames[i].info["name"].rsplit("-", 1)[0]
                                             for i in test}),
                   "split": {str(size): split for size, split in points.items()},
                   "rows": rows}, f, indent=1)
    print(f"written {out}")


if __name__ == "__main__":
    main()
