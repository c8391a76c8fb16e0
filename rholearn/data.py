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
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import ase
import numpy as np
import torch
import metatensor.torch as mts
from metatensor.learn.data import DataLoader, IndexedDataset, group_and_join

from . import layout
from .dataset import DatasetFolder, existing_file

TARGET_FILES = {
    "coefficients": layout.COEFFICIENTS_FILE,
    "projections": layout.PROJECTIONS_FILE,
    "overlap": layout.OVERLAP_FILE,
}
"""Name of each target field of a dataset -> its file in a structure folder."""

Descriptors = Union[Callable[[int], mts.TensorMap], mts.TensorMap]
"""Descriptors of a dataset: ``index -> TensorMap`` (lazy), or one TensorMap holding
every structure (split by its ``system`` sample dimension)."""


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
        path = existing_file(self.path(index))
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
