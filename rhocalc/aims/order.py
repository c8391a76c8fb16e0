"""The one place converting FHI-aims' order and signs of auxiliary functions to canonical ones.

The canonical order of :mod:`rholearn.basis` is atom, ``l`` ascending, radial
index ``n``, then ``m = -l..l``, with featomic's real spherical harmonics (no
Condon-Shortley phase: ``Y_{1,-1} ~ y``, ``Y_{1,0} ~ z``, ``Y_{1,1} ~ x``).

Whether aims' RI files (coefficients, projections, overlap) need converting
is decided by the aims version printed in ``aims.out``, never by file names
(see :mod:`rhocalc.aims.runfiles`):

aims older than 240403 (221103, and the 2023 development builds)
    The files follow aims' *internal* product-basis order, and its real
    harmonics carry an extra factor ``-1`` for odd ``m > 0`` (the
    Condon-Shortley phase is kept there). aims writes the order next to them,
    in one of two forms:

    - ``idx_prodbas_details.out`` (221103) or ``product_basis_idxs.out``
      (2023 development builds): one row per function, in canonical order,
      with five integers: its 1-based position in the RI files, atom, ``l``,
      radial index counted over all ``l`` of the atom, ``m``
      (:func:`aims_order`);
    - ``idx_prodbas.out``: the 1-based file position of each function, rows
      in canonical order, with ``prodbas_condon_shotley_list.out``: the file
      positions whose sign differs (:func:`indexed_order`).

    Converting to canonical values: multiply the functions with odd ``m > 0``
    by ``-1``, then move each to its canonical position.
    Sources: andreagrisafi/SALTED ``salted/aims/move_data.py`` (reads
    ``idx_prodbas.out`` and ``prodbas_condon_shotley_list.out``, flips the
    listed functions, then reorders); jwa7/rho_learn ``rholearn/aims_parser.py``
    (written against aims 221103 with ``idx_prodbas_details.out`` and the
    same list, citing aims' ``src/cartesian_ylm.f90`` for the sign; after its
    August 2023 update, the same conversion from ``product_basis_idxs.out``
    of a development build writing ``ri_coeffs.out``, ``ri_projs.out``).

aims 240403 and later
    aims reorders and re-signs the functions itself when writing and reading
    these files, so they are already in canonical order and sign, whatever
    their names: the conversion is the identity (:meth:`AimsOrder.identity`),
    and an order file still present is not applied (that would convert twice).
    Sources: SALTED ``salted/aims/move_data.py`` (``get_reorder_bool``: no
    reordering or sign change when ``aims.out`` reports a version >= 240403)
    and lab-cosmo/rholearn ``rholearn/aims_interface/parser.py``
    (``process_ri_outputs`` reads ``ri_restart_coeffs.out`` straight into its
    block layout). Checked on genuine aims 240925 output
    (``../shared/aims/methane-240925``, ``tests/rhocalc/aims/test_aims_genuine.py``):
    the overlap of an H ``s`` function with the C ``(l, m)`` functions is
    proportional to the real harmonics of the C-H direction in this convention.

Both are applied by :func:`from_aims` and inverted exactly by :func:`to_aims`
(used to write a predicted vector back for an aims rebuild).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from rholearn.basis import BasisSet

CANONICAL_FROM_VERSION = 240403
"""The first aims version writing RI files in canonical order and sign (SALTED's
``get_reorder_bool``); older files are converted from aims' internal order."""


def converts(version: int) -> bool:
    """Whether the RI files of aims ``version`` (e.g. ``221103``) need converting."""
    return version < CANONICAL_FROM_VERSION


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
        """Files already in canonical order and sign (aims 240403 and later)."""
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
    """The order of aims' internal product basis from per-function labels (aims < 240403).

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


def indexed_order(
    file_positions: Sequence[int],
    flipped: Sequence[int],
    basis: BasisSet,
    symbols: Sequence[str],
) -> AimsOrder:
    """The order of aims' internal product basis from ``idx_prodbas.out`` and
    ``prodbas_condon_shotley_list.out`` (aims < 240403).

    Parameters
    ----------
    file_positions : sequence of int, shape (N,)
        0-based position in the aims files of each function, in canonical order.
    flipped : sequence of int
        0-based file positions of the functions whose sign differs.
    basis : BasisSet
    symbols : sequence of str
        Element symbols of the structure's atoms.

    Raises
    ------
    ValueError
        If the positions are not a permutation of ``0..N-1``, or the flipped
        functions are not exactly those of odd ``m > 0`` (the Condon-Shortley
        sign the conversion assumes); names the first offender.
    """
    functions = basis.functions(symbols)
    file_positions = np.asarray(file_positions, dtype=np.int64)
    n = len(functions)
    if len(file_positions) != n:
        raise ValueError(
            f"{len(file_positions)} file positions, but basis '{basis.name}' has {n} "
            "functions on this structure"
        )
    wrong = np.flatnonzero(np.sort(file_positions) != np.arange(n))
    if len(wrong):
        raise ValueError(f"file positions are not a permutation of 1..{n} (1-based): "
                         f"position {wrong[0] + 1} is missing or repeated")
    labels = [functions[k] for k in np.argsort(file_positions)]
    order = aims_order(np.arange(n), labels, basis, symbols)
    check_flipped(order, flipped)
    return order


def check_flipped(order: AimsOrder, flipped: Sequence[int]) -> None:
    """Check aims' list of sign changes (``prodbas_condon_shotley_list.out``, 0-based file
    positions) against ``order``: exactly the functions with odd ``m > 0``.

    Raises
    ------
    ValueError
        Naming the first (1-based) file position listed or omitted wrongly.
    """
    expected = set(np.flatnonzero(order.sign < 0).tolist())
    flipped = set(int(p) for p in flipped)
    if flipped != expected:
        position = min(flipped ^ expected)
        raise ValueError(
            f"file position {position + 1} (1-based) is "
            f"{'listed' if position in flipped else 'not listed'} for a sign change, but "
            "aims changes the sign of exactly the functions with odd m > 0"
        )


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
