"""rholearn against SALTED: learning curves on the same targets, split and error, in one run.

SALTED (https://github.com/andreagrisafi/SALTED) runs in its own Python
environment (``--salted-python``); this script writes its input files from a
:mod:`datasets` target folder (PBE/def2-svp fitted onto def2-universal-jkfit),
runs SALTED's training pipeline and its prediction as subprocesses, and fits
rholearn on the same structures in this process.

Split (:func:`learning_curve.splits`, no validation structures): a fixed test
set (``--n-test`` 20 structures; for ``g2`` every copy of
``--g2-test-molecules`` molecules never trained on) and nested training sets,
the first N of the rest (``--train-sizes`` 10 30 100). With ``--small-to-large``
(:func:`learning_curve.small_to_large_splits`) the test set is every copy of the
molecules with the most non-hydrogen atoms (g2: 3) and the training sets come from
the smaller ones; results go to ``salted_<dataset>_small_to_large.json``.

- rholearn: :func:`rholearn.workflow.fit` with the default
  ``FitOptions()`` and ``split={"train": first N, "val": [], "test": test}``;
  timed from the call to the saved model (descriptors, references, solve).
- SALTED: the recipe of its PySCF water example
  (``example/water_monomer_PySCF/inp.yaml``): lambda-SOAP from two rho
  expansions (``rcut`` 4 Angstrom, ``sig`` 0.3, ``nrad`` 8, ``nang`` 6, every
  element as neighbour), features sparsified to ``ncut`` 1000 on ``nsamples``
  100 structures, ``Menv`` 100 reference environments, ``zeta`` 2, SALTED's
  default regularisation 1e-6, with the training structures alone in
  ``system.filename`` (``nsamples`` and ``Menv`` are capped at the training
  structures and atoms available). Timed: its training pipeline
  (``initialize``, ``sparse_selection``, ``sparse_descriptor``, ``rkhs_projector``,
  ``rkhs_vector``, ``hessian_matrix``, ``solve_regression``, each module's
  ``build()`` in one process, numba compilation included; ``train_seconds`` is
  that process's wall time); its ``prediction`` of the test structures is timed
  apart.

SALTED's files come from the rholearn dataset: per training structure
``coefficients/coefficients_conf<i>.npy`` and ``overlaps/overlap_conf<i>.npy``,
the coefficient vector and dense overlap in rholearn's canonical order
(:mod:`rholearn.basis`: atom, l, n, m = -l..l in featomic's real harmonics,
p functions as (y, z, x)), which is also the order SALTED's own PySCF route
(``salted.pyscf.dm2df``) writes; its basis entry (``lmax``, ``nmax`` per element)
is written from the dataset's ``basis.json``.

Error, the same for both codes on the same test structures: SALTED's % RMSE,
``100 sqrt(sum_s dc_s^T S_s dc_s / sum_s (c_s - b)^T S_s (c_s - b))`` with
``dc = c_predicted - c_reference``, ``S`` the auxiliary overlap and ``b`` the
per-element mean ``l = 0`` coefficients of the N training structures
(:func:`rholearn.metrics.error_summary` via :func:`rholearn.workflow.evaluate`
for rholearn; :func:`rholearn.metrics.overlap_norms` on SALTED's predicted
coefficients, read back into the rholearn layout). SALTED's own formula
(``salted.validation``, on flat vectors with its averages) is computed too, as a
check of the conversion (``salted_own_rmse_percent``).

Prints both learning curves side by side with ratios (rholearn / SALTED),
writes JSON (``--output``) and a figure per dataset. SALTED's results are kept
in the JSON: ``--skip-salted`` reruns rholearn alone and reuses them (the split
must be the same); ``--skip-rholearn`` runs SALTED alone and keeps rholearn's.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/datasets.py waters methanol g2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/salted_comparison.py waters \\
        --salted-python /path/to/salted-venv/bin/python
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/salted_comparison.py waters --skip-salted
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import ase.data
import ase.io
import numpy as np
import pyscf
import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import datasets  # noqa: E402  (the benchmark datasets, next to this script)
from learning_curve import small_to_large_splits, splits, training_seconds  # noqa: E402

from rholearn import layout, workflow  # noqa: E402
from rholearn.data import TargetFile  # noqa: E402
from rholearn.dataset import read_dataset  # noqa: E402
from rholearn.metrics import error_summary, overlap_norms  # noqa: E402
from rholearn.models import Baseline  # noqa: E402

SALTED_NAME = "rholearn"
SALTED_TRAINING = ("initialize", "sparse_selection", "sparse_descriptor", "rkhs_projector",
                   "rkhs_vector", "hessian_matrix", "solve_regression")
SALTED_RECIPE = {
    "rep": {"type": "rho", "rcut": 4.0, "sig": 0.3, "nrad": 8, "nang": 6},
    "sparsify": {"nsamples": 100, "ncut": 1000},
    "gpr": {"z": 2.0, "Menv": 100, "regul": 1e-6, "trainfrac": 1.0, "trainsel": "sequential"},
}
"""SALTED's PySCF water example (commit 4e674d5); ``regul`` is SALTED's default."""

SALTED_DRIVER = """
import importlib, json, sys, time
from salted.basis_client import BasisClient
name, basis, steps = json.loads(sys.argv[1])
BasisClient().write(name, basis, force_overwrite=True)
seconds = {}
for step in steps:
    start = time.perf_counter()
    importlib.import_module("salted." + step).build()
    seconds[step] = time.perf_counter() - start
print("SECONDS " + json.dumps(seconds))
"""
"""Run by SALTED's Python in its work folder: registers the basis, then times each step."""


def salted_inputs(work: str, folder, train: List[int], test: List[int]) -> Dict[str, object]:
    """Write SALTED's inputs for training on ``train`` and predicting ``test`` into ``work``.

    Returns the ``inp.yaml`` settings (a dict) and writes ``train.xyz``,
    ``test.xyz``, ``coefficients/coefficients_conf<i>.npy`` and
    ``overlaps/overlap_conf<i>.npy`` (``i``: position in ``train``).
    """
    for sub in ("coefficients", "overlaps"):
        os.makedirs(os.path.join(work, sub))
    for position, index in enumerate(train):
        numbers = folder.frames[index].numbers
        root = layout.structure_dir(folder.root, index)
        coefficients = layout.load(os.path.join(root, layout.COEFFICIENTS_FILE))
        overlap = layout.load(os.path.join(root, layout.OVERLAP_FILE))
        np.save(os.path.join(work, "coefficients", f"coefficients_conf{position}.npy"),
                layout.tensormap_to_vector(coefficients, numbers, folder.basis))
        np.save(os.path.join(work, "overlaps", f"overlap_conf{position}.npy"),
                layout.pair_tensormap_to_matrix(overlap, numbers, folder.basis))
    for name, indices in (("train", train), ("test", test)):
        ase.io.write(os.path.join(work, f"{name}.xyz"),
                     [_plain(folder.frames[i]) for i in indices], format="extxyz")
    species = sorted({s for i in train + test for s in folder.frames[i].get_chemical_symbols()},
                     key=lambda s: ase.data.atomic_numbers[s])
    n_atoms = sum(len(folder.frames[i]) for i in train)
    rep = dict(SALTED_RECIPE["rep"], neighspe=species)
    return {
        "salted": {"saltedname": SALTED_NAME, "saltedpath": "./"},
        "system": {"filename": "./train.xyz", "species": species},
        "qm": {"path2qm": "./", "qmcode": "pyscf", "dfbasis": _basis_name(folder),
               "qmbasis": "def2-svp", "functional": "pbe"},
        "prediction": {"filename": "./test.xyz", "predname": "test"},
        "descriptor": {"rep1": rep, "rep2": rep, "sparsify": {
            "nsamples": min(SALTED_RECIPE["sparsify"]["nsamples"], len(train)),
            "ncut": SALTED_RECIPE["sparsify"]["ncut"]}},
        "gpr": dict(SALTED_RECIPE["gpr"], Menv=min(SALTED_RECIPE["gpr"]["Menv"], n_atoms),
                    Ntrain=len(train)),
    }


def _plain(atoms: ase.Atoms) -> ase.Atoms:
    """Symbols and positions only (Angstrom), as SALTED reads them."""
    return ase.Atoms(atoms.numbers, positions=atoms.positions)


def _basis_name(folder) -> str:
    return f"rholearn-{folder.basis.name}"


def salted_basis(folder, species: List[str]) -> Dict[str, dict]:
    """SALTED's basis entry: ``lmax`` and radial functions per ``l`` for each element."""
    entry = {}
    for symbol in species:
        counts = folder.basis.n_radial(symbol)
        lmax = max(counts)
        entry[symbol] = {"lmax": lmax, "nmax": [counts.get(l, 0) for l in range(lmax + 1)]}
    return entry


def run_salted(python: str, work: str, folder, inputs: Dict[str, object], steps) -> Dict[str, float]:
    """Run SALTED ``steps`` in ``work`` in one process with one thread.

    Returns the seconds of each step's ``build()`` and ``wall``, the whole
    process (Python start and imports included)."""
    with open(os.path.join(work, "inp.yaml"), "w") as f:
        yaml.safe_dump(inputs, f, sort_keys=False)
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    argument = json.dumps([_basis_name(folder), salted_basis(folder, inputs["system"]["species"]),
                           list(steps)])
    log = os.path.join(work, "salted.log")
    start = time.perf_counter()
    with open(log, "a") as out:
        process = subprocess.run([python, "-c", SALTED_DRIVER, argument], cwd=work, env=env,
                                 stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    with open(log) as f:
        lines = [line for line in f if line.startswith("SECONDS ")]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"SALTED steps {list(steps)} failed in '{work}' (exit "
                           f"{process.returncode}): see '{log}'")
    return dict(json.loads(lines[-1][len("SECONDS "):]), wall=wall)


def salted_point(python: str, work: str, folder, split) -> dict:
    """Train SALTED on ``split["train"]``, predict ``split["test"]``, return errors and times."""
    train, test = split["train"], split["test"]
    if os.path.exists(work):
        shutil.rmtree(work)
    inputs = salted_inputs(work, folder, train, test)
    training = run_salted(python, work, folder, inputs, SALTED_TRAINING)
    prediction = run_salted(python, work, folder, inputs, ["prediction"])
    gpr = inputs["gpr"]
    predicted = os.path.join(work, f"predictions_{SALTED_NAME}_test",
                             f"M{gpr['Menv']}_zeta{gpr['z']}",
                             f"N{len(train)}_reg{int(np.log10(gpr['regul']))}")
    as_rholearn = os.path.join(work, "as-rholearn")  # predictions in the rholearn layout
    for position, index in enumerate(test):
        vector = np.loadtxt(os.path.join(predicted, f"COEFFS-{position + 1}.dat"))
        numbers = folder.frames[index].numbers
        os.makedirs(layout.structure_dir(as_rholearn, index))
        layout.save(os.path.join(layout.structure_dir(as_rholearn, index), layout.COEFFICIENTS_FILE),
                    layout.vector_to_tensormap(vector, numbers, folder.basis, index))
    return {
        "n_train": len(train), "n_test": len(test),
        "rmse_percent": rmse_percent(folder, train, test, as_rholearn),
        "salted_own_rmse_percent": salted_own_rmse(work, folder, test, predicted, inputs),
        "train_seconds": training["wall"], "steps_seconds": training,
        "predict_seconds": prediction["wall"], "inputs": inputs,
    }


def rmse_percent(folder, train: List[int], test: List[int], predicted_root: str) -> float:
    """% RMSE (:mod:`rholearn.metrics`) of the coefficients under ``predicted_root``."""
    files = {name: TargetFile(root, file_name, torch.float64, torch.device("cpu"))
             for name, root, file_name in (
                 ("predicted", predicted_root, layout.COEFFICIENTS_FILE),
                 ("reference", folder.root, layout.COEFFICIENTS_FILE),
                 ("overlap", folder.root, layout.OVERLAP_FILE))}
    baseline = Baseline.from_coefficients(files["reference"](i) for i in train).means
    norms = [overlap_norms(files["predicted"](i), files["reference"](i), files["overlap"](i),
                           baseline) for i in test]
    return error_summary(norms)["rmse_percent"]


def salted_own_rmse(work: str, folder, test: List[int], predicted: str, inputs) -> float:
    """SALTED's ``validation`` formula on flat vectors, with SALTED's own averages."""
    averages = {s: np.load(os.path.join(work, "coefficients", "averages", f"averages_{s}.npy"))
                for s in inputs["system"]["species"]}
    error = spread = 0.0
    for position, index in enumerate(test):
        atoms = folder.frames[index]
        root = layout.structure_dir(folder.root, index)
        reference = layout.tensormap_to_vector(
            layout.load(os.path.join(root, layout.COEFFICIENTS_FILE)), atoms.numbers, folder.basis)
        overlap = layout.pair_tensormap_to_matrix(
            layout.load(os.path.join(root, layout.OVERLAP_FILE)), atoms.numbers, folder.basis)
        mean = np.zeros_like(reference)
        for i, (atom, l, n, _) in enumerate(folder.basis.functions(atoms.get_chemical_symbols())):
            if l == 0:
                mean[i] = averages[atoms[atom].symbol][n]
        difference = np.loadtxt(os.path.join(predicted, f"COEFFS-{position + 1}.dat")) - reference
        error += difference @ overlap @ difference
        spread += (reference - mean) @ overlap @ (reference - mean)
    return float(100 * np.sqrt(error / spread))


def default_fit(dataset: str, run_dir: str, split, options: workflow.FitOptions):
    """``options`` fitted on the training structures of ``split`` (no validation
    structures): ``(result, seconds of the whole fit, test % RMSE, solve.json record)``."""
    start = time.perf_counter()
    result = workflow.fit(dataset, run_dir, options,
                          split={"train": split["train"], "val": [], "test": split["test"]})
    fit_seconds = time.perf_counter() - start
    errors = workflow.evaluate(result.model, dataset, split["test"], real_space=False, progress=False)
    with open(os.path.join(run_dir, workflow.SOLVE_FILE)) as f:
        solve = json.load(f)
    return result, fit_seconds, errors["summary"]["rmse_percent"], solve


def rholearn_point(dataset: str, run_dir: str, split) -> dict:
    """The default fit (no validation structures), its test % RMSE and its times."""
    result, fit_seconds, rmse, solve = default_fit(dataset, run_dir, split, workflow.FitOptions())
    return {"n_train": len(split["train"]), "n_test": len(split["test"]), "rmse_percent": rmse,
            "fit_seconds": fit_seconds, "train_seconds": training_seconds(result), "solve": solve}


def print_table(name: str, salted: Dict[str, dict], rholearn: Dict[str, dict]) -> None:
    print(f"\n{name}: test % RMSE and training seconds (1 thread each; rholearn: whole fit)")
    print(f"{'N':>4}  {'SALTED %':>9}  {'rholearn %':>10}  {'ratio':>6}  "
          f"{'SALTED s':>9}  {'rholearn s':>10}  {'ratio':>6}  converged  hypers searched: kept")
    for n in sorted(set(salted) | set(rholearn), key=int):
        s, r = salted.get(n, {}), rholearn.get(n, {})
        cells = [f"{n:>4}"]
        for key in ("rmse_percent", "time"):
            a = s.get("train_seconds") if key == "time" else s.get(key)
            b = r.get("fit_seconds") if key == "time" else r.get(key)
            cells += [_cell(a, 9), _cell(b, 10), _cell(b / a if a and b else None, 6, ".2f")]
        cells.append(f"{str(r.get('solve', {}).get('converged', '-')):>9}")
        search = r.get("solve", {}).get("search")
        cells.append("-" if search is None else f"{len(search['trials'])}: {search['chosen'] or 'requested'}")
        print("  ".join(cells))


def _cell(value, width: int, spec: str = ".2f") -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def learning_curve_axes(axes, xticks: List[int], ylabel: str) -> None:
    """Logarithmic matplotlib ``axes`` against the training structures, with ticks at
    ``xticks`` and at 1, 2, 3, 5 times powers of ten, labelled as plain numbers."""
    from matplotlib import ticker

    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xticks(xticks)
    axes.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 3, 5)))
    for axis in (axes.xaxis, axes.yaxis):
        axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        axis.set_minor_formatter(ticker.NullFormatter())
    axes.set_xlabel("training structures")
    axes.set_ylabel(ylabel)


def save_figure(figure, path: str) -> None:
    """Write a matplotlib ``figure`` to ``path`` (PNG, 120 dpi) and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot(name: str, salted: Dict[str, dict], rholearn: Dict[str, dict], path: str) -> None:
    """Test % RMSE and training time against N, both codes, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (errors, times) = plt.subplots(1, 2, figsize=(8, 3.4))
    for label, rows, time_key in (("SALTED", salted, "train_seconds"),
                                  ("rholearn (default fit)", rholearn, "fit_seconds")):
        n = sorted(rows, key=int)
        if not n:
            continue
        x = [int(k) for k in n]
        errors.plot(x, [rows[k]["rmse_percent"] for k in n], marker="o", label=label)
        times.plot(x, [rows[k][time_key] for k in n], marker="o", label=label)
    for axes, ylabel in ((errors, "test % RMSE"), (times, "training seconds (1 thread)")):
        learning_curve_axes(axes, sorted({int(k) for rows in (salted, rholearn) for k in rows}), ylabel)
    errors.set_title(name, fontsize=10)
    errors.legend(fontsize=8)
    save_figure(figure, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=sorted(datasets.datasets()))
    parser.add_argument("--salted-python", default=os.environ.get("SALTED_PYTHON"),
                        help="Python of an environment with SALTED installed (or $SALTED_PYTHON)")
    parser.add_argument("--skip-salted", action="store_true",
                        help="reuse SALTED's results from --output, run rholearn only")
    parser.add_argument("--skip-rholearn", action="store_true", help="run SALTED only")
    parser.add_argument("--train-sizes", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--n-test", type=int, default=20)
    parser.add_argument("--g2-test-molecules", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small-to-large", action="store_true",
                        help="test on the molecules with the most heavy atoms, train on the others")
    parser.add_argument("--work", default=os.path.join(datasets.OUTPUT_DIR, "salted"),
                        help="SALTED's work folders: WORK/<dataset>/N<n>")
    parser.add_argument("--output", help="JSON (default: benchmarks/output/salted_<dataset>.json); "
                        "the figure goes next to it")
    args = parser.parse_args()
    name = args.dataset + ("_small_to_large" if args.small_to_large else "")
    output = args.output or os.path.join(datasets.OUTPUT_DIR, f"salted_{name}.json")
    torch.set_num_threads(1)
    pyscf.lib.num_threads(1)
    dataset = datasets.compute(args.dataset, datasets.datasets()[args.dataset]())
    folder = read_dataset(dataset)
    if args.small_to_large:
        points = small_to_large_splits(folder, args.train_sizes, args.seed)
    else:
        points = splits(args.dataset, folder, args.train_sizes, args.n_test, 0,
                        args.g2_test_molecules, args.seed, unseen_molecules=args.dataset == "g2")
    record = {"dataset": args.dataset, "split": {str(n): s for n, s in points.items()},
              "salted": {}, "rholearn": {}, "salted_recipe": SALTED_RECIPE}
    for code, skipped in (("salted", args.skip_salted), ("rholearn", args.skip_rholearn)):
        if skipped and os.path.exists(output):  # the other code's earlier results are kept
            with open(output) as f:
                cached = json.load(f)
            if cached["split"] != record["split"]:
                raise ValueError(f"'{output}' holds results for another split: rerun without "
                                 f"--skip-{code}")
            record[code] = cached[code]
    if not args.skip_salted and not args.salted_python:
        parser.error("SALTED runs in its own environment: pass --salted-python (or set "
                     "$SALTED_PYTHON), or --skip-salted to reuse earlier SALTED results")

    def write():
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            json.dump(record, f, indent=1)

    with tempfile.TemporaryDirectory(prefix="salted-comparison-") as runs:
        for n, split in points.items():
            if not args.skip_salted:
                print(f"{args.dataset}: SALTED, {n} training structures", flush=True)
                work = os.path.join(args.work, name, f"N{n}")
                record["salted"][str(n)] = salted_point(args.salted_python, work, folder, split)
                write()
            if not args.skip_rholearn:
                print(f"{args.dataset}: rholearn, {n} training structures", flush=True)
                record["rholearn"][str(n)] = rholearn_point(dataset, os.path.join(runs, f"N{n}"),
                                                            split)
                write()
            print_table(name, {k: v for k, v in record["salted"].items() if k == str(n)},
                        {k: v for k, v in record["rholearn"].items() if k == str(n)})
    print_table(name, record["salted"], record["rholearn"])
    figure = os.path.splitext(output)[0] + ".png"
    plot(name, record["salted"], record["rholearn"], figure)
    print(f"wrote {output} and {figure}")


if __name__ == "__main__":
    main()
