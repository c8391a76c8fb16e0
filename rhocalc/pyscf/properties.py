"""Properties straight from expanded density coefficients: dipole moment and
electrostatic potential, exact integrals of the Gaussian basis functions (no grid).

For ``rho(r) = sum_P c_P chi_P(r)`` (electrons/Bohr^3) and nuclei of charges
``Z_A`` at ``R_A``, in atomic units::

    mu   = sum_A Z_A R_A - sum_P c_P int r chi_P(r) dr          (e Bohr)
    V(g) = sum_A Z_A / |g - R_A| - sum_P c_P int chi_P(r) / |g - r| dr   (Hartree / e)

``Z_A`` are the charges the SCF's nuclei carry: with the ECPs of the orbital basis
(def2 beyond Kr) the core charge is removed, matching the valence density such
datasets hold. The dipole's origin is the origin of the coordinates, as in PySCF's
``mf.dip_moment()`` (it matters for charged structures only). :data:`DEBYE`
converts e Bohr to Debye.

The moments ``int r chi_P`` are one-electron integrals ``<1|r|chi_P>`` against a
constant function (a Gaussian of exponent 0, which libcint integrates exactly);
the potentials of the functions are ``int2c2e`` integrals against PySCF's point
charges (``gto.fakemol_for_charges``).
"""

from __future__ import annotations

from typing import Union

import ase
import numpy as np
from metatensor import TensorMap
from pyscf import gto
from pyscf.data.nist import AU2DEBYE

from rholearn.basis import BasisSet

from . import realspace
from .molecule import ao_molecule, aux_coefficients
from .options import PySCFOptions

DEBYE = AU2DEBYE
"""Debye per e Bohr (atomic unit of dipole moment), PySCF's value."""

Coefficients = Union[TensorMap, np.ndarray]


def dipole_moment(
    atoms: ase.Atoms,
    coefficients: Coefficients,
    basis: BasisSet,
    options: PySCFOptions = PySCFOptions(),
) -> np.ndarray:
    """Dipole moment of the nuclei and an expanded electron density.

    Parameters
    ----------
    atoms : ase.Atoms
        Positions in Angstrom; ``info["charge"]``, ``info["spin"]`` as for the SCF.
    coefficients : TensorMap or numpy.ndarray
        One structure's coefficients (layout of :mod:`rholearn.layout`, or a
        canonical-order vector) of a density in electrons/Bohr^3.
    basis : BasisSet
        Their (Gaussian) basis.
    options : PySCFOptions
        Only ``basis`` is used: the ECPs it defines set the nuclear charges.

    Returns
    -------
    numpy.ndarray, shape (3,)
        In e Bohr (atomic units); times :data:`DEBYE` for Debye.
    """
    aux, c = aux_coefficients(atoms, coefficients, basis)
    molecule = ao_molecule(atoms, options.basis)
    nuclear = molecule.atom_charges() @ molecule.atom_coords()
    return nuclear - function_moments(aux) @ c


def electrostatic_potential(
    atoms: ase.Atoms,
    coefficients: Coefficients,
    basis: BasisSet,
    points: np.ndarray,
    options: PySCFOptions = PySCFOptions(),
) -> np.ndarray:
    """Electrostatic potential of the nuclei and an expanded electron density.

    Parameters are those of :func:`dipole_moment`, and ``points``: shape
    (n, 3), Angstrom (not on a nucleus, where the potential diverges).

    Returns
    -------
    numpy.ndarray, shape (n,)
        In Hartree / e (atomic units of potential: 27.211... V).
    """
    aux, c = aux_coefficients(atoms, coefficients, basis)
    molecule = ao_molecule(atoms, options.basis)
    charges, nuclei = molecule.atom_charges(), molecule.atom_coords()

    def potential(points_bohr: np.ndarray) -> np.ndarray:
        distances = np.linalg.norm(points_bohr[:, None] - nuclei[None], axis=-1)
        electrons = gto.intor_cross("int2c2e", gto.fakemol_for_charges(points_bohr), aux)
        return distances ** -1.0 @ charges - electrons @ c

    return realspace.in_chunks(points, aux.nao, potential)


def write_potential_cube(
    path: str,
    atoms: ase.Atoms,
    coefficients: Coefficients,
    basis: BasisSet,
    options: PySCFOptions = PySCFOptions(),
    spacing: float = 0.2,
    margin: float = realspace.CUBE_MARGIN,
) -> None:
    """Write :func:`electrostatic_potential` (Hartree / e) as a Gaussian cube
    file, atomically, on the box of :func:`rhocalc.pyscf.realspace.write_cube`
    (``spacing`` and ``margin`` in Angstrom)."""
    realspace.write_function_cube(
        path,
        atoms,
        lambda points: electrostatic_potential(atoms, coefficients, basis, points, options),
        f"{atoms.get_chemical_formula()} electrostatic potential (Hartree/e), basis {basis.name}",
        spacing,
        margin,
    )


def function_moments(aux: gto.Mole) -> np.ndarray:
    """``int r chi_P(r) dr`` of every function of ``aux``, shape (3, aux.nao),
    PySCF order, Bohr times the function's integral units; exact (no grid)."""
    constant = gto.M(atom=[("H", (0.0, 0.0, 0.0))], basis={"H": [[0, [1.0, 1.0]]]}, spin=1)
    constant._env[constant._bas[0, gto.PTR_EXP]] = 0.0  # exp(-0 r^2) = 1: a constant
    value = constant.eval_gto("GTOval_sph", np.zeros((1, 3)))[0, 0]
    return gto.intor_cross("int1e_r", constant, aux)[:, 0, :] / value
