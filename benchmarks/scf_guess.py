"""SCFs started from a predicted density against PySCF's own initial guesses.

A model is trained with :func:`rholearn.workflow.fit` and the default
:class:`~rholearn.workflow.FitOptions` (the kernel model, direct solve, 80 % of
the structures) on ``--n-structures`` clusters of 1, 2 and 3 waters
(:func:`small_clusters`; PBE/def2-svp fitted onto def2-universal-jkfit by
:func:`datasets.compute` into ``benchmarks/output/water_clusters_<n>``, computed
once and reused, as is the trained model in ``--run`` unless ``--retrain``). It is
tested on structures it never saw: ``--n-test`` clusters of the dataset's test
split and clusters of ``--clusters`` waters (randomly oriented waters at liquid
density, :func:`pyscf_targets.water_cluster`), larger than any training structure.

Every structure's SCF (PBE/def2-svp, ``--conv-tol``) runs from

- PySCF's guesses ``minao`` (its default), ``atom``, ``huckel``, ``sap`` and
  ``vsap`` (the time includes building the guess);
- ``model``: the model's prediction, turned into a density matrix by one
  diagonalisation of its Kohn-Sham matrix
  (:func:`rhocalc.pyscf.guess.density_guess`); the time is prediction + guess
  build + SCF. The model predicts one structure before the timings, so
  TorchScript's one-off compilation is not counted. Its one-shot and Harris
  energies come from a second, untimed guess on the SCF's own grid (the level-0
  grid of the timed guess is too coarse for energies);
- ``fitted``: the converged density fitted onto the model's auxiliary basis (the
  prediction of a perfect model), the same way but on the SCF's own grid: the
  floor of the model's cycles.

Reported per structure: SCF cycles and seconds per guess (CPU seconds of this
single-threaded process, which other processes on a shared machine do not inflate,
and wall seconds), the largest
difference of the converged energies from the ``minao`` one, the errors of the
one-shot energy (Kohn-Sham energy after the one diagonalisation) and of the
Harris-Foulkes energy of the predicted density against the converged energy
(mHa), and the error of the dipole computed from the predicted coefficients
(:func:`rhocalc.pyscf.properties.dipole_moment`) against the SCF's (Debye).
Everything in one process; set ``OMP_NUM_THREADS`` for the thread count.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/scf_guess.py --clusters 2 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import ase
import ase.build
import numpy as np
import pyscf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import datasets  # noqa: E402  (the benchmark datasets, next to this script)
from pyscf_targets import water_cluster  # noqa: E402

from rhocalc.pyscf import PySCFOptions  # noqa: E402
from rhocalc.pyscf.guess import GUESS_GRID_LEVEL, density_guess  # noqa: E402
from rhocalc.pyscf.fit import fit_density  # noqa: E402
from rhocalc.pyscf.molecule import ao_molecule, aux_molecule  # noqa: E402
from rhocalc.pyscf.order import vector_to_canonical  # noqa: E402
from rhocalc.pyscf.properties import DEBYE, dipole_moment  # noqa: E402
from rhocalc.pyscf.scf import make_mean_field, total_density_matrix  # noqa: E402
from rholearn import workflow  # noqa: E402
from rholearn.models import DensityModel  # noqa: E402
from rholearn.rotations import random_rotation  # noqa: E402

PYSCF_GUESSES = ("minao", "atom", "huckel", "sap", "vsap")


def small_clusters(n: int, sizes=(1, 2, 3), seed: int = 0, min_distance: float = 1.5):
    """``n`` clusters of ``sizes`` waters in turn (Angstrom): equilibrium waters,
    randomly rotated, centred on the points of a cubic grid of spacing drawn
    between 2.7 and 3.5 Angstrom, with Gaussian noise of 0.05 Angstrom on every
    coordinate; draws with atoms of different molecules closer than
    ``min_distance`` are redrawn. ``atoms.info["name"]`` is ``"cluster<size>-<i>"``."""
    rng = np.random.default_rng(seed)
    water = ase.build.molecule("H2O")
    water.positions -= water.get_center_of_mass()
    grid = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    frames = []
    while len(frames) < n:
        size = sizes[len(frames) % len(sizes)]
        spacing = rng.uniform(2.7, 3.5)
        cluster = ase.Atoms()
        for point in grid[:size] * spacing:
            molecule = water.copy()
            molecule.positions = molecule.positions @ random_rotation(int(rng.integers(2**31))).T
            cluster += ase.Atoms(molecule.numbers, molecule.positions + point)
        cluster.positions += rng.normal(scale=0.05, size=cluster.positions.shape)
        distances = np.linalg.norm(cluster.positions[:, None] - cluster.positions[None], axis=-1)
        other = np.arange(len(cluster))[:, None] // 3 != np.arange(len(cluster))[None] // 3
        if size > 1 and distances[other].min() < min_distance:
            continue
        cluster.info["name"] = f"cluster{size}-{len(frames)}"
        frames.append(cluster)
    return frames


def train(n_structures: int, run: str, retrain: bool):
    """The default model fitted on ``small_clusters(n_structures)`` (80 % train,
    10 % validation, 10 % test), or the one already in ``run`` unless ``retrain``;
    returns (model, split, frames)."""
    frames = small_clusters(n_structures)
    path = datasets.compute(f"water_clusters_{n_structures}", frames)
    if not retrain and os.path.exists(os.path.join(run, workflow.MODEL_FILE)):
        with open(os.path.join(run, workflow.SPLIT_FILE)) as f:
            split = json.load(f)
        print(f"reusing the model in {run} (--retrain to fit it again)", flush=True)
        return DensityModel.load(os.path.join(run, workflow.MODEL_FILE)), split, frames
    start = time.perf_counter()
    result = workflow.fit(path, run, workflow.FitOptions(), overwrite=True)
    print(f"trained on {len(result.split['train'])} clusters of 1-3 waters in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    return result.model, result.split, frames


def pyscf_guess_run(atoms, options: PySCFOptions, key: str):
    """Cycles, seconds and energy of an SCF from PySCF's guess ``key``, and the
    converged mean-field object."""
    mean_field = make_mean_field(ao_molecule(atoms, options.basis), options)
    mean_field.init_guess = key
    start, cpu = time.perf_counter(), time.process_time()
    mean_field.kernel()
    return {
        "cycles": int(mean_field.cycles), "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
        "energy": float(mean_field.e_tot), "converged": bool(mean_field.converged),
        "dipole": mean_field.dip_moment(unit="Debye", verbose=0).tolist(),
    }, mean_field


def model_guess_run(atoms, options: PySCFOptions, model) -> dict:
    """The SCF from the model's predicted density, with each step timed."""
    start, cpu = time.perf_counter(), time.process_time()
    prediction = model.predict([atoms])
    predict_seconds = time.perf_counter() - start
    guess = density_guess(
        atoms, prediction, model.basis, options, one_shot=False, grid_level=GUESS_GRID_LEVEL
    )
    mean_field = make_mean_field(ao_molecule(atoms, options.basis), options)
    start = time.perf_counter()
    mean_field.kernel(dm0=guess.density_matrix)
    scf_seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu
    start = time.perf_counter()
    energies = density_guess(atoms, prediction, model.basis, options)  # on the SCF's grid
    energy_seconds = time.perf_counter() - start
    return {
        "cycles": int(mean_field.cycles), "energy": float(mean_field.e_tot),
        "converged": bool(mean_field.converged),
        "predict_seconds": predict_seconds, "guess_seconds": guess.seconds,
        "scf_seconds": scf_seconds,
        "seconds": predict_seconds + guess.seconds + scf_seconds, "cpu_seconds": cpu_seconds,
        "energy_one_shot": energies.energy_one_shot, "energy_harris": energies.energy_harris,
        "energies_seconds": energy_seconds,
        "dipole": (dipole_moment(atoms, prediction, model.basis, options) * DEBYE).tolist(),
    }


def fitted_guess_run(atoms, options: PySCFOptions, converged, basis) -> dict:
    """The SCF from the converged density fitted onto the model's basis (the RI
    density: the best prediction this basis can hold); SCF cycles and seconds only."""
    aux = aux_molecule(atoms, basis)
    coefficients = fit_density(converged.mol, total_density_matrix(converged), aux)
    cpu = time.process_time()
    guess = density_guess(
        atoms, vector_to_canonical(coefficients, aux), basis, options, one_shot=False
    )
    mean_field = make_mean_field(ao_molecule(atoms, options.basis), options)
    start = time.perf_counter()
    mean_field.kernel(dm0=guess.density_matrix)
    return {
        "cycles": int(mean_field.cycles), "energy": float(mean_field.e_tot),
        "converged": bool(mean_field.converged),
        "seconds": guess.seconds + time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
        "energy_harris": guess.energy_harris,
    }


def benchmark(name: str, atoms, options: PySCFOptions, model) -> dict:
    runs, converged = {}, {}
    for key in PYSCF_GUESSES:
        runs[key], converged[key] = pyscf_guess_run(atoms, options, key)
    runs["model"] = model_guess_run(atoms, options, model)
    runs["fitted"] = fitted_guess_run(atoms, options, converged["minao"], model.basis)
    reference = runs["minao"]
    model_run = runs["model"]
    return {
        "name": name, "n_atoms": len(atoms), "runs": runs,
        "max_energy_difference_hartree": max(
            abs(run["energy"] - reference["energy"]) for run in runs.values()
        ),
        "all_converged": all(run["converged"] for run in runs.values()),
        "one_shot_error_mha": 1e3 * (model_run["energy_one_shot"] - reference["energy"]),
        "harris_error_mha": 1e3 * (model_run["energy_harris"] - reference["energy"]),
        "dipole_error_debye": float(np.linalg.norm(
            np.subtract(model_run["dipole"], reference["dipole"])
        )),
        "cycle_reduction_percent": 100 * (1 - model_run["cycles"] / reference["cycles"]),
    }


def print_table(rows) -> None:
    keys = (*PYSCF_GUESSES, "model", "fitted")
    print("\ncycles / CPU seconds per initial guess (model: prediction + guess + SCF; "
          "wall seconds in the JSON)")
    print(f"{'structure':<12s}{'atoms':>6s}" + "".join(f"{k:>14s}" for k in keys)
          + f"{'fewer':>8s}{'|dE| Ha':>10s}{'1-shot mHa':>11s}{'Harris mHa':>11s}{'dip D':>8s}")
    for row in rows:
        cells = "".join(
            f"{row['runs'][k]['cycles']:>5d} /{row['runs'][k]['cpu_seconds']:>7.2f}" for k in keys
        )
        print(f"{row['name']:<12s}{row['n_atoms']:>6d}{cells}"
              f"{row['cycle_reduction_percent']:>7.0f}%{row['max_energy_difference_hartree']:>10.1e}"
              f"{row['one_shot_error_mha']:>11.3f}{row['harris_error_mha']:>11.3f}"
              f"{row['dipole_error_debye']:>8.3f}")
    model = [row["runs"]["model"] for row in rows]
    print("model guess seconds: prediction "
          + ", ".join(f"{run['predict_seconds']:.3f}" for run in model)
          + "; guess build " + ", ".join(f"{run['guess_seconds']:.2f}" for run in model))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-structures", type=int, default=60,
                        help="clusters of 1-3 waters in the dataset (80 %% trained on)")
    parser.add_argument("--n-test", type=int, default=3,
                        help="unseen clusters of the dataset's test split")
    parser.add_argument("--clusters", type=int, nargs="*", default=[2, 4, 8],
                        help="water clusters of these many molecules")
    parser.add_argument("--conv-tol", type=float, default=1e-10, help="SCF energy tolerance (Ha)")
    parser.add_argument("--run", default=os.path.join(datasets.OUTPUT_DIR, "scf_guess_run"))
    parser.add_argument("--retrain", action="store_true", help="fit the model in --run again")
    parser.add_argument("--output", default=os.path.join(datasets.OUTPUT_DIR, "scf_guess.json"))
    args = parser.parse_args()

    model, split, frames = train(args.n_structures, args.run, args.retrain)
    options = PySCFOptions(conv_tol=args.conv_tol)
    cases = [(frames[i].info["name"], frames[i]) for i in split["test"][: args.n_test]]
    cases += [(f"cluster-{n}", water_cluster(n, seed=n)) for n in args.clusters]
    model.predict([cases[0][1]])  # TorchScript compilation, once per process
    rows = []
    for name, atoms in cases:
        rows.append(benchmark(name, atoms, options, model))
        print(f"{name}: done", flush=True)
        result = {
            "rows": rows, "options": options.to_dict(), "n_train": len(split["train"]),
            "pyscf": pyscf.__version__, "threads": os.environ.get("OMP_NUM_THREADS"),
            "machine": platform.platform(),
        }
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    print_table(rows)
    print(f"JSON: {args.output}")


if __name__ == "__main__":
    main()
