"""Density fitting: expand an SCF density in an auxiliary basis.

The fit minimises ``(rho - rho_fit | M | rho - rho_fit)`` over the coefficients
``c`` of ``rho_fit = sum_P c_P chi_P``, with the metric ``M`` either the Coulomb
operator ``1/r12`` or the overlap (L2). This gives ``M c = b``: ``M_PQ`` the
two-centre and ``b_P = (chi_P | M | rho)`` the three-centre integrals contracted
with the density matrix. With ``constrain_electrons`` a Lagrange multiplier adds
``q . c = N`` with ``q_P`` the integral of ``chi_P`` and ``N`` the electron
count. Everything here is in PySCF's function order and Bohr.
"""

from __future__ import annotations

from typing import Iterator, Tuple

import numpy as np
import scipy.linalg
from pyscf import df, gto, lib
from pyscf.gto.ft_ao import ft_ao

_INTEGRALS = {  # metric -> (three-centre, two-centre) PySCF integral names
    "coulomb": ("int3c2e", "int2c2e"),
    "overlap": ("int3c1e", "int1e_ovlp"),
}
_BLOCK_BYTES = 2**28  # memory of one block of three-centre integrals


def fit_density(
    molecule: gto.Mole,
    density_matrix: np.ndarray,
    aux: gto.Mole,
    metric: str = "coulomb",
    constrain_electrons: bool = False,
) -> np.ndarray:
    """Coefficients of the density of ``density_matrix`` in the basis of ``aux``.

    Parameters
    ----------
    molecule : pyscf.gto.Mole
        The molecule with its orbital basis; ``molecule.nelectron`` is the
        electron count of the constraint.
    density_matrix : numpy.ndarray, shape (nao, nao)
        Spin-summed, symmetric AO density matrix.
    aux : pyscf.gto.Mole
        The same atoms carrying the auxiliary basis.
    metric : {"coulomb", "overlap"}
    constrain_electrons : bool
        Make the fitted density integrate exactly to ``molecule.nelectron``.

    Returns
    -------
    numpy.ndarray, shape (aux.nao,)
        Coefficients in PySCF order, of a density in electrons/Bohr^3.
    """
    three_centre, two_centre = _INTEGRALS[metric]
    target = density_projections(molecule, density_matrix, aux, three_centre)
    factor = scipy.linalg.cho_factor(aux.intor(two_centre, hermi=1))
    coefficients = scipy.linalg.cho_solve(factor, target)
    if constrain_electrons:
        integrals = function_integrals(aux)
        direction = scipy.linalg.cho_solve(factor, integrals)
        multiplier = (molecule.nelectron - integrals @ coefficients) / (integrals @ direction)
        coefficients = coefficients + multiplier * direction
    return coefficients


def density_projections(
    molecule: gto.Mole, density_matrix: np.ndarray, aux: gto.Mole, intor: str
) -> np.ndarray:
    """``b_P = sum_ij D_ij (ij P)`` of a three-centre integral, shape (aux.nao,).

    The integrals are computed in blocks of auxiliary shells, bounding memory.
    """
    symmetric = density_matrix + density_matrix.T - np.diag(np.diag(density_matrix))
    packed = lib.pack_tril(symmetric)  # i >= j, off-diagonal counted twice
    projections = np.empty(aux.nao)
    for first_shell, last_shell, start, stop in _aux_shell_blocks(aux, packed.size):
        integrals = df.incore.aux_e2(
            molecule,
            aux,
            intor=intor,
            aosym="s2ij",
            shls_slice=(0, molecule.nbas, 0, molecule.nbas, first_shell, last_shell),
        )
        projections[start:stop] = packed @ integrals
    return projections


def coulomb_matrix(molecule: gto.Mole, aux: gto.Mole, coefficients: np.ndarray) -> np.ndarray:
    """``J_ij = sum_P (ij|P) c_P``: the Coulomb potential of an expanded density in
    the orbital basis, shape (molecule.nao, molecule.nao), Hartree.

    The transpose of :func:`density_projections` (``int3c2e``, in the same blocks);
    ``coefficients`` in PySCF order, of a density in electrons/Bohr^3.
    """
    packed = np.zeros(molecule.nao * (molecule.nao + 1) // 2)
    for first_shell, last_shell, start, stop in _aux_shell_blocks(aux, packed.size):
        integrals = df.incore.aux_e2(
            molecule,
            aux,
            intor="int3c2e",
            aosym="s2ij",
            shls_slice=(0, molecule.nbas, 0, molecule.nbas, first_shell, last_shell),
        )
        packed += integrals @ coefficients[start:stop]
    return lib.unpack_tril(packed)


def function_integrals(aux: gto.Mole) -> np.ndarray:
    """``q_P``, the integral over space of each basis function, shape (aux.nao,).

    The Fourier transform at zero wave vector, exact (no grid).
    """
    return ft_ao(aux, np.zeros((1, 3)))[0].real


def _aux_shell_blocks(aux: gto.Mole, n_pairs: int) -> Iterator[Tuple[int, int, int, int]]:
    """``(first_shell, last_shell, first_function, last_function)`` blocks."""
    ao_loc = aux.ao_loc_nr()
    max_functions = max(1, _BLOCK_BYTES // (8 * n_pairs))
    first = 0
    for shell in range(1, aux.nbas + 1):
        if shell == aux.nbas or ao_loc[shell + 1] - ao_loc[first] > max_functions:
            yield first, shell, ao_loc[first], ao_loc[shell]
            first = shell
