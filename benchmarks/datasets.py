"""Benchmark datasets: strongly distorted waters and methanols, distorted H/C/N/O molecules of g2.

All are computed with :func:`rhocalc.batch.run_batch` and
:func:`rhocalc.pyscf.compute_targets` (PBE/def2-svp fitted onto
def2-universal-jkfit, Coulomb metric) into ``benchmarks/output/<name>`` and
reused (a rerun skips the finished structures):

- ``waters``: :func:`noisy_molecules` of water, an equilibrium water with Gaussian
  noise of ``sigma`` Angstrom on every coordinate (O-H distances about 0.6-1.5
  Angstrom for the default 0.1), randomly rotated;
- ``methanol``: the same for methanol (CH3OH, three elements, six atoms), 0.1
  Angstrom of noise (about 5 s of PySCF per structure on one core);
- ``g2``: :func:`g2_copies`, every closed-shell molecule of
  ``ase.collections.g2`` with at least two atoms, only H, C, N and O, and at
  most ``max_heavy`` non-hydrogen atoms, each in ``copies`` randomly
  displaced (Gaussian noise of ``sigma`` Angstrom) and rotated copies.

Usage (1 PySCF process with 1 OpenMP thread by default)::

    OMP_NUM_THREADS=1 python benchmarks/datasets.py waters methanol g2 [--workers 1]
"""

from __future__ import annotations

import argparse
import functools
import os
from typing import Callable, Dict, List, Sequence

import ase
import ase.build
import numpy as np
from ase.collections import g2

from rhocalc.batch import run_batch
from rhocalc.pyscf import PySCFOptions, basis_set, compute_targets
from rholearn.dataset import read_dataset, read_failures
from rholearn.rotations import random_rotation

OUTPUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
"""Git-ignored folder of the benchmarks' results."""

PYSCF_OPTIONS = PySCFOptions(xc="PBE", basis="def2-svp", auxbasis="def2-universal-jkfit")
ELEMENTS = ("H", "C", "N", "O")


def noisy_molecules(molecule: str, n: int, sigma: float = 0.1, seed: int = 0,
                    min_distance: float = 0.5, label: str = None) -> List[ase.Atoms]:
    """``n`` copies of ``ase.build.molecule(molecule)`` (its equilibrium geometry)
    with Gaussian noise of standard deviation ``sigma`` (Angstrom) on every
    Cartesian coordinate, randomly rotated. Draws with an interatomic distance
    below ``min_distance`` (Angstrom) are redrawn. ``atoms.info["name"]`` is
    ``"<label>-<i>"`` (``label`` defaults to ``molecule``)."""
    rng = np.random.default_rng(seed)
    base = ase.build.molecule(molecule)
    pairs = np.triu_indices(len(base), 1)
    frames = []
    while len(frames) < n:
        positions = base.positions + rng.normal(scale=sigma, size=base.positions.shape)
        distances = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
        if distances[pairs].min() < min_distance:
            continue
        rotation = random_rotation(seed * 100003 + len(frames))
        atoms = ase.Atoms(base.numbers, positions=positions @ rotation.T)
        atoms.info["name"] = f"{label or molecule}-{len(frames)}"
        frames.append(atoms)
    return frames


def g2_molecules(max_heavy: int = 6) -> List[str]:
    """Names of the closed-shell g2 molecules made of H, C, N, O only, with at
    least two atoms and at most ``max_heavy`` non-hydrogen atoms, sorted."""
    names = []
    for name in g2.names:
        atoms = g2[name]
        symbols = atoms.get_chemical_symbols()
        if len(atoms) < 2 or not set(symbols) <= set(ELEMENTS):
            continue
        if abs(atoms.get_initial_magnetic_moments().sum()) > 1e-8 or sum(atoms.numbers) % 2:
            continue
        if sum(s != "H" for s in symbols) <= max_heavy:
            names.append(name)
    return sorted(names)


def g2_copies(names: Sequence[str], copies: int, sigma: float = 0.07, seed: int = 0):
    """``copies`` displaced (Gaussian noise of ``sigma`` Angstrom on every
    coordinate) and randomly rotated copies of each g2 molecule of ``names``,
    molecule by molecule; ``atoms.info["name"]`` is ``"<molecule>-<copy>"``."""
    rng = np.random.default_rng(seed)
    frames = []
    for name in names:
        base = g2[name].positions
        for copy in range(copies):
            positions = base + rng.normal(scale=sigma, size=base.shape)
            rotation = random_rotation(seed * 100003 + len(frames))
            atoms = ase.Atoms(g2[name].numbers, positions=positions @ rotation.T)
            atoms.info["name"] = f"{name}-{copy}"
            frames.append(atoms)
    return frames


def compute(name: str, frames, workers: int = 1) -> str:
    """Targets of ``frames`` into ``benchmarks/output/<name>`` (resumable); returns the path.

    A complete dataset is used as it is (not rechecked against today's PySCF options)."""
    path = os.path.join(OUTPUT_DIR, name)
    if os.path.isdir(path) and len(read_dataset(path).indices) + len(read_failures(path)) == len(frames):
        return path
    run_batch(
        frames, path, functools.partial(compute_targets, options=PYSCF_OPTIONS),
        basis_set(PYSCF_OPTIONS.auxbasis, list(ELEMENTS)), n_workers=workers,
        settings=PYSCF_OPTIONS.dataset_settings(),
    )
    return path


WATERS = {"n": 130, "sigma": 0.1, "seed": 0}
METHANOL = {"n": 130, "sigma": 0.1, "seed": 0}
G2 = {"max_heavy": 3, "copies": 4, "sigma": 0.07, "seed": 0}


def datasets() -> Dict[str, Callable[[], List[ase.Atoms]]]:
    """The benchmark datasets by name: a function returning their structures."""
    return {
        "waters": lambda: noisy_molecules("H2O", WATERS["n"], WATERS["sigma"], WATERS["seed"],
                                          label="water"),
        "methanol": lambda: noisy_molecules("CH3OH", METHANOL["n"], METHANOL["sigma"],
                                            METHANOL["seed"], label="methanol"),
        "g2": lambda: g2_copies(g2_molecules(G2["max_heavy"]), G2["copies"], G2["sigma"], G2["seed"]),
    }


def dataset_path(name: str) -> str:
    """Folder of benchmark dataset ``name``."""
    return os.path.join(OUTPUT_DIR, name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", choices=sorted(datasets()))
    parser.add_argument("--workers", type=int, default=1, help="PySCF processes")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for name in args.names:
        frames = datasets()[name]()
        print(f"{name}: {len(frames)} structures -> {dataset_path(name)}", flush=True)
        compute(name, frames, args.workers)


if __name__ == "__main__":
    main()
