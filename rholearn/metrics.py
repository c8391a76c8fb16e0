"""Errors of predicted densities in coefficient space, in percent.

With ``dc = c - c_ref`` and the auxiliary overlap ``S`` (sparse atom pairs,
:mod:`rholearn.overlap`), ``dc^T S dc`` is the squared real-space L2 error
``int (rho - rho_ref)^2 dr`` of a structure's density, exact for densities
expanded in the basis:

- :func:`relative_l2_errors`, per structure:
  ``100 sqrt(dc^T S dc / c_ref^T S c_ref)``;
- :func:`relative_rmse`, over a set (SALTED's % RMSE):
  ``100 sqrt(sum_s dc^T S dc / sum_s (c_ref - c_base)^T S (c_ref - c_base))``,
  the error relative to the spread of the targets around a baseline;
- :func:`error_summary`: both, with mean, max and per-structure values, from
  the :func:`overlap_norms` of one or several batches;
- :func:`atom_error_shares`: each atom's share ``dc_i^T (S dc)_i`` of its
  structure's ``dc^T S dc``, to show where in a structure the error sits.

All take the prediction and the reference in the coefficient layout of
:mod:`rholearn.layout` (many structures joined along samples, any sample
order) and the overlap in the pair layout. They do not track gradients.
The real-space L1 error needs basis functions on a grid: it comes from the
dataset's backend (:mod:`rholearn.backends`, used by :func:`rholearn.workflow.evaluate`).
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

import ase.data
import metatensor.torch as mts
import numpy as np
import torch
from metatensor.torch import TensorBlock, TensorMap

from . import layout
from .basis import BasisSet
from .overlap import SparseOverlap, align_samples, key_string


class OverlapNorms(NamedTuple):
    """Per-structure squared norms behind every metric (densities in e / Bohr^3 give
    e^2 / Bohr^3)."""

    systems: torch.Tensor  # structure ids
    squared_errors: torch.Tensor  # dc^T S dc
    norms: torch.Tensor  # c_ref^T S c_ref
    spreads: Optional[torch.Tensor]  # (c_ref - c_base)^T S (c_ref - c_base), with a baseline


@torch.no_grad()
def overlap_norms(
    prediction: TensorMap,
    reference: TensorMap,
    overlap: TensorMap,
    baseline: Optional[TensorMap] = None,
) -> OverlapNorms:
    """The squared norms of a batch, with one overlap index for all of them.

    Parameters
    ----------
    prediction, reference : TensorMap
        Predicted and reference coefficients of the same structures.
    overlap : TensorMap
        Their overlap (pair layout).
    baseline : TensorMap, optional
        Per-element coefficients, see :func:`subtract_baseline`; needed for
        the spreads.
    """
    reference = align_samples(reference, prediction, "reference")
    sparse = SparseOverlap(overlap, prediction)
    spreads = None
    if baseline is not None:
        spreads = sparse.quadratic(subtract_baseline(reference, baseline))
    return OverlapNorms(
        systems=sparse.systems,
        squared_errors=sparse.quadratic(mts.subtract(prediction, reference)),
        norms=sparse.quadratic(reference),
        spreads=spreads,
    )


def relative_l2_errors(
    prediction: TensorMap, reference: TensorMap, overlap: TensorMap
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Real-space L2 error of each structure's density relative to its norm, in %.

    Returns
    -------
    systems : torch.Tensor, shape (n_structures,)
        Sorted structure ids.
    errors : torch.Tensor, shape (n_structures,)
        ``100 sqrt(dc^T S dc / c_ref^T S c_ref)``.
    """
    norms = overlap_norms(prediction, reference, overlap)
    return norms.systems, 100 * torch.sqrt(norms.squared_errors / norms.norms)


def relative_rmse(
    prediction: TensorMap, reference: TensorMap, overlap: TensorMap, baseline: TensorMap
) -> float:
    """SALTED's % RMSE of a set of structures.

    ``100 sqrt(sum_s dc^T S dc / sum_s (c_ref - c_base)^T S (c_ref - c_base))``:
    100 % is the error of always predicting the baseline.

    Parameters
    ----------
    baseline : TensorMap
        Per-element coefficients, typically the mean ``o3_lambda = 0``
        coefficients of the training set (``rholearn.models.Baseline.means``),
        see :func:`subtract_baseline`.
    """
    norms = overlap_norms(prediction, reference, overlap, baseline)
    return float(100 * torch.sqrt(norms.squared_errors.sum() / norms.spreads.sum()))


def error_summary(norms: Union[OverlapNorms, Sequence[OverlapNorms]]) -> Dict[str, object]:
    """Per-structure and aggregate errors of a set, as a JSON-serialisable dict.

    Parameters
    ----------
    norms : OverlapNorms or sequence of OverlapNorms
        From :func:`overlap_norms`, for the whole set or batch by batch.

    Returns
    -------
    dict
        ``n_structures``; ``relative_l2_percent`` with ``mean``, ``max``,
        ``max_system`` (the structure id of the max) and ``per_structure``
        (structure id -> %); and, if the norms have spreads, ``rmse_percent``
        (see :func:`relative_rmse`).
    """
    batches = [norms] if isinstance(norms, OverlapNorms) else list(norms)
    systems = torch.cat([batch.systems for batch in batches])
    squared_errors = torch.cat([batch.squared_errors for batch in batches])
    errors = 100 * torch.sqrt(squared_errors / torch.cat([batch.norms for batch in batches]))
    worst = int(torch.argmax(errors))
    summary: Dict[str, object] = {
        "n_structures": len(systems),
        "relative_l2_percent": {
            "mean": float(errors.mean()),
            "max": float(errors[worst]),
            "max_system": int(systems[worst]),
            "per_structure": dict(zip(systems.tolist(), errors.tolist())),
        },
    }
    if all(batch.spreads is not None for batch in batches):
        spread = sum(batch.spreads.sum() for batch in batches)
        summary["rmse_percent"] = float(100 * torch.sqrt(squared_errors.sum() / spread))
    return summary


def subtract_baseline(coefficients: TensorMap, baseline: TensorMap) -> TensorMap:
    """``coefficients`` minus a per-element baseline, broadcast to every atom.

    Parameters
    ----------
    coefficients : TensorMap
        Coefficient layout.
    baseline : TensorMap
        Keys ``o3_lambda, o3_sigma, center_type`` and one sample per block (any
        sample names), with the components and properties of the matching
        coefficient block: e.g. ``rholearn.models.Baseline.means``, or
        :func:`metatensor.torch.mean_over_samples` of training coefficients.
        Keys absent from it are left unchanged; keys absent from
        ``coefficients`` are ignored.

    Raises
    ------
    ValueError
        A baseline block with more than one sample, or a shape that does not
        match; the message names the key.
    """
    baseline_of = {tuple(key): index for index, key in enumerate(baseline.keys.values.tolist())}
    blocks = []
    for index, block in enumerate(coefficients.blocks()):
        values = block.values
        position = baseline_of.get(tuple(coefficients.keys.values[index].tolist()))
        if position is not None:
            base = baseline.block(position).values
            if base.shape != (1,) + values.shape[1:]:
                raise ValueError(
                    f"baseline block {key_string(coefficients.keys, index)} has shape "
                    f"{tuple(base.shape)}, expected {(1,) + tuple(values.shape[1:])}"
                )
            values = values - base
        blocks.append(TensorBlock(values, block.samples, block.components, block.properties))
    return TensorMap(coefficients.keys, blocks)


@torch.no_grad()
def atom_error_shares(
    prediction: TensorMap,
    reference: TensorMap,
    overlap: TensorMap,
    atomic_numbers: Sequence[int],
    basis: BasisSet,
) -> np.ndarray:
    """Each atom's share of one structure's squared L2 error ``dc^T S dc``, in %.

    The error is written in the Loewdin-orthonormalised basis, ``r = S^(1/2) dc``
    (symmetric square root: the orthonormal functions closest to the original
    ones, each still centred on its atom), so that ``dc^T S dc = sum_k r_k^2``;
    an atom's share is the sum of ``r_k^2`` over its own functions ``k``, as in
    a Loewdin population analysis. Shares are non-negative and sum to 100 %
    (0 for every atom of a structure predicted exactly). The split
    ``sum_i dc_i^T (S dc)_i`` would sum to 100 % too, but gives negative shares
    (and others above 100 %) where neighbouring errors cancel.

    Parameters
    ----------
    prediction, reference : TensorMap
        Coefficients of one structure (layout of :mod:`rholearn.layout`).
    overlap : TensorMap
        Its overlap (pair layout, both orders of each pair).
    atomic_numbers : sequence of int
        The structure's atoms, in order.
    basis : BasisSet
        The auxiliary basis of the coefficients.

    Returns
    -------
    numpy.ndarray
        Shape ``(atoms,)``, in %.

    Notes
    -----
    Builds the dense overlap and its eigendecomposition: memory quadratic and
    time cubic in the structure's number of basis functions (a 24-atom molecule
    in a JK-fit basis, ~1400 functions: well under a second).
    """
    error = mts.subtract(prediction, align_samples(reference, prediction, "reference"))
    vector = layout.tensormap_to_vector(error, atomic_numbers, basis)
    matrix = layout.pair_tensormap_to_matrix(overlap, atomic_numbers, basis)
    eigenvalues, eigenvectors = np.linalg.eigh(0.5 * (matrix + matrix.T))
    root = eigenvectors @ (np.sqrt(np.clip(eigenvalues, 0.0, None)) * (eigenvectors.T @ vector))
    symbols = [ase.data.chemical_symbols[z] for z in atomic_numbers]
    owner = np.array([atom for atom, _, _, _ in basis.functions(symbols)], dtype=np.int64)
    per_atom = np.bincount(owner, weights=root**2, minlength=len(atomic_numbers))
    total = per_atom.sum()
    return 100.0 * per_atom / total if total > 0 else np.zeros(len(atomic_numbers))
