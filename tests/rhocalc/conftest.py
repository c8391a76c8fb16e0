"""Session-wide PySCF calculations shared by the rhocalc tests (computed once)."""

import ase.build
import pytest

from rhocalc.pyscf import PySCFOptions, basis_set, compute_targets, run_scf


@pytest.fixture(scope="session")
def water():
    return ase.build.molecule("H2O")


@pytest.fixture(scope="session")
def water_basis(water):
    return basis_set(PySCFOptions().auxbasis, water.get_chemical_symbols())


@pytest.fixture(scope="session")
def water_targets(water):
    """PBE/def2-svp, def2-universal-jkfit, Coulomb metric, no constraint."""
    return compute_targets(water, PySCFOptions(), name="water")


@pytest.fixture(scope="session")
def water_scf(water):
    """The converged PBE/def2-svp SCF of water (the one behind ``water_targets``)."""
    return run_scf(water, PySCFOptions())
