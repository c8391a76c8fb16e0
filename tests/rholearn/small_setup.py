"""Cheap settings shared by the data and training tests: HF/sto-3g targets fitted
onto def2-universal-jfit, and a small lambda-SOAP (Angstrom)."""

import dataclasses
import functools

import ase.build

from rhocalc.batch import run_batch
from rhocalc.pyscf import PySCFOptions, basis_set, compute_targets
from rhocalc.structures import distorted_waters

OPTIONS = PySCFOptions(xc="HF", basis="sto-3g", auxbasis="def2-universal-jfit", grid_level=0)
HYPERS = {
    "cutoff": {"radius": 3.0, "smoothing": {"type": "ShiftedCosine", "width": 0.5}},
    "density": {"type": "Gaussian", "width": 0.3},
    "basis": {
        "type": "TensorProduct", "max_angular": 2, "radial": {"type": "Gto", "max_radial": 2}
    },
}


def water_dataset(root: str, n: int, seed: int) -> str:
    """A dataset at ``root`` of ``n`` distorted waters (``rhocalc.structures.distorted_waters``)."""
    run_batch(distorted_waters(n, seed=seed), root, functools.partial(compute_targets, options=OPTIONS),
              basis_set(OPTIONS.auxbasis, ["H", "O"]), progress=False)
    return root


def waters_and_methanes(root: str, n: int, methane_every: int, rattle: float) -> str:
    """A dataset at ``root`` of ``n`` rattled molecules (``rattle`` Angstrom): a methane
    where ``seed % methane_every == 0``, else a water."""
    frames = []
    for seed in range(n):
        atoms = ase.build.molecule("H2O" if seed % methane_every else "CH4")
        atoms.rattle(rattle, seed=seed)
        frames.append(atoms)
    run_batch(frames, root, functools.partial(compute_targets, options=OPTIONS),
              basis_set(OPTIONS.auxbasis, ["H", "C", "O"]), progress=False)
    return root


def tensor_waters(root: str, n: int, rattle: float = 0.1) -> str:
    """A dataset at ``root`` of ``n`` rattled, randomly rotated waters with their
    HF/sto-3g dipoles and polarisabilities (``--properties dipole,polarizability``)."""
    from rholearn.rotations import random_rotation

    frames = []
    for seed in range(n):
        atoms = ase.build.molecule("H2O")
        atoms.rattle(rattle, seed=seed)
        atoms.positions = atoms.positions @ random_rotation(seed).T
        frames.append(atoms)
    options = dataclasses.replace(OPTIONS, properties=("dipole", "polarizability"))
    run_batch(frames, root, functools.partial(compute_targets, options=options),
              basis_set(options.auxbasis, ["H", "O"]), progress=False)
    return root
