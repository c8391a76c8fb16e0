"""Real auxiliary overlaps of small molecules, for the tests of overlap, loss and metrics.

The overlaps are PySCF's ``int1e_ovlp`` of ``def2-universal-jkfit`` in the
canonical order (:mod:`rhocalc.pyscf.order`). Coefficient TensorMaps are built
from random vectors with :func:`rholearn.layout.vector_to_tensormap`, so every
sparse result can be compared with the dense ``numpy`` expression.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import List, Sequence

import ase.build
import ase.data
import metatensor.io
import metatensor.torch as mts
import numpy as np
import torch

from rhocalc.pyscf.basis import basis_set
from rhocalc.pyscf.molecule import aux_molecule
from rhocalc.pyscf.order import matrix_to_canonical
from rholearn import layout

AUXBASIS = "def2-universal-jkfit"


@dataclasses.dataclass
class Structure:
    system: int  # the structure's id in the ``system`` sample dimension
    atomic_numbers: np.ndarray
    overlap: np.ndarray  # dense, canonical order

    @property
    def symbols(self) -> List[str]:
        return [ase.data.chemical_symbols[z] for z in self.atomic_numbers]


@functools.lru_cache(maxsize=None)
def basis():
    return basis_set(AUXBASIS, ["H", "C", "N", "O"])


@functools.lru_cache(maxsize=None)
def _canonical_overlap(formula: str, spacing: float):
    atoms = ase.build.molecule(formula)
    if spacing:  # a second copy, ``spacing`` Angstrom away along x
        other = atoms.copy()
        other.translate([spacing, 0.0, 0.0])
        atoms += other
    molecule = aux_molecule(atoms, basis())
    return atoms.numbers, matrix_to_canonical(molecule.intor("int1e_ovlp"), molecule)


def structure(formula: str, system: int, spacing: float = 0.0) -> Structure:
    """A molecule of ``ase.build.molecule``; with ``spacing``, a dimer of it."""
    numbers, overlap = _canonical_overlap(formula, spacing)
    return Structure(system, numbers, overlap)


def batch(formulas: Sequence[str] = ("H2O", "NH3", "CH4"), first: int = 3) -> List[Structure]:
    """Structures with non-contiguous system ids (3, 5, 7, ...)."""
    return [structure(f, first + 2 * i) for i, f in enumerate(formulas)]


def to_torch(tensor) -> mts.TensorMap:
    """A metatensor-core TensorMap as a metatensor-torch one (float64, CPU)."""
    buffer = bytearray(metatensor.io.save_buffer(tensor))
    return mts.load_buffer(torch.frombuffer(buffer, dtype=torch.uint8))


def coefficients(structures: List[Structure], vectors: List[np.ndarray]) -> mts.TensorMap:
    """Canonical vectors of the structures, joined along samples."""
    return _join(
        [
            layout.vector_to_tensormap(v, s.atomic_numbers, basis(), system=s.system)
            for s, v in zip(structures, vectors)
        ]
    )


def overlaps(structures: List[Structure], threshold: float = layout.OVERLAP_THRESHOLD):
    """The structures' overlaps as pair blocks, joined along samples."""
    return _join(
        [
            layout.matrix_to_pair_tensormap(
                s.overlap, s.atomic_numbers, basis(), system=s.system, threshold=threshold
            )
            for s in structures
        ]
    )


def random_vectors(structures: List[Structure], seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return [scale * rng.standard_normal(len(s.overlap)) for s in structures]


def shuffled(tensor: mts.TensorMap, seed: int) -> mts.TensorMap:
    """The same tensor with the rows of every block in a random order."""
    generator = torch.Generator().manual_seed(seed)
    blocks = []
    for block in tensor.blocks():
        order = torch.randperm(len(block.samples), generator=generator)
        blocks.append(
            mts.TensorBlock(
                block.values[order],
                mts.Labels(block.samples.names, block.samples.values[order]),
                block.components,
                block.properties,
            )
        )
    return mts.TensorMap(tensor.keys, blocks)


def dense_vector(tensor: mts.TensorMap, structure: Structure) -> np.ndarray:
    """The canonical vector of one structure of a joined TensorMap."""
    selection = mts.Labels(["system"], torch.tensor([[structure.system]], dtype=torch.int32))
    single = mts.slice(tensor, "samples", selection)
    return layout.tensormap_to_vector(single, structure.atomic_numbers, basis())


def dense_matrix(tensor: mts.TensorMap, structure: Structure) -> np.ndarray:
    """The dense overlap of one structure, as stored in a joined pair TensorMap."""
    selection = mts.Labels(["system"], torch.tensor([[structure.system]], dtype=torch.int32))
    single = mts.drop_empty_blocks(mts.slice(tensor, "samples", selection))
    return layout.pair_tensormap_to_matrix(single, structure.atomic_numbers, basis())


def _join(tensors) -> mts.TensorMap:
    return mts.join(
        [to_torch(t) for t in tensors],
        axis="samples",
        different_keys="union",
    )
