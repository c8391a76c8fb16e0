"""The one place converting PySCF's basis-function order to the canonical order.

PySCF orders a molecule's functions by shell (in basis order, atom by atom),
contraction-major within a shell, then by ``m``: ``m = -l..l`` except for
``l = 1``, which is ``(x, y, z)``, i.e. ``m = (1, -1, 0)``. The canonical order
of :mod:`rholearn.basis` is atom, ``l`` ascending, radial index ``n``, then
``m = -l..l``.

No signs change: PySCF's real spherical harmonics rotate with exactly
featomic's real Wigner D matrices once reordered (checked for ``l <= 7`` in
``tests/rhocalc/test_pyscf_order.py``, and end to end by rotating molecules in
``tests/rhocalc/test_pyscf_targets.py``). So the conversion is a permutation::

    c_canonical = c_pyscf[pyscf_to_canonical(mol)]

The radial index ``n`` counts a PySCF atom's shells (and contractions) of one
``l`` in order, so it matches a :class:`~rholearn.basis.BasisSet` whose shells
were turned into the molecule by :func:`rhocalc.pyscf.molecule.aux_molecule`.
"""

from __future__ import annotations

import numpy as np
from pyscf import gto

_P_ORDER = (1, -1, 0)  # PySCF's (x, y, z) as featomic m values


def pyscf_m_values(l: int) -> tuple:
    """``m`` of the ``2l+1`` PySCF functions of one shell, in PySCF's order."""
    return _P_ORDER if l == 1 else tuple(range(-l, l + 1))


def pyscf_to_canonical(molecule: gto.Mole) -> np.ndarray:
    """Permutation ``index`` with ``c_canonical = c_pyscf[index]``.

    Parameters
    ----------
    molecule : pyscf.gto.Mole
        A built molecule with spherical (not Cartesian) functions.

    Returns
    -------
    numpy.ndarray of int, shape (molecule.nao,)
    """
    if molecule.cart:
        raise ValueError("the canonical order is defined for spherical functions only")
    labels = []  # (atom, l, n, m) of each PySCF function, in PySCF order
    n_seen = {}  # (atom, l) -> radial functions met so far
    for shell in range(molecule.nbas):
        atom, l = molecule.bas_atom(shell), molecule.bas_angular(shell)
        for _ in range(molecule.bas_nctr(shell)):
            n = n_seen.get((atom, l), 0)
            n_seen[(atom, l)] = n + 1
            labels.extend((atom, l, n, m) for m in pyscf_m_values(l))
    labels = np.array(labels)
    # lexsort sorts by the last key first
    return np.lexsort((labels[:, 3], labels[:, 2], labels[:, 1], labels[:, 0]))


def vector_to_canonical(vector: np.ndarray, molecule: gto.Mole) -> np.ndarray:
    """Reorder the first axis of a PySCF-order array to the canonical order."""
    return np.asarray(vector)[pyscf_to_canonical(molecule)]


def vector_to_pyscf(vector: np.ndarray, molecule: gto.Mole) -> np.ndarray:
    """Inverse of :func:`vector_to_canonical`."""
    vector = np.asarray(vector)
    result = np.empty_like(vector)
    result[pyscf_to_canonical(molecule)] = vector
    return result


def matrix_to_canonical(matrix: np.ndarray, molecule: gto.Mole) -> np.ndarray:
    """Reorder both axes of a PySCF-order matrix (e.g. an overlap) to canonical order."""
    index = pyscf_to_canonical(molecule)
    return np.asarray(matrix)[np.ix_(index, index)]


def matrix_to_pyscf(matrix: np.ndarray, molecule: gto.Mole) -> np.ndarray:
    """Inverse of :func:`matrix_to_canonical`."""
    index = pyscf_to_canonical(molecule)
    result = np.empty_like(np.asarray(matrix))
    result[np.ix_(index, index)] = matrix
    return result
