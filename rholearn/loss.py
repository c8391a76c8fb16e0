"""Losses between predicted and target density coefficients, on metatensor TensorMaps.

Every loss is a torch module called as ``loss(prediction, target)``:

- ``prediction``: coefficients in the layout of :mod:`rholearn.layout`, for a
  batch of structures joined along samples;
- ``target``: any object with the attributes ``coefficients``,
  ``projections`` and ``overlap`` (the batches of :mod:`rholearn.data`, a
  :class:`LossTarget`), of which only those the loss needs must be set. Their
  samples may come in any order: targets are aligned to the prediction.

Per structure, with ``dc = c - c_ref`` and the auxiliary overlap ``S``:

    CoefficientLoss   sum_k w_k dc_k^2       needs coefficients
    OverlapLoss       dc^T S dc              needs coefficients, overlap
    ProjectionLoss    c^T S c - 2 c^T w      needs projections w = S c_ref, overlap

``dc^T S dc = int (rho - rho_ref)^2 dr`` is the squared real-space L2 error of
the density (electrons^2 / Bohr^3 for densities in electrons / Bohr^3), and
``ProjectionLoss = OverlapLoss - c_ref^T S c_ref``: it has the same gradient
without needing the reference coefficients.

:class:`OverlapLoss` and :class:`ProjectionLoss` keep the sparse overlap
index of batches met again (:class:`rholearn.overlap.SparseOverlapCache`,
``cache_bytes``, 1 GiB by default): LBFGS's fixed batches build it twice, then
reuse it in every evaluation and epoch; shuffled minibatches rebuild it.

The structures' values are summed (``reduction="sum"``, the default, so that
the losses of the batches of an epoch add up) or averaged (``"mean"``).

Each call checks that the target coefficients and projections are finite (one
device sync); the overlap, with its many blocks, is checked when read from
disk (:class:`rholearn.data.TargetFile`).
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import metatensor.torch as mts
import torch
from metatensor.torch import TensorMap

from .overlap import (
    DEFAULT_CACHE_BYTES,
    SparseOverlapCache,
    align_samples,
    key_string,
    per_system_dot,
    systems_of,
)

REDUCTIONS = ("sum", "mean")


class LossTarget(NamedTuple):
    """The targets a loss may read; a batch of :mod:`rholearn.data` works the same."""

    coefficients: Optional[TensorMap] = None
    projections: Optional[TensorMap] = None
    overlap: Optional[TensorMap] = None


class _StructureLoss(torch.nn.Module):
    """A loss computed per structure, then reduced over the batch."""

    def __init__(self, reduction: str = "sum"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got '{reduction}'")
        self.reduction = reduction

    def forward(self, prediction: TensorMap, target) -> torch.Tensor:
        """The loss of the batch: a scalar tensor, differentiable in ``prediction``."""
        _, values = self.per_structure(prediction, target)
        return values.sum() if self.reduction == "sum" else values.mean()

    def per_structure(self, prediction: TensorMap, target) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(systems, values)``: sorted structure ids and the loss of each structure."""
        raise NotImplementedError

    def _target(self, prediction: TensorMap, target, name: str) -> TensorMap:
        """The target field ``name``, checked against ``prediction``: present, same dtype
        and device, and (coefficients, projections) finite."""
        tensor = getattr(target, name, None)
        if tensor is None:
            raise ValueError(f"{type(self).__name__} needs the target '{name}', which is missing")
        expected = prediction.block(0).values
        found = tensor.block(0).values
        if found.dtype != expected.dtype or found.device != expected.device:
            raise ValueError(
                f"target '{name}' is {found.dtype} on {found.device} but the prediction "
                f"is {expected.dtype} on {expected.device}"
            )
        if name != "overlap":  # one sum per block: too many blocks to check each batch
            check_finite(tensor, name)
        return tensor

    def _sparse_overlap(self, prediction: TensorMap, target):
        """The batch's :class:`~rholearn.overlap.SparseOverlap`, from the cache if met before."""
        return self.overlaps.get(self._target(prediction, target, "overlap"), prediction)

    def _aligned(self, prediction: TensorMap, target, name: str) -> TensorMap:
        """A coefficient-layout target field, checked and in the prediction's sample order."""
        return align_samples(self._target(prediction, target, name), prediction, name)


class CoefficientLoss(_StructureLoss):
    """Weighted squared error of the coefficients, ``sum_k w_k (c_k - c_ref_k)^2``.

    Parameters
    ----------
    weights : dict, optional
        ``(o3_lambda, o3_sigma, center_type) -> weight`` of a block's terms
        (1 for keys not listed).
    reduction : str
        ``"sum"`` or ``"mean"`` over structures.
    """

    def __init__(
        self,
        weights: Optional[Dict[Tuple[int, int, int], float]] = None,
        reduction: str = "sum",
    ):
        super().__init__(reduction)
        self.weights = dict(weights or {})

    def per_structure(self, prediction, target):
        difference = mts.subtract(prediction, self._aligned(prediction, target, "coefficients"))
        systems = systems_of(prediction)
        return systems, per_system_dot(difference, difference, systems, self.weights)


class OverlapLoss(_StructureLoss):
    """Squared real-space L2 error of the density, ``(c - c_ref)^T S (c - c_ref)``.

    Parameters
    ----------
    reduction : str
        ``"sum"`` or ``"mean"`` over structures.
    cache_bytes : int
        Memory bound of the cached overlap indices (attribute ``overlaps``, a
        :class:`~rholearn.overlap.SparseOverlapCache`); 0 rebuilds every call.
    """

    def __init__(self, reduction: str = "sum", cache_bytes: int = DEFAULT_CACHE_BYTES):
        super().__init__(reduction)
        self.overlaps = SparseOverlapCache(cache_bytes)

    def per_structure(self, prediction, target):
        reference = self._aligned(prediction, target, "coefficients")
        overlap = self._sparse_overlap(prediction, target)
        return overlap.systems, overlap.quadratic(mts.subtract(prediction, reference))


class ProjectionLoss(_StructureLoss):
    """``c^T S c - 2 c^T w`` from the projections ``w = S c_ref`` of the target density.

    Equals :class:`OverlapLoss` minus ``c_ref^T S c_ref``, a constant per
    structure: same minimum, same gradient, but it needs no reference
    coefficients, only the projections of the density onto the basis (which
    need no density fit). Its value is negative near the minimum.

    Parameters
    ----------
    add_constant : bool
        Add ``c_ref^T S c_ref`` (then the target also needs ``coefficients``),
        so that the value equals :class:`OverlapLoss`.
    reduction : str
        ``"sum"`` or ``"mean"`` over structures.
    cache_bytes : int
        As for :class:`OverlapLoss`.
    """

    def __init__(
        self,
        add_constant: bool = False,
        reduction: str = "sum",
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        super().__init__(reduction)
        self.add_constant = add_constant
        self.overlaps = SparseOverlapCache(cache_bytes)

    def per_structure(self, prediction, target):
        projections = self._aligned(prediction, target, "projections")
        overlap = self._sparse_overlap(prediction, target)
        values = overlap.quadratic(prediction) - 2 * per_system_dot(
            prediction, projections, overlap.systems
        )
        if self.add_constant:
            values = values + overlap.quadratic(self._aligned(prediction, target, "coefficients"))
        return overlap.systems, values


def check_finite(tensor: TensorMap, name: str) -> None:
    """Raise a ``ValueError`` naming the systems (and block) if ``tensor`` has NaN or inf.

    Costs one device sync when the values are finite.
    """
    total = torch.stack([block.values.sum() for block in tensor.blocks()]).sum()
    if bool(torch.isfinite(total)):
        return
    for index, block in enumerate(tensor.blocks()):
        bad_rows = ~torch.isfinite(block.values.reshape(len(block.samples), -1)).all(dim=1)
        if bool(bad_rows.any()):
            systems = torch.unique(block.samples.column("system")[bad_rows]).tolist()
            raise ValueError(
                f"{name} of system(s) {systems} contain NaN or inf "
                f"(block {key_string(tensor.keys, index)})"
            )
