"""Target datasets on disk as torch datasets: reading, lazy loading, batching, splitting.

A dataset folder is written by :mod:`rhocalc.batch` (file names in
:mod:`rholearn.layout`)::

    DATASET/basis.json  structures.xyz  failures.json  0/  1/  ...
    DATASET/<i>/coefficients.mts  projections.mts  overlap.mts  info.json

A structure folder that exists is complete. :func:`read_dataset` finds the
completed structures, :func:`make_dataset` wraps them in a
:class:`metatensor.learn.IndexedDataset` whose target fields are read from disk
only when a sample is accessed, and :func:`make_dataloader` batches samples by
joining their TensorMaps along the samples axis (``system`` tells structures
apart).
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import ase
import ase.io
import numpy as np
import torch
import metatensor.torch as mts
from metatensor.learn.data import DataLoader, IndexedDataset, group_and_join

from . import layout
from .basis import BasisSet

TARGET_FILES = {
    "coefficients": layout.COEFFICIENTS_FILE,
    "projections": layout.PROJECTIONS_FILE,
    "overlap": layout.OVERLAP_FILE,
}
"""Name of each target field of a dataset -> its file in a structure folder."""

Descriptors = Union[Callable[[int], mts.TensorMap], mts.TensorMap]
"""Descriptors of a dataset: ``index -> TensorMap`` (lazy), or one TensorMap holding
every structure (split by its ``system`` sample dimension)."""


class DatasetFolder(NamedTuple):
    """What a dataset folder holds, as read by :func:`read_dataset`."""

    root: str
    frames: List[ase.Atoms]
    """Every input structure, in file order (positions in Angstrom)."""
    basis: BasisSet
    indices: List[int]
    """Completed structures, ascending."""
    failures: Dict[int, str]
    """Failed structures (without a folder) and why, from ``failures.json``."""


# ------------------------------------------------------------------ reading ---
def read_dataset(root: str, basis: Optional[BasisSet] = None) -> DatasetFolder:
    """Read a dataset folder's structures, basis and list of completed structures.

    Failed structures (listed in ``failures.json`` and without a folder) are
    skipped with a warning naming them and their reason.

    Parameters
    ----------
    root : str
        The dataset folder.
    basis : BasisSet, optional
        The basis a model was built for; if given, the dataset's ``basis.json``
        must be identical to it.

    Raises
    ------
    FileNotFoundError
        If the folder, ``basis.json`` or ``structures.xyz`` is missing.
    ValueError
        If no structure is completed, or the basis differs from ``basis``.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no such dataset folder: '{root}'")
    basis_path = _existing(os.path.join(root, layout.BASIS_FILE))
    dataset_basis = BasisSet.load(basis_path)
    if basis is not None:
        check_same_basis(basis, dataset_basis, where=basis_path)
    frames = ase.io.read(_existing(os.path.join(root, layout.STRUCTURES_FILE)), index=":")
    indices = [
        i for i in range(len(frames)) if os.path.isdir(layout.structure_dir(root, i))
    ]
    failures = {
        i: str(failure)  # "name, error: reason"
        for i, failure in layout.read_failures(root).items()
        if i not in indices
    }
    if failures:
        warnings.warn(
            f"{len(failures)} of {len(frames)} structures in '{root}' failed and are "
            f"skipped: {_summarise(failures)}",
            stacklevel=2,
        )
    if not indices:
        raise ValueError(f"no completed structures in '{root}'")
    return DatasetFolder(root, frames, dataset_basis, indices, failures)


def check_same_basis(expected: BasisSet, found: BasisSet, where: str) -> None:
    """Raise a ``ValueError`` naming both bases and their first difference.

    Parameters
    ----------
    expected : BasisSet
        The basis of the model.
    found : BasisSet
        The basis of the targets, read from ``where``.
    """
    if expected == found:
        return
    if expected.name != found.name:
        difference = "the names differ"
    elif expected.elements != found.elements:
        difference = f"elements {found.elements} instead of {expected.elements}"
    else:
        symbol = next(s for s in expected.elements if expected.shells[s] != found.shells[s])
        difference = (
            f"element {symbol} has radial functions per l {found.n_radial(symbol)} "
            f"instead of {expected.n_radial(symbol)}, or different exponents"
        )
    raise ValueError(
        f"targets in '{where}' use basis '{found.name}' which differs from the "
        f"model's basis '{expected.name}': {difference}"
    )


def _existing(path: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"missing file '{path}'")
    return path


def _summarise(failures: Dict[int, str], shown: int = 5) -> str:
    text = "; ".join(f"{i}: {reason}" for i, reason in list(failures.items())[:shown])
    if len(failures) > shown:
        text += f"; and {len(failures) - shown} more"
    return text


# ----------------------------------------------------------------- datasets ---
class TargetFile:
    """Lazy data field: reads one target file of a structure when called.

    Calling it with a structure index loads ``<root>/<index>/<file_name>``
    with :func:`metatensor.torch.load`, checks it and moves it to ``dtype``
    and ``device``. Picklable, so data loaders may use worker processes.

    Raises
    ------
    FileNotFoundError
        If the file is missing (the error names it).
    ValueError
        If it holds NaN or infinite values, or samples of another ``system``
        than the structure index (the error names structure and file).
    """

    def __init__(self, root: str, file_name: str, dtype: torch.dtype, device: torch.device):
        self.root = root
        self.file_name = file_name
        self.dtype = dtype
        self.device = device

    def path(self, index: int) -> str:
        return os.path.join(layout.structure_dir(self.root, index), self.file_name)

    def __call__(self, index: int) -> mts.TensorMap:
        path = _existing(self.path(index))
        try:
            tensor = mts.load(path)
        except Exception as error:  # metatensor raises its own error types
            raise ValueError(f"structure {index}: cannot read '{path}': {error}") from error
        _check_targets(tensor, index, path)
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
        Which of ``"coefficients"``, ``"projections"``, ``"overlap"`` to load.
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
        field = TargetFile(folder.root, TARGET_FILES[name], dtype, device)
        for i in indices:
            _existing(field.path(i))
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
