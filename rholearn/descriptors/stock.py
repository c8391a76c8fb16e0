"""The stock lambda-SOAP: featomic's ``EquivariantPowerSpectrum``, kept as reference.

:class:`LambdaSoap` wraps featomic's :class:`~featomic.torch.SphericalExpansion`
and :class:`~featomic.torch.clebsch_gordan.EquivariantPowerSpectrum`. The
neighbour types are moved to the properties for a fixed list of atom types, so
a block has the same properties in every structure, whatever elements it holds.

Properties are featomic's ``l_1, l_2, neighbor_1_type, n_1, neighbor_2_type, n_2``;
their number grows with the square of the number of elements. See
:mod:`rholearn.descriptors.contracted` for the fast default.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import ase
import torch
from metatensor.torch import Labels, TensorMap
from metatensor.torch.learn.nn import Module
from metatomic.torch import System

from .. import layout
from .base import Descriptor, Key


class LambdaSoap(Descriptor):
    """Stock featomic lambda-SOAP restricted to a set of target keys.

    Parameters are those of :class:`~rholearn.descriptors.base.Descriptor`.
    """

    kind = "stock"

    def __init__(
        self,
        hypers: dict,
        atom_types: Sequence[int],
        target_keys: Optional[Sequence[Key]] = None,
        dtype: torch.dtype = torch.float64,
        device: Optional[torch.device] = None,
    ):
        super().__init__(hypers, atom_types, target_keys, dtype, device)
        # imported here: featomic's TorchScript extension is loaded (and recorded by an
        # export) only where a stock descriptor is built
        from featomic.torch import SphericalExpansion
        from featomic.torch.clebsch_gordan import EquivariantPowerSpectrum

        self.module = LambdaSoapModule(
            EquivariantPowerSpectrum(
                SphericalExpansion(**self.hypers),
                neighbor_types=self.atom_types,
                dtype=dtype,
                device=self.device,
            ),
            Labels(layout.KEY_NAMES, torch.tensor(self.target_keys, dtype=torch.int32)),
            self.atom_types,
        )
        self.module.to(self.device)

    def n_features(self) -> Dict[Key, int]:
        """Number of properties of each target block.

        Found from featomic's metadata-only computation on a probe structure
        holding one atom of each type, so no Clebsch-Gordan product is computed.
        """
        probe = ase.Atoms(
            numbers=self.atom_types,
            positions=[[0.0, 0.0, 1.5 * i] for i in range(len(self.atom_types))],
        )
        metadata = self.module.calculator.compute_metadata(
            self.systems([probe]),
            selected_keys=self.module.selected_keys,
            neighbors_to_properties=True,
        )
        return {
            tuple(int(x) for x in key.values): len(block.properties)
            for key, block in metadata.items()
        }


class LambdaSoapModule(Module):
    """TorchScript-compatible stock lambda-SOAP: metatomic systems -> TensorMap.

    Samples are numbered ``system = 0 .. len(systems) - 1``. A system with an
    atom type outside ``atom_types`` raises an error (featomic would silently
    ignore it as a neighbour). ``calculator`` is featomic's
    ``featomic.torch.clebsch_gordan.EquivariantPowerSpectrum``.
    """

    def __init__(
        self,
        calculator: torch.nn.Module,
        selected_keys: Labels,
        atom_types: List[int],
    ):
        super().__init__()
        self.calculator = calculator
        self.register_buffer("selected_keys", selected_keys)
        self.atom_types = atom_types

    def forward(self, systems: List[System]) -> TensorMap:
        check_system_types(systems, self.atom_types)
        return self.calculator(
            systems, selected_keys=self.selected_keys, neighbors_to_properties=True
        )


def check_system_types(systems: List[System], atom_types: List[int]) -> None:
    """Raise naming the first system with an atom type outside ``atom_types`` (TorchScript)."""
    for index, system in enumerate(systems):
        known = torch.tensor(atom_types, device=system.types.device)
        if not bool(torch.isin(system.types, known).all()):
            raise ValueError(
                "system " + str(index) + " has atom types outside the descriptor's "
                + str(atom_types)
            )
