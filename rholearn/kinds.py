"""What a model learns, as data: the electron density or a molecular tensor.

A :class:`TargetKind` says which files of a dataset hold the targets, in which
metric their errors are measured, and how the per-atom outputs of a model reduce
to the target:

- ``density``: per-atom coefficients in the auxiliary basis, the overlap metric
  ``S``, no reduction;
- ``dipole`` and ``polarizability`` (:data:`rholearn.tensors.RANKS`): one tensor
  per structure (``DATASET/<i>/<kind>.mts``, atomic units), the plain squared
  error, and the sum of per-atom equivariant contributions over the structure's
  atoms (:mod:`rholearn.reduction`). A dipole is an ``o3_lambda = 1`` tensor,
  the symmetric polarisability its ``o3_lambda = 0`` and ``2`` parts.

The per-atom contributions use the same descriptors, networks and direct solve as
densities: their blocks are those of an *output basis* (:meth:`TargetKind.output_basis`),
one "radial function" per ``o3_lambda`` and element. It always holds
``o3_lambda = 0``, whose descriptor block the kernel model needs for every element;
a dipole's ``o3_lambda = 0`` contributions are not part of its sum (no metric
couples them: their weights solve to zero).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Sequence, Tuple

import ase
import ase.data
import numpy as np

from . import layout, tensors
from .basis import BasisSet, Shell
from .dataset import PROPERTY_FILES, SETTINGS_FILE, DatasetFolder


@dataclasses.dataclass(frozen=True)
class TargetKind:
    """One kind of learning target.

    Parameters
    ----------
    name : str
        ``"density"``, ``"dipole"`` or ``"polarizability"`` (:data:`KINDS`).
    fields : tuple of str
        The data fields it reads (:data:`rholearn.data.TARGET_FILES` keys).
    metric : {"overlap", "identity"}
        The overlap ``S`` of the auxiliary basis, or the plain squared error.
    reduction : {"none", "sum"}
        Per-atom targets, or the sum of per-atom contributions over a structure.
    lambdas : tuple of int
        ``o3_lambda`` blocks of a structure's tensor (empty for the density).
    """

    name: str
    fields: Tuple[str, ...]
    metric: str
    reduction: str
    lambdas: Tuple[int, ...] = ()

    @property
    def is_tensor(self) -> bool:
        """Whether the target is one tensor per structure (summed over atoms)."""
        return self.reduction == "sum"

    def output_basis(self, elements: Sequence[str]) -> BasisSet:
        """The per-atom output blocks of a tensor kind as a basis: for each element,
        one shell per ``o3_lambda`` of the tensor, and ``o3_lambda = 0`` (see the
        module docstring); its keys are the model's ``(o3_lambda, 1, Z)``."""
        lambdas = sorted(set(self.lambdas) | {0})
        return BasisSet(f"rholearn-{self.name}",
                        {symbol: [Shell(l) for l in lambdas] for symbol in elements})


KINDS: Dict[str, TargetKind] = {
    "density": TargetKind("density", ("coefficients", "overlap"), "overlap", "none"),
    **{name: TargetKind(name, (name,), "identity", "sum", tensors.LAMBDAS[rank])
       for name, rank in tensors.RANKS.items()},
}
"""The target kinds by name (``FitOptions.target``, saved models)."""


def target_kind(name: str) -> TargetKind:
    """The kind named ``name``; a ``ValueError`` lists the known ones."""
    if name not in KINDS:
        raise ValueError(f"unknown target '{name}', expected one of {sorted(KINDS)}")
    return KINDS[name]


def check_properties(folder: DatasetFolder, kind: TargetKind, indices: Sequence[int]) -> None:
    """Refuse, before any work, a dataset that lacks ``kind``'s file for one of
    ``indices``, and (dipoles) a charged structure, whose dipole depends on the origin
    and is not a sum of atomic contributions.

    Raises
    ------
    ValueError
        Naming the structure, the missing file and how to compute it.
    """
    file_name = PROPERTY_FILES[kind.name]
    for index in indices:
        path = os.path.join(layout.structure_dir(folder.root, index), file_name)
        if not os.path.isfile(path):
            settings = os.path.join(folder.root, SETTINGS_FILE)
            raise ValueError(
                f"structure {index} of '{folder.root}' has no '{file_name}': the dataset "
                f"was computed without the {kind.name} (see 'properties' in '{settings}'); "
                f"compute it with `rhocalc pyscf STRUCTURES --out DATASET --properties "
                f"{kind.name}`"
            )
        charge = folder.frames[index].info.get("charge", 0)
        if kind.name == "dipole" and charge:
            raise ValueError(
                f"structure {index} of '{folder.root}' has charge {charge}: the dipole of a "
                "charged structure depends on the origin and is not learned as a sum of "
                "atomic contributions"
            )


def structure_baseline(targets: Sequence, frames: Sequence[ase.Atoms],
                       elements: Sequence[str]) -> Dict[int, List[float]]:
    """Per-element ``o3_lambda = 0`` contributions ``b_Z`` fitted by least squares to
    structure tensors: ``y_0(s) ~ sum_Z count_Z(s) b_Z`` (minimum-norm where the
    compositions do not determine them, e.g. all waters).

    Parameters
    ----------
    targets : sequence of TensorMap
        One structure tensor each (:mod:`rholearn.tensors` layout); without an
        ``o3_lambda = 0`` block the baseline is empty.
    frames : sequence of ase.Atoms
        The structures of ``targets``, in order.
    elements : sequence of str
        The model's elements.

    Returns
    -------
    dict
        ``center_type -> [b_Z]``, the means of :class:`rholearn.models.Baseline`.
    """
    values = []
    for tensor in targets:
        found = [block for key, block in tensor.items() if int(key["o3_lambda"]) == 0]
        if not found:
            return {}
        values.append(float(layout._to_numpy(found[0].values).reshape(-1)[0]))
    numbers = [ase.data.atomic_numbers[symbol] for symbol in elements]
    counts = np.array([[np.count_nonzero(atoms.numbers == z) for z in numbers]
                       for atoms in frames], dtype=np.float64)
    means = np.linalg.lstsq(counts, np.array(values), rcond=None)[0]
    return {z: [float(b)] for z, b in zip(numbers, means)}
