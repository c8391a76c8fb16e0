"""Target datasets on disk as torch datasets: lazy loading, batching, splitting.

A dataset folder (its rules and :func:`~rholearn.dataset.read_dataset`: :mod:`rholearn.dataset`)::

    DATASET/basis.json  structures.xyz  settings.json  failures.json  0/  1/  ...
    DATASET/<i>/coefficients.mts  projections.mts  overlap.mts  info.json

:func:`make_dataset` wraps its completed structures in a
:class:`metatensor.learn.IndexedDataset` whose target fields are read from disk
only when a sample is accessed, and :func:`make_dataloader` batches samples by
joining their TensorMaps along the samples axis (``system`` tells structures
apart).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import ase
import ase.data
import numpy as np
import torch
import metatensor.torch as mts
from metatensor.learn.data import DataLoader, IndexedDataset, group_and_join

from . import layout, tensors
from .basis import BasisSet
from .dataset import PROPERTY_FILES, DatasetFolder, existing_file

TARGET_FILES = {
    "coefficients": layout.COEFFICIENTS_FILE,
    "projections": layout.PROJECTIONS_FILE,
    "overlap": layout.OVERLAP_FILE,
    **PROPERTY_FILES,
}
"""Name of each target field of a dataset -> its file in a structure folder (the
molecular tensors ``dipole`` and ``polarizability``: :data:`rholearn.dataset.PROPERTY_FILES`)."""

Descriptors = Union[Callable[[int], mts.TensorMap], mts.TensorMap]
"""Descriptors of a dataset: ``index -> TensorMap`` (lazy), or one TensorMap holding
every structure (split by its ``system`` sample dimension)."""


# ----------------------------------------------------------------- datasets ---
class TargetFile:
    """Lazy data field: reads one target file of a structure when called.

    Calling it with a structure index loads ``<root>/<index>/<file_name>``
    with :func:`metatensor.torch.load`, checks it and moves it to ``dtype``
    and ``device``. Picklable, so data loaders may use worker processes.

    With ``folder`` (the dataset, from :func:`~rholearn.dataset.read_dataset`),
    the file is also checked against its structure's atoms and the dataset's
    basis (:func:`check_complete`): a file lacking blocks or atoms would train
    on a wrong metric (an overlap without some blocks is not positive definite).

    Raises
    ------
    FileNotFoundError
        If the file is missing (the error names it).
    ValueError
        If it holds NaN or infinite values, samples of another ``system``
        than the structure index, or (with ``folder``) not every block and atom
        of its structure; the error names structure and file.
    """

    def __init__(self, root: str, file_name: str, dtype: torch.dtype, device: torch.device,
                 folder: Optional[DatasetFolder] = None):
        self.root = root
        self.file_name = file_name
        self.dtype = dtype
        self.device = device
        self.folder = folder

    def path(self, index: int) -> str:
        return os.path.join(layout.structure_dir(self.root, index), self.file_name)

    def __call__(self, index: int) -> mts.TensorMap:
        path = existing_file(self.path(index))
        try:
            tensor = mts.load(path)
        except Exception as error:  # metatensor raises its own error types
            raise ValueError(f"structure {index}: cannot read '{path}': {error}") from error
        _check_targets(tensor, index, path)
        if self.folder is not None:
            check_complete(tensor, self.folder.frames[index].numbers, self.folder.basis,
                           f"structure {index}: '{path}'")
        return tensor.to(dtype=self.dtype, device=self.device)


def _check_targets(tensor: mts.TensorMap, index: int, path: str) -> None:
    """Finite values, and every sample belonging to ``system == index``."""
    for key, block in tensor.items():
        if not torch.isfinite(block.values).all():
            raise ValueError(
                f"structure {index}: NaN or infinite values in '{path}' (block {key})"
            )
        systems = torch.unique(block.samples.column("system")).tolist()
        if len(block.samples) > 0 and systems != [index]:
            raise ValueError(
                f"structure {index}: '{path}' holds samples of system(s) {systems}, "
                f"expected only {index}"
            )


def check_complete(tensor: mts.TensorMap, numbers: Sequence[int], basis: BasisSet,
                   where: str) -> None:
    """Raise a ``ValueError`` (prefixed ``where``) unless ``tensor`` holds every block
    and atom of a structure with atomic numbers ``numbers`` in ``basis``.

    A coefficient or projection TensorMap (keys ``o3_lambda, o3_sigma,
    center_type``) must have one block per key of :meth:`BasisSet.keys` with every
    atom of that element. An overlap (atom-pair keys, :mod:`rholearn.layout`) may
    drop pairs of distant atoms, but every atom's pair with itself must be there,
    and a pair that is there must be in every block of its two elements, in both
    orders: otherwise the matrix is not the overlap, and losses in its metric
    can be negative. A molecular tensor (keys ``o3_lambda, o3_sigma``,
    :mod:`rholearn.tensors`) must have one sample, the structure, in every block
    (which ``o3_lambda`` blocks a dipole or polarisability has:
    :class:`rholearn.reduction.StructureTensor`).
    """
    if tensor.keys.names == tensors.KEY_NAMES:
        _check_structure_blocks(tensor, where)
        return
    symbols = [ase.data.chemical_symbols[int(z)] for z in numbers]
    expected = {(l, z) for l, _, z in basis.keys(symbols)}
    if tensor.keys.names == layout.KEY_NAMES:
        _check_atom_blocks(tensor, numbers, expected, where)
    else:
        _check_pair_blocks(tensor, numbers, expected, where)


def _check_structure_blocks(tensor, where: str) -> None:
    for key, block in tensor.items():
        if len(block.samples) != 1:
            raise ValueError(f"{where}: block o3_lambda={int(key['o3_lambda'])} holds "
                             f"{len(block.samples)} samples, a molecular tensor one (the "
                             "structure)")


def _check_atom_blocks(tensor, numbers, expected, where: str) -> None:
    found = {(int(key["o3_lambda"]), int(key["center_type"])) for key in tensor.keys}
    missing = sorted(expected - found)
    if missing:
        l, z = missing[0]
        raise ValueError(f"{where} has no block o3_lambda={l}, center_type={z} "
                         f"({len(missing)} block(s) of the basis missing)")
    for key, block in tensor.items():
        z = int(key["center_type"])
        atoms = sorted(torch.unique(block.samples.column("atom")).tolist())
        wanted = [i for i, number in enumerate(numbers) if int(number) == z]
        if atoms != wanted:
            raise ValueError(f"{where}: block o3_lambda={int(key['o3_lambda'])}, "
                             f"center_type={z} holds atoms {atoms}, the structure has {wanted}")


def _check_pair_blocks(tensor, numbers, expected, where: str) -> None:
    n_atoms = len(numbers)
    n_l: Dict[int, int] = {}  # l values of each element
    for _, z in expected:
        n_l[z] = n_l.get(z, 0) + 1
    codes = []  # atom pair (i, j) as i * n_atoms + j, once per block holding it
    for block in tensor.blocks():
        i, j = (block.samples.column(name).to(torch.int64) for name in ("atom_1", "atom_2"))
        atoms = torch.cat([i, j])
        outside = atoms[(atoms < 0) | (atoms >= n_atoms)]
        if len(outside):
            raise ValueError(f"{where} holds atom {int(outside[0])}, the structure has "
                             f"{n_atoms} atoms")
        codes.append(i * n_atoms + j)
    codes = torch.cat(codes) if codes else torch.zeros(0, dtype=torch.int64)
    pairs, counts = torch.unique(codes, return_counts=True)
    types = torch.tensor([n_l.get(int(z), 0) for z in numbers], dtype=torch.int64)
    first, second = pairs // n_atoms, pairs % n_atoms
    wanted = types[first] * types[second]
    diagonal = set((pairs[first == second] // n_atoms).tolist())
    lonely = [i for i in range(n_atoms) if i not in diagonal]
    if lonely:
        raise ValueError(f"{where} lacks the blocks of atom {lonely[0]} with itself: "
                         "an incomplete overlap")
    short = torch.nonzero(counts != wanted).flatten()
    if len(short):
        k = int(short[0])
        raise ValueError(
            f"{where}: atom pair ({int(first[k])}, {int(second[k])}) is in {int(counts[k])} "
            f"blocks, its elements' l pairs make {int(wanted[k])}: an incomplete overlap"
        )
    transposed = set((second * n_atoms + first).tolist())
    if transposed != set(pairs.tolist()):
        k = next(c for c in transposed - set(pairs.tolist()))
        raise ValueError(f"{where} holds atom pair ({k % n_atoms}, {k // n_atoms}) but not "
                         f"({k // n_atoms}, {k % n_atoms}): an incomplete overlap")


class StructureDescriptors:
    """Lazy descriptor field: the descriptor of one structure from a calculator.

    Calling it with a structure index returns
    ``calculator.compute_cached([frames[index]], [index], cache_dir)`` (computed
    once, then read from the cache), or ``calculator.compute([frames[index]],
    [index])`` without ``cache_dir``; e.g. with a
    :class:`rholearn.descriptors.LambdaSoap`.

    Parameters
    ----------
    calculator
        Has ``compute(frames, system_ids)`` (and ``compute_cached`` for a cache).
    frames : sequence of ase.Atoms
        All structures of the dataset (Angstrom), indexed by structure index.
    cache_dir : str, optional
        Folder of one descriptor file per structure.
    """

    def __init__(self, calculator, frames: Sequence[ase.Atoms], cache_dir: Optional[str] = None):
        self.calculator = calculator
        self.frames = frames
        self.cache_dir = cache_dir

    def __call__(self, index: int) -> mts.TensorMap:
        frames = [self.frames[index]]
        if self.cache_dir is None:
            return self.calculator.compute(frames, [index])
        return self.calculator.compute_cached(frames, [index], self.cache_dir)


class DescriptorsOnDevice:
    """Lazy data field: a descriptor callable's result moved to ``dtype``/``device``."""

    def __init__(self, compute: Callable[[int], mts.TensorMap], dtype, device):
        self.compute = compute
        self.dtype = dtype
        self.device = device

    def __call__(self, index: int) -> mts.TensorMap:
        return self.compute(index).to(dtype=self.dtype, device=self.device)


def make_dataset(
    folder: DatasetFolder,
    indices: Optional[Sequence[int]] = None,
    descriptors: Optional[Descriptors] = None,
    targets: Sequence[str] = ("coefficients", "projections", "overlap"),
    dtype: torch.dtype = torch.float64,
    device: Union[str, torch.device] = "cpu",
) -> IndexedDataset:
    """A dataset over completed structures, with target files read lazily.

    Each sample has the fields ``sample_id`` (the structure index), ``frame``
    (the :class:`ase.Atoms`), ``descriptor`` (if ``descriptors`` is given) and
    one field per name in ``targets``. Target TensorMaps are loaded from disk
    each time a sample is accessed (by :class:`TargetFile`), so memory does not
    grow with the dataset size.

    Parameters
    ----------
    folder : DatasetFolder
        From :func:`read_dataset`.
    indices : sequence of int, optional
        Structures to include (default: all completed ones).
    descriptors : callable or TensorMap, optional
        ``index -> TensorMap``, called when a sample is accessed (e.g. a
        :class:`StructureDescriptors`), or one precomputed TensorMap with the
        samples of all ``indices`` in its ``system`` dimension.
    targets : sequence of str
        Which of :data:`TARGET_FILES` to load (``"coefficients"``, ``"projections"``,
        ``"overlap"``, ``"dipole"``, ``"polarizability"``).
    dtype, device
        Of every TensorMap the dataset returns.

    Raises
    ------
    ValueError
        If an index is not a completed structure of ``folder`` or a target name
        is unknown.
    FileNotFoundError
        If a target file of a requested structure is missing (checked now, so
        that training does not stop half-way).
    """
    indices = list(folder.indices if indices is None else indices)
    check_completed(folder, indices)
    device = torch.device(device)
    fields: Dict[str, object] = {"frame": [folder.frames[i] for i in indices]}
    if descriptors is not None:
        fields["descriptor"] = _descriptor_field(descriptors, indices, dtype, device)
    for name in targets:
        if name not in TARGET_FILES:
            raise ValueError(f"unknown target '{name}', expected one of {list(TARGET_FILES)}")
        field = TargetFile(folder.root, TARGET_FILES[name], dtype, device, folder)
        for i in indices:
            existing_file(field.path(i))
        fields[name] = field
    return IndexedDataset(sample_id=indices, **fields)


def check_completed(folder: DatasetFolder, indices: Sequence[int]) -> None:
    """Raise a ``ValueError`` naming the first of ``indices`` without targets (and why)."""
    completed = set(folder.indices)
    for i in indices:
        if i not in completed:
            reason = folder.failures.get(i, "no structure folder")
            raise ValueError(f"structure {i} is not completed in '{folder.root}': {reason}")


def _descriptor_field(descriptors: Descriptors, indices: List[int], dtype, device):
    """A callable stays lazy; one TensorMap is split into one per structure
    (without the blocks of elements a structure does not have)."""
    if callable(descriptors):
        return DescriptorsOnDevice(descriptors, dtype, device)
    selections = [
        mts.Labels(["system"], torch.tensor([[i]], dtype=torch.int32)).to(descriptors.device)
        for i in indices
    ]
    return [
        mts.drop_empty_blocks(tensor).to(dtype=dtype, device=device)
        for tensor in mts.split(descriptors, axis="samples", selections=selections)
    ]


# ------------------------------------------------------------------ loading ---
def collate(batch: List[NamedTuple]) -> NamedTuple:
    """Join the samples of a batch: TensorMaps along samples (union of keys).

    Structures with different elements have different keys; missing blocks are
    treated as empty. Other fields (``sample_id``, ``frame``) become tuples.
    """
    return group_and_join(batch, join_kwargs={"different_keys": "union"})


def make_dataloader(
    dataset: IndexedDataset,
    batch_size: int,
    shuffle: bool = False,
    generator: Optional[torch.Generator] = None,
    **kwargs,
) -> DataLoader:
    """A :class:`metatensor.learn.DataLoader` batching with :func:`collate`.

    Parameters
    ----------
    generator : torch.Generator, optional
        Drives the shuffling; saving and restoring its state reproduces the
        order of the following epochs.
    **kwargs
        Passed to :class:`torch.utils.data.DataLoader` (``num_workers``, ...).
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=collate,
        **kwargs,
    )


# ---------------------------------------------------------------- splitting ---
def split_indices(
    indices: Sequence[int],
    n_train: Optional[int] = None,
    n_val: Optional[int] = None,
    n_test: Optional[int] = None,
    fractions: Optional[Tuple[float, float, float]] = None,
    seed: int = 0,
) -> Tuple[List[int], List[int], List[int]]:
    """Shuffle ``indices`` with ``seed`` and cut them into train, val, test.

    Give either the counts (``n_test`` defaults to all remaining structures)
    or ``fractions`` (train, val, test; rounded down, the remainder is unused).
    The same ``indices`` and ``seed`` always give the same split. Each subset
    is returned sorted.
    """
    indices = list(indices)
    if fractions is not None:
        if n_train is not None or n_val is not None or n_test is not None:
            raise ValueError("give either n_train/n_val/n_test or fractions, not both")
        if any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-12:
            raise ValueError(f"fractions {fractions} must be >= 0 and sum to at most 1")
        n_train, n_val, n_test = (int(f * len(indices)) for f in fractions)
    if n_train is None or n_val is None:
        raise ValueError("give n_train and n_val, or fractions")
    if n_test is None:
        n_test = len(indices) - n_train - n_val
    if min(n_train, n_val, n_test) < 0 or n_train + n_val + n_test > len(indices):
        raise ValueError(
            f"cannot split {len(indices)} structures into {n_train} train, "
            f"{n_val} validation and {n_test} test structures"
        )
    shuffled = [indices[i] for i in np.random.default_rng(seed).permutation(len(indices))]
    cuts = np.cumsum([n_train, n_val, n_test])
    return (
        sorted(shuffled[: cuts[0]]),
        sorted(shuffled[cuts[0] : cuts[1]]),
        sorted(shuffled[cuts[1] : cuts[2]]),
    )


SPLIT_SUBSETS = ("train", "val", "test")
"""The subsets of a split, in order."""


def check_split(
    split: Any, where: str, folder: Optional[DatasetFolder] = None
) -> Dict[str, List[int]]:
    """A split (structure indices under ``"train"``, ``"val"``, ``"test"``; a
    missing or empty subset is empty) checked and sorted.

    Parameters
    ----------
    split
        The split as read from a file or given to :func:`rholearn.workflow.fit`.
    where : str
        Names the split in errors (the split file).
    folder : DatasetFolder, optional
        If given, every index must be a completed structure of it.

    Raises
    ------
    ValueError
        Naming ``where`` and the index at fault: not a mapping of lists, an
        unknown subset, an index that is not a non-negative integer (``1.5``,
        ``"3"``, ``true``), twice in a subset or in two subsets, or (with
        ``folder``) not a completed structure.
    """
    if not isinstance(split, Mapping):
        raise ValueError(f"split '{where}' must map {list(SPLIT_SUBSETS)} to lists of "
                         f"structure indices, got {type(split).__name__}")
    unknown = sorted(str(name) for name in set(split) - set(SPLIT_SUBSETS))
    if unknown:
        raise ValueError(f"split '{where}' has unknown subset '{unknown[0]}', expected some "
                         f"of {list(SPLIT_SUBSETS)}")
    checked: Dict[str, List[int]] = {}
    subset_of: Dict[int, str] = {}
    for name in SPLIT_SUBSETS:
        indices = split.get(name) or []
        if not isinstance(indices, (list, tuple)):
            raise ValueError(f"split '{where}': '{name}' must be a list of structure indices, "
                             f"got {indices!r}")
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
                raise ValueError(f"split '{where}': '{name}' holds {index!r}, not a "
                                 "structure index (an integer >= 0)")
            if int(index) in subset_of:
                place = ("twice in" if subset_of[int(index)] == name
                         else f"in '{subset_of[int(index)]}' and in")
                raise ValueError(f"split '{where}': structure {index} is {place} '{name}'")
            subset_of[int(index)] = name
        checked[name] = sorted(int(index) for index in indices)
    if folder is not None:
        for name, indices in checked.items():
            try:
                check_completed(folder, indices)
            except ValueError as error:
                raise ValueError(f"split '{where}', '{name}': {error}") from None
    return checked


def check_trained_elements(folder: DatasetFolder, split: Mapping[str, Sequence[int]]) -> None:
    """Raise a ``ValueError`` if a validation or test structure has an element
    that no training structure has (the model could not learn it), naming the
    elements and the structures."""
    trained = {z for i in split["train"] for z in folder.frames[i].numbers.tolist()}
    untrained: Dict[str, List[int]] = {}
    for name in SPLIT_SUBSETS[1:]:
        for i in split.get(name, ()):
            for z in sorted(set(folder.frames[i].numbers.tolist()) - trained):
                untrained.setdefault(ase.data.chemical_symbols[z], []).append(i)
    if untrained:
        details = "; ".join(f"{symbol} in structures {indices}"
                            for symbol, indices in sorted(untrained.items()))
        raise ValueError(
            f"element(s) {sorted(untrained)} of '{folder.root}' are only in validation or "
            f"test structures ({details}), in none of the training structures: the model "
            "cannot learn them; put some of these structures in the training set"
        )
