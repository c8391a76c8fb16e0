"""The one place converting FHI-aims' order and signs of auxiliary functions to canonical ones.

The canonical order of :mod:`rholearn.basis` is atom, ``l`` ascending, radial
index ``n``, then ``m = -l..l``, with featomic's real spherical harmonics (no
Condon-Shortley phase: ``Y_{1,-1} ~ y``, ``Y_{1,0} ~ z``, ``Y_{1,1} ~ x``).

FHI-aims has written its RI files (coefficients, projections, overlap) in two
ways, see :mod:`rhocalc.aims.outputs`:

aims 221103 (2022 file names, ``ri_coeffs.out`` ...)
    The files follow aims' *internal* product-basis order, and its real
    harmonics carry an extra factor ``-1`` for odd ``m > 0`` (the
    Condon-Shortley phase is kept there). ``product_basis_idxs.out`` labels
    each function with its file position, atom, ``l``, radial index and ``m``.
    Converting to canonical values: multiply the functions with odd ``m > 0``
    by ``-1``, then move each to its canonical position.
    Sources: lab-cosmo/rholearn ``rholearn/aims_parser.py``
    (``process_aux_basis_func_data``, written against aims 221103, citing
    ``src/cartesian_ylm.f90``; 2023) and andreagrisafi/SALTED
    ``salted/aims/move_data.py`` (same permutation and sign, from aims' own
    ``idx_prodbas.out`` / ``prodbas_condon_shotley_list.out``).

aims >= 240403 (2024 file names, ``ri_restart_coeffs.out`` ...)
    aims reorders and re-signs the functions itself when writing and reading
    these files, so they are already in canonical order and sign: the
    conversion is the identity (:meth:`AimsOrder.identity`).
    Sources: SALTED ``salted/aims/move_data.py`` (``get_reorder_bool``: no
    reordering or sign change from version 240403 on) and lab-cosmo/rholearn
    ``rholearn/aims_interface/parser.py`` (``process_ri_outputs`` reads
    ``ri_restart_coeffs.out`` straight into the block layout).

Both are applied by :func:`from_aims` and inverted exactly by :func:`to_aims`
(used to write a predicted vector back for an aims rebuild). Without an aims
binary only the bookkeeping can be tested here; the rotation test in
``tests/rhocalc/aims/test_aims_run.py`` checks the physics when aims runs.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from rholearn.basis import BasisSet


def condon_shortley_sign(m: int) -> float:
    """Factor from aims' internal real harmonic to the canonical one: ``-1`` for odd ``m > 0``."""
    return -1.0 if m > 0 and m % 2 == 1 else 1.0


@dataclasses.dataclass(frozen=True)
class AimsOrder:
    """Where each function of an aims file goes in the canonical order, and its sign.

    Attributes
    ----------
    canonical_index : numpy.ndarray of int, shape (N,)
        Canonical position of the function at each position of the aims file.
    sign : numpy.ndarray of float, shape (N,)
        ``+1`` or ``-1``: canonical value = ``sign *`` aims value.
    """

    canonical_index: np.ndarray
    sign: np.ndarray

    @classmethod
    def identity(cls, n_functions: int) -> "AimsOrder":
        """Files already in canonical order and sign (aims >= 240403)."""
        return cls(np.arange(n_functions), np.ones(n_functions))

    @property
    def n_functions(self) -> int:
        return len(self.canonical_index)


def aims_order(
    file_positions: Sequence[int],
    functions: Sequence[Sequence[int]],
    basis: BasisSet,
    symbols: Sequence[str],
) -> AimsOrder:
    """The order of aims' internal product basis from per-function labels (aims 221103).

    Parameters
    ----------
    file_positions : sequence of int, shape (N,)
        0-based position of each function in the aims files.
    functions : sequence of (atom, l, n, m), shape (N, 4)
        0-based atom index, angular momentum, 0-based radial index within that
        ``l``, and ``m`` of each function.
    basis : BasisSet
    symbols : sequence of str
        Element symbols of the structure's atoms.

    Raises
    ------
    ValueError
        If the labels are not exactly the functions of ``basis`` on this
        structure, or the positions not a permutation; names the first offender.
    """
    canonical = {f: i for i, f in enumerate(basis.functions(symbols))}
    n = len(canonical)
    file_positions = np.asarray(file_positions, dtype=np.int64)
    if len(file_positions) != n or len(functions) != n:
        raise ValueError(
            f"{len(functions)} labelled functions, but basis '{basis.name}' has {n} "
            "on this structure"
        )
    canonical_index = np.full(n, -1)
    sign = np.ones(n)
    seen = set()
    for row, (position, function) in enumerate(zip(file_positions, functions)):
        label = tuple(int(x) for x in function)
        if label not in canonical:
            raise ValueError(f"function {row}: (atom, l, n, m) = {label} is not in the basis")
        if label in seen:
            raise ValueError(f"function {row}: (atom, l, n, m) = {label} appears twice")
        seen.add(label)
        if not 0 <= position < n:
            raise ValueError(f"function {row}: file position {position} outside 0..{n - 1}")
        if canonical_index[position] != -1:
            raise ValueError(f"function {row}: file position {position} appears twice")
        canonical_index[position] = canonical[label]
        sign[position] = condon_shortley_sign(label[3])
    return AimsOrder(canonical_index, sign)


def from_aims(values: np.ndarray, order: AimsOrder) -> np.ndarray:
    """Canonical order and sign from aims', for a vector ``(N,)`` or a matrix ``(N, N)``."""
    values = _checked(values, order)
    if values.ndim == 1:
        result = np.empty_like(values)
        result[order.canonical_index] = order.sign * values
        return result
    result = np.empty_like(values)
    signs = order.sign[:, None] * order.sign[None, :]
    result[np.ix_(order.canonical_index, order.canonical_index)] = signs * values
    return result


def to_aims(values: np.ndarray, order: AimsOrder) -> np.ndarray:
    """Exact inverse of :func:`from_aims`: aims' order and sign from canonical ones."""
    values = _checked(values, order)
    if values.ndim == 1:
        return order.sign * values[order.canonical_index]
    signs = order.sign[:, None] * order.sign[None, :]
    return signs * values[np.ix_(order.canonical_index, order.canonical_index)]


def _checked(values, order: AimsOrder) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    n = order.n_functions
    if values.shape not in ((n,), (n, n)):
        raise ValueError(f"array of shape {values.shape} does not match {n} aims functions")
    return values
