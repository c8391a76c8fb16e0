"""Densities in real space, for Gaussian (PySCF-representable) bases.

Units: points and cube boxes in Angstrom (as ase), densities in
electrons/Bohr^3, integration weights in Angstrom^3. Integrals over a grid
convert: ``sum(weights * rho) / BOHR**3`` electrons. Lengths are converted with
PySCF's Bohr radius ``pyscf.data.nist.BOHR`` (Angstrom), the one its molecules
use (ase's differs in the 10th digit).

Comparing a predicted density with the SCF one on the same grid::

    scf = rhocalc.pyscf.run_scf(atoms, options)            # reruns the SCF
    points, weights = integration_grid(atoms, level=3)
    rho_scf = scf_density_at_points(scf, points)
    rho_ml = density_at_points(predicted_coefficients, atoms, basis, points)
    error = real_space_l1_percent(rho_ml, rho_scf, weights, scf.mol.nelectron)
"""

from __future__ import annotations

from typing import Callable, Tuple, Union

import ase
import ase.io.cube
import numpy as np
from metatensor import TensorMap
from pyscf import dft
from pyscf.data.nist import BOHR

from rholearn import cube
from rholearn.basis import BasisSet
from rholearn.cube import CUBE_MARGIN, cube_grid
from .molecule import atoms_molecule, aux_coefficients
from .scf import total_density_matrix

CHUNK_BYTES = 2**27
"""Memory of the basis-function values of one chunk of points (128 MiB)."""


def density_at_points(
    coefficients: Union[TensorMap, np.ndarray],
    atoms: ase.Atoms,
    basis: BasisSet,
    points: np.ndarray,
) -> np.ndarray:
    """Value of an expanded density at points.

    Parameters
    ----------
    coefficients : TensorMap or numpy.ndarray
        One structure's coefficients in the layout of :mod:`rholearn.layout`
        (metatensor-core or metatensor-torch), or a flat canonical-order vector.
    atoms : ase.Atoms
        The structure, positions in Angstrom.
    basis : BasisSet
        A Gaussian basis (with exponents): any, not only PySCF library names.
    points : numpy.ndarray, shape (n_points, 3)
        Cartesian coordinates in Angstrom.

    Returns
    -------
    numpy.ndarray, shape (n_points,)
        The density in electrons/Bohr^3.
    """
    return _density_function(coefficients, atoms, basis)(points)


def _density_function(
    coefficients: Union[TensorMap, np.ndarray], atoms: ase.Atoms, basis: BasisSet
) -> Callable[[np.ndarray], np.ndarray]:
    """``points (Angstrom) -> density`` of :func:`density_at_points`, with the
    molecule and coefficients prepared once."""
    aux, pyscf_coefficients = aux_coefficients(atoms, coefficients, basis)
    return lambda points: in_chunks(
        points, aux.nao, lambda bohr: aux.eval_gto("GTOval_sph", bohr) @ pyscf_coefficients
    )


def scf_density_at_points(scf, points: np.ndarray) -> np.ndarray:
    """Value of a converged SCF's (spin-summed) density at points.

    Parameters
    ----------
    scf : pyscf.scf.hf.SCF
        A converged mean-field object, e.g. from :func:`rhocalc.pyscf.run_scf`.
    points : numpy.ndarray, shape (n_points, 3)
        Cartesian coordinates in Angstrom.

    Returns
    -------
    numpy.ndarray, shape (n_points,)
        The density in electrons/Bohr^3.
    """
    molecule = scf.mol
    density_matrix = total_density_matrix(scf)
    return in_chunks(
        points,
        molecule.nao,
        lambda bohr: dft.numint.eval_rho(
            molecule, molecule.eval_gto("GTOval_sph", bohr), density_matrix
        ),
    )


GRID_LEVELS = range(10)
"""PySCF's grid levels, 0 (coarse) to 9 (fine)."""


def integration_grid(atoms: ase.Atoms, level: int = 3) -> Tuple[np.ndarray, np.ndarray]:
    """PySCF's molecular (Becke-partitioned atom-centred) integration grid.

    Unpruned, so that every weight is >= 0 (PySCF's default pruning uses small
    Lebedev rules with negative weights, which an L1 norm cannot have).

    Parameters
    ----------
    atoms : ase.Atoms
        Positions in Angstrom.
    level : int
        PySCF grid level, 0 (coarse) to 9 (fine); another is refused
        (``ValueError``).

    Returns
    -------
    points : numpy.ndarray, shape (n_points, 3)
        In Angstrom.
    weights : numpy.ndarray, shape (n_points,)
        In Angstrom^3.
    """
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) \
            or level not in GRID_LEVELS:
        raise ValueError(f"grid level {level!r} is not one of PySCF's levels "
                         f"{GRID_LEVELS.start} (coarse) to {GRID_LEVELS.stop - 1} (fine)")
    grid = dft.gen_grid.Grids(atoms_molecule(atoms))
    grid.level = level
    grid.prune = None
    grid.alignment = 0  # no zero-weight padding points
    grid.build()
    return grid.coords * BOHR, grid.weights * BOHR**3


def electrons_on_grid(density: np.ndarray, weights: np.ndarray) -> float:
    """Integral of a density (electrons/Bohr^3) with weights in Angstrom^3: electrons."""
    return float(weights @ density) / BOHR**3


def real_space_l1_percent(
    density_a: np.ndarray, density_b: np.ndarray, weights: np.ndarray, n_electrons: float
) -> float:
    """``100 * integral |a - b| / N``: the percentage of electrons misplaced.

    Parameters
    ----------
    density_a, density_b : numpy.ndarray, shape (n_points,)
        Densities in electrons/Bohr^3 on the same points.
    weights : numpy.ndarray, shape (n_points,)
        Integration weights in Angstrom^3, as from :func:`integration_grid`.
    n_electrons : float
        The reference electron count ``N``.
    """
    return 100.0 * electrons_on_grid(np.abs(density_a - density_b), weights) / n_electrons


def real_space_l2_percent(
    density_a: np.ndarray, density_b: np.ndarray, weights: np.ndarray
) -> float:
    """``100 * ||a - b|| / ||b||`` with ``||f||^2 = integral f^2`` on the grid.

    Relative, hence independent of units (same arguments as
    :func:`real_space_l1_percent`).
    """
    difference = weights @ (density_a - density_b) ** 2
    return 100.0 * float(np.sqrt(difference / (weights @ density_b**2)))


def write_cube(
    path: str,
    atoms: ase.Atoms,
    coefficients: Union[TensorMap, np.ndarray],
    basis: BasisSet,
    spacing: float = 0.2,
    margin: float = CUBE_MARGIN,
    progress: bool = False,
) -> float:
    """Write an expanded density as a Gaussian cube file, atomically; returns the
    electrons on the cube (the density summed times the cell volume).

    The box encloses the atoms plus ``margin`` on every side; the grid spacing
    is about ``spacing`` (:func:`rholearn.cube.cube_grid`). Both in Angstrom;
    inside the file, as the format requires, lengths are in Bohr and the density
    in electrons/Bohr^3. Written one slab at a time (``progress``: a progress bar),
    so memory does not grow with the cube.

    Parameters are those of :func:`density_at_points`, with ``path`` the file.
    """
    return write_function_cube(
        path,
        atoms,
        _density_function(coefficients, atoms, basis),
        f"{atoms.get_chemical_formula()} density (electrons/Bohr^3), basis {basis.name}",
        spacing,
        margin,
        progress,
    )


def write_function_cube(
    path: str,
    atoms: ase.Atoms,
    function: Callable[[np.ndarray], np.ndarray],
    comment: str,
    spacing: float = 0.2,
    margin: float = CUBE_MARGIN,
    progress: bool = False,
) -> float:
    """Write ``function(points)`` (points in Angstrom, shape (n, 3); values as
    the cube should hold them) on the box of :func:`write_cube`, atomically
    (:func:`rholearn.cube.write_cube`); returns the values summed times the cell
    volume in Bohr^3. A spacing that is not > 0, or a cube above
    :data:`rholearn.cube.MAX_CUBE_POINTS` points, is refused (``ValueError``)."""
    grid = cube_grid(atoms, spacing, margin, where=atoms.get_chemical_formula())
    return cube.write_cube(path, atoms, grid, function, comment, progress)


def read_cube(path: str) -> Tuple[np.ndarray, ase.Atoms]:
    """Read a cube file: ``(values, atoms)``, values as stored (e.g. electrons/Bohr^3),
    shape ``(nx, ny, nz)``, atoms with positions in Angstrom."""
    return ase.io.cube.read_cube_data(path)


def in_chunks(
    points: np.ndarray, n_functions: int, evaluate: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Apply ``evaluate`` (taking Bohr coordinates) to chunks of points (Angstrom),
    sized so that ``n_functions`` values per point take at most ``CHUNK_BYTES``."""
    points_bohr = np.asarray(points, dtype=np.float64).reshape(-1, 3) / BOHR
    size = max(1, CHUNK_BYTES // (8 * max(1, n_functions)))
    return np.concatenate(
        [evaluate(points_bohr[start : start + size]) for start in range(0, len(points_bohr), size)]
        or [np.empty(0)]
    )
