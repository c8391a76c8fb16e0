"""A water molecule without symmetry and its PySCF targets, shared by the aims tests.

Without symmetry no coefficient vanishes, so a wrong sign of any function
(aims' Condon-Shortley sign included) changes the parsed targets.
"""

import ase.build
import numpy as np
import pytest

from rhocalc.pyscf import PySCFOptions, basis_set, compute_targets, run_scf
from rholearn.rotations import random_rotation


@pytest.fixture(scope="session")
def molecule():
    atoms = ase.build.molecule("H2O")
    atoms.positions[1] += [0.05, -0.03, 0.02]
    atoms.positions = atoms.positions @ np.asarray(random_rotation(7)).T
    return atoms


@pytest.fixture(scope="session")
def molecule_basis(molecule):
    return basis_set(PySCFOptions().auxbasis, molecule.get_chemical_symbols())


@pytest.fixture(scope="session")
def molecule_targets(molecule):
    """PBE/def2-svp, def2-universal-jkfit, Coulomb metric."""
    return compute_targets(molecule, PySCFOptions(), name="distorted water")


@pytest.fixture(scope="session")
def molecule_scf(molecule):
    return run_scf(molecule, PySCFOptions())
