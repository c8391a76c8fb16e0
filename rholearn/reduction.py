"""Molecular tensors as sums of per-atom equivariant contributions.

A model of a tensor kind (:mod:`rholearn.kinds`) predicts, for each atom ``i`` and
``o3_lambda`` of the tensor, a contribution ``a_i`` (block ``(lambda, 1, Z_i)``, one
property); the structure's tensor is ``y = R a = sum_i a_i`` (:class:`SumOverAtoms`).
Each contribution rotates with the Wigner matrix ``D^lambda``, so their sum does too.

The squared error of a structure, ``|R A theta - y|^2``, is the overlap loss of the
direct solve (:mod:`rholearn.solve`) with the metric ``M = R^T R`` in place of the
overlap and any per-atom target ``t`` with ``R t = y``. Both are written in the
layouts the solve reads, so it runs unchanged:

- :func:`sum_metric`: ``M`` in the atom-pair layout of an overlap (every pair of the
  structure's atoms, both orders, identity over ``m``, for each ``o3_lambda`` of the
  tensor);
- :func:`atom_targets`: ``t`` in the coefficient layout, the structure's tensor on
  its first atom and zero on the others;

and :func:`make_tensor_dataset` serves them as the ``coefficients`` and ``overlap``
fields of a dataset, next to the tensor itself (field ``<kind name>``). Then
``t^T M t = |y|^2``, and a per-element ``o3_lambda = 0`` baseline ``b`` subtracted
from ``t`` gives ``R (t - b) = y - sum_i b_{Z_i}``, as for densities.
"""

from typing import Dict, List, Sequence, Union

import ase
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatensor.learn.data import IndexedDataset

from . import layout
from .basis import BasisSet
from .data import TARGET_FILES, DescriptorsOnDevice, TargetFile
from .dataset import DatasetFolder
from .kinds import TargetKind, check_properties


class SumOverAtoms(torch.nn.Module):
    """Per-atom contributions ``(lambda, 1, Z)`` -> one tensor per structure.

    TorchScript-compatible. The output has keys ``o3_lambda, o3_sigma`` (one per
    entry of ``lambdas``), samples ``system`` (sorted) and the contributions'
    components and properties: the layout of :mod:`rholearn.tensors`. Blocks of
    other ``o3_lambda`` are dropped.

    Parameters
    ----------
    lambdas : sequence of int
        The ``o3_lambda`` of the tensor's blocks.
    """

    lambdas: List[int]  # (typed for TorchScript, also when empty)

    def __init__(self, lambdas: Sequence[int]):
        super().__init__()
        self.lambdas = [int(l) for l in lambdas]

    def forward(self, contributions: TensorMap) -> TensorMap:
        keys: List[List[int]] = []
        blocks: List[TensorBlock] = []
        for l in self.lambdas:
            parts: List[TensorBlock] = []
            for index in range(len(contributions.keys)):
                if int(contributions.keys.values[index, 0]) == l:
                    parts.append(contributions.block_by_id(index))
            values = torch.cat([part.values for part in parts])
            system = torch.cat([part.samples.column("system") for part in parts])
            systems, rows = torch.unique(system, sorted=True, return_inverse=True)
            shape: List[int] = [len(systems)] + list(values.shape[1:])
            summed = values.new_zeros(shape)
            summed.index_add_(0, rows, values)
            blocks.append(TensorBlock(
                summed, Labels(["system"], systems.reshape(-1, 1)),
                parts[0].components, parts[0].properties,
            ))
            keys.append([l, 1])
        return TensorMap(
            Labels(["o3_lambda", "o3_sigma"], torch.tensor(keys, dtype=torch.int32).reshape(-1, 2)).to(
                contributions.device
            ),
            blocks,
        )


def _atoms_of(numbers: Sequence[int]) -> Dict[int, List[int]]:
    """Atomic number -> the structure's atoms of that element, in order."""
    atoms: Dict[int, List[int]] = {}
    for i, z in enumerate(numbers):
        atoms.setdefault(int(z), []).append(i)
    return atoms


def atom_targets(tensor: TensorMap, numbers: Sequence[int], system: int,
                 basis: BasisSet) -> TensorMap:
    """A per-atom target ``t`` with ``R t = y`` for one structure's tensor ``y``.

    Parameters
    ----------
    tensor : TensorMap
        metatensor-torch, :mod:`rholearn.tensors` layout, one structure.
    numbers : sequence of int
        The structure's atomic numbers.
    system : int
        Its ``system`` sample.
    basis : BasisSet
        The output basis (:meth:`rholearn.kinds.TargetKind.output_basis`): the keys.

    Returns
    -------
    TensorMap
        Coefficient layout: blocks ``(lambda, 1, Z)`` of every output key of the
        structure's elements, ``y``'s ``lambda`` block on atom 0, zero elsewhere.
    """
    values_of = {int(key["o3_lambda"]): block.values[0] for key, block in tensor.items()}
    first = tensor.block(0).values
    atoms = _atoms_of(numbers)
    symbols = [ase.data.chemical_symbols[z] for z in atoms]
    keys, blocks = [], []
    for l, sigma, z in basis.keys(symbols):
        values = first.new_zeros(len(atoms[z]), 2 * l + 1, 1)
        if l in values_of and atoms[z][0] == 0:
            values[0] = values_of[l]
        samples = torch.tensor([[system, i] for i in atoms[z]], dtype=torch.int32)
        blocks.append(TensorBlock(
            values, Labels(layout.SAMPLE_NAMES, samples.to(first.device)),
            [Labels([layout.COMPONENT_NAME], torch.arange(-l, l + 1, dtype=torch.int32).reshape(-1, 1)).to(first.device)],
            Labels([layout.PROPERTY_NAME], torch.zeros(1, 1, dtype=torch.int32)).to(first.device),
        ))
        keys.append([l, sigma, z])
    return TensorMap(Labels(layout.KEY_NAMES, torch.tensor(keys, dtype=torch.int32)).to(first.device),
                     blocks)


def sum_metric(numbers: Sequence[int], system: int, lambdas: Sequence[int],
               dtype: torch.dtype, device: Union[str, torch.device] = "cpu") -> TensorMap:
    """``M = R^T R`` of one structure in the overlap's atom-pair layout
    (:mod:`rholearn.layout`): for each ``lambda`` and element pair, every pair of
    their atoms with the identity ``(2 lambda + 1) x (2 lambda + 1)``."""
    atoms = _atoms_of(numbers)
    keys, blocks = [], []
    for l in sorted(lambdas):
        eye = torch.eye(2 * l + 1, dtype=dtype, device=device)
        mu = torch.arange(-l, l + 1, dtype=torch.int32).reshape(-1, 1)
        for z_1 in sorted(atoms):
            for z_2 in sorted(atoms):
                pairs = torch.tensor([[system, i, j] for i in atoms[z_1] for j in atoms[z_2]],
                                     dtype=torch.int32)
                blocks.append(TensorBlock(
                    eye.expand(len(pairs), -1, -1).reshape(len(pairs), 2 * l + 1, 2 * l + 1, 1).clone(),
                    Labels(layout.PAIR_SAMPLE_NAMES, pairs).to(device),
                    [Labels([name], mu).to(device) for name in layout.PAIR_COMPONENT_NAMES],
                    Labels(layout.PAIR_PROPERTY_NAMES, torch.zeros(1, 2, dtype=torch.int32)).to(device),
                ))
                keys.append([l, l, z_1, z_2])
    return TensorMap(Labels(layout.PAIR_KEY_NAMES, torch.tensor(keys, dtype=torch.int32)).to(device),
                     blocks)


class StructureTensor(TargetFile):
    """Lazy data field: a structure's tensor (``<root>/<index>/<kind>.mts``) as
    metatensor-torch in ``dtype`` and ``device``, checked as a
    :class:`~rholearn.data.TargetFile` and for the kind's ``o3_lambda`` blocks;
    errors name the structure and file."""

    def __init__(self, folder: DatasetFolder, kind: TargetKind, dtype: torch.dtype,
                 device: Union[str, torch.device] = "cpu"):
        super().__init__(folder.root, TARGET_FILES[kind.name], dtype, torch.device(device),
                         folder)
        self.kind = kind

    def __call__(self, index: int) -> TensorMap:
        tensor = super().__call__(index)
        found = tuple(sorted(int(key["o3_lambda"]) for key in tensor.keys))
        if found != self.kind.lambdas:
            raise ValueError(f"structure {index}: '{self.path(index)}' holds blocks "
                             f"o3_lambda={list(found)}; a {self.kind.name} has "
                             f"{list(self.kind.lambdas)}")
        return tensor


class _AtomTargets:
    """Lazy field: :func:`atom_targets` of a structure's tensor."""

    def __init__(self, tensor: StructureTensor, basis: BasisSet):
        self.tensor = tensor
        self.basis = basis

    def __call__(self, index: int) -> TensorMap:
        return atom_targets(self.tensor(index), self.tensor.folder.frames[index].numbers, index,
                            self.basis)


class _SumMetric:
    """Lazy field: :func:`sum_metric` of a structure."""

    def __init__(self, folder: DatasetFolder, kind: TargetKind, dtype, device):
        self.folder, self.kind, self.dtype, self.device = folder, kind, dtype, device

    def __call__(self, index: int) -> TensorMap:
        return sum_metric(self.folder.frames[index].numbers, index, self.kind.lambdas,
                          self.dtype, self.device)


def make_tensor_dataset(folder: DatasetFolder, kind: TargetKind, basis: BasisSet,
                        indices: Sequence[int], descriptors=None,
                        dtype: torch.dtype = torch.float64,
                        device: Union[str, torch.device] = "cpu") -> IndexedDataset:
    """The dataset a tensor model is solved on: fields ``frame``, ``descriptor`` (if
    ``descriptors`` is given: ``index -> TensorMap``), ``<kind.name>`` (the structure's
    tensor), and its per-atom form ``coefficients`` (:func:`atom_targets`) with
    ``overlap`` (:func:`sum_metric`), read by :func:`rholearn.solve.solve_linear`.
    Refuses a structure without the tensor's file (:func:`~rholearn.kinds.check_properties`)."""
    indices = list(indices)
    check_properties(folder, kind, indices)
    tensor = StructureTensor(folder, kind, dtype, device)
    fields: Dict[str, object] = {
        "frame": [folder.frames[i] for i in indices],
        kind.name: tensor,
        "coefficients": _AtomTargets(tensor, basis),
        "overlap": _SumMetric(folder, kind, dtype, torch.device(device)),
    }
    if descriptors is not None:
        fields["descriptor"] = DescriptorsOnDevice(descriptors, dtype, torch.device(device))
    return IndexedDataset(sample_id=indices, **fields)
