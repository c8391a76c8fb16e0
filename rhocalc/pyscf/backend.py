"""The PySCF backend of rholearn (:class:`rholearn.backends.Backend`).

Registered in ``pyproject.toml`` under the entry-point group
``rholearn.backends`` as ``pyscf``: rholearn finds it there for the real-space
errors of datasets made by :func:`rhocalc.pyscf.compute_targets` and for cube
files of densities in Gaussian bases, without importing rhocalc.
"""

from __future__ import annotations

from typing import Dict, Tuple

import ase
import numpy as np
from metatensor import TensorMap

from rholearn.backends import Backend
from rholearn.basis import BasisSet

from . import realspace
from .fit import function_integrals
from .guess import check_functional, density_guess
from .molecule import aux_molecule
from .options import PySCFOptions
from .order import vector_to_canonical
from .properties import DEBYE, dipole_moment
from .scf import run_scf

RECOGNISED_OPTIONS = ("xc", "basis", "auxbasis")
"""Options that a PySCF dataset without a ``"backend"`` entry records."""


class PySCFBackend(Backend):
    """Gaussian bases: PySCF grids, basis-function values and SCF reruns
    (:mod:`rhocalc.pyscf.realspace`)."""

    name = "pyscf"
    grid_levels = realspace.GRID_LEVELS

    def handles_basis(self, basis: BasisSet) -> bool:
        """Every radial function is a Gaussian contraction (has exponents)."""
        return all(shell.exponents for shells in basis.shells.values() for shell in shells)

    def wrote(self, options: Dict[str, object], basis: BasisSet) -> bool:
        """A Gaussian basis, and options with PySCF's ``xc``, ``basis`` and ``auxbasis``."""
        return self.handles_basis(basis) and all(key in options for key in RECOGNISED_OPTIONS)

    def integration_grid(self, atoms: ase.Atoms, level: int) -> Tuple[np.ndarray, np.ndarray]:
        return realspace.integration_grid(atoms, level)

    def density_at_points(
        self, coefficients: TensorMap, atoms: ase.Atoms, basis: BasisSet, points: np.ndarray
    ) -> np.ndarray:
        return realspace.density_at_points(coefficients, atoms, basis, points)

    def function_integrals(self, atoms: ase.Atoms, basis: BasisSet) -> np.ndarray:
        """:func:`rhocalc.pyscf.fit.function_integrals`, in the canonical order."""
        aux = aux_molecule(atoms, basis)
        return vector_to_canonical(function_integrals(aux), aux)

    def reference_density(
        self, atoms: ase.Atoms, options: Dict[str, object], points: np.ndarray, name: str
    ) -> Tuple[np.ndarray, float]:
        """Reruns the SCF with ``PySCFOptions(**options)``."""
        scf = run_scf(atoms, PySCFOptions(**options), name=name)
        return realspace.scf_density_at_points(scf, points), float(scf.mol.nelectron)

    def real_space_l1_percent(
        self, density_a: np.ndarray, density_b: np.ndarray, weights: np.ndarray,
        n_electrons: float,
    ) -> float:
        return realspace.real_space_l1_percent(density_a, density_b, weights, n_electrons)

    def density_properties(
        self, atoms: ase.Atoms, coefficients: TensorMap, basis: BasisSet,
        options: Dict[str, object],
    ) -> Dict[str, object]:
        """:func:`rhocalc.pyscf.guess.density_guess` (energies ``None`` for a
        functional it refuses: Hartree-Fock, hybrids, meta-GGAs) and
        :func:`rhocalc.pyscf.properties.dipole_moment`."""
        options = PySCFOptions(**options)
        energies = {"energy_one_shot_hartree": None, "energy_harris_hartree": None}
        try:
            check_functional(options.xc, "")
        except ValueError:
            pass
        else:
            guess = density_guess(atoms, coefficients, basis, options)
            energies = {
                "energy_one_shot_hartree": guess.energy_one_shot,
                "energy_harris_hartree": guess.energy_harris,
            }
        dipole = dipole_moment(atoms, coefficients, basis, options) * DEBYE
        return {**energies, "dipole_debye": dipole.tolist()}

    def write_cube(
        self, path: str, atoms: ase.Atoms, coefficients: TensorMap, basis: BasisSet,
        spacing: float, progress: bool = False,
    ) -> float:
        return realspace.write_cube(path, atoms, coefficients, basis, spacing=spacing,
                                    progress=progress)
