"""Test helpers: an equivariance checker for functions of a structure.

A function ``f(atoms) -> TensorMap`` with blocks keyed by ``o3_lambda`` and
``o3_sigma`` and an ``o3_mu`` component is O(3)-equivariant when moving the
atoms ``r -> R r`` transforms each block as ``D^l(R)`` (and an inversion
``r -> -r`` multiplies it by ``o3_sigma (-1)^l``).
"""

from __future__ import annotations

from typing import Callable

import ase
import numpy as np

from .layout import _to_numpy
from .rotations import random_rotation, rotate_blocks


def assert_equivariant(
    function: Callable[[ase.Atoms], object],
    atoms: ase.Atoms,
    seed: int = 0,
    atol: float = 1e-10,
    inversion: bool = True,
) -> float:
    """Assert that ``function`` is equivariant under a random rotation (and inversion).

    Parameters
    ----------
    function : callable
        ``ase.Atoms -> TensorMap`` (metatensor-core or -torch) with keys
        ``o3_lambda, o3_sigma, ...`` and one ``o3_mu`` component per block.
    atoms : ase.Atoms
        Positions in Angstrom; rotated about the origin (the cell too).
    seed : int
        Seed of the random rotation.
    atol : float
        Largest allowed absolute deviation of any value.
    inversion : bool
        Also check the improper transformation ``r -> -R r``.

    Returns
    -------
    float
        The largest deviation found.

    Raises
    ------
    AssertionError
        Naming the worst block, its deviation and the transformation, or the
        first block whose metadata differ.
    """
    rotation = random_rotation(seed)
    reference = function(atoms)
    worst = 0.0
    for improper in [False, True] if inversion else [False]:
        transformed = atoms.copy()
        sign = -1.0 if improper else 1.0
        transformed.positions = sign * atoms.positions @ rotation.T
        # a lattice is centrosymmetric: the inverted structure keeps a right-handed cell
        transformed.cell = atoms.cell.array @ rotation.T
        name = "rotation + inversion" if improper else "rotation"
        deviation, key = _largest_deviation(
            function(transformed), rotate_blocks(reference, rotation, improper), name
        )
        if deviation > atol:
            raise AssertionError(
                f"not equivariant under {name} (seed {seed}): block {key} deviates by "
                f"{deviation:.3e} > atol={atol:.1e}"
            )
        worst = max(worst, deviation)
    return worst


def _largest_deviation(actual, expected, name: str):
    """Largest absolute difference over all blocks, and the key where it occurs."""
    worst, worst_key = 0.0, None
    for key, block in expected.items():
        key_text = ", ".join(f"{n}={int(v)}" for n, v in zip(key.names, key.values))
        try:
            other = actual.block({n: int(v) for n, v in zip(key.names, key.values)})
        except (ValueError, RuntimeError) as error:
            raise AssertionError(f"after {name}: block {key_text} is missing") from error
        if _to_numpy(other.samples.values).tolist() != _to_numpy(block.samples.values).tolist():
            raise AssertionError(f"after {name}: block {key_text} has other samples")
        values = np.asarray(_to_numpy(other.values))
        reference = np.asarray(_to_numpy(block.values))
        if values.shape != reference.shape:
            raise AssertionError(
                f"after {name}: block {key_text} has shape {values.shape}, "
                f"expected {reference.shape}"
            )
        deviation = float(np.abs(values - reference).max(initial=0.0))
        if deviation >= worst:
            worst, worst_key = deviation, key_text
    if len(actual.keys) != len(expected.keys):
        raise AssertionError(
            f"after {name}: {len(actual.keys)} blocks instead of {len(expected.keys)}"
        )
    return worst, worst_key
