"""Lambda-SOAP descriptors: equivariant power spectra matching the target blocks.

Two calculators with the same interface and output layout
(:mod:`rholearn.descriptors.base`):

- :class:`ContractedLambdaSoap` (``"contracted"``): the density channels are
  contracted per (centre type, l) by a PCA fitted on training structures, then
  coupled by one dense Clebsch-Gordan product built at construction;
- :class:`LambdaSoap` (``"stock"``): featomic's ``EquivariantPowerSpectrum``,
  kept as reference.

The contracted one takes its spherical expansion from featomic or computes the same
in pure torch on the model's device (option ``expansion``,
:mod:`rholearn.descriptors.expansion`).
"""

from typing import Optional, Sequence

import torch

from .base import CACHE_SETTINGS_FILE, DEFAULT_HYPERS, Descriptor, Key, check_hypers, select_system
from .contracted import DEFAULT_CHANNELS, ContractedLambdaSoap
from .stock import LambdaSoap

DESCRIPTORS = {LambdaSoap.kind: LambdaSoap, ContractedLambdaSoap.kind: ContractedLambdaSoap}
"""Descriptor calculators by name (``FitOptions.descriptor``, saved models)."""


def make_descriptor(
    kind: str,
    hypers: dict,
    atom_types: Sequence[int],
    target_keys: Optional[Sequence[Key]] = None,
    dtype: torch.dtype = torch.float64,
    device: Optional[torch.device] = None,
    **options,
) -> Descriptor:
    """The calculator named ``kind`` (see :data:`DESCRIPTORS`); ``options`` go to it."""
    if kind not in DESCRIPTORS:
        raise ValueError(f"unknown descriptor '{kind}', expected one of {sorted(DESCRIPTORS)}")
    return DESCRIPTORS[kind](hypers, atom_types, target_keys, dtype, device, **options)


__all__ = [
    "CACHE_SETTINGS_FILE",
    "DEFAULT_CHANNELS",
    "DEFAULT_HYPERS",
    "DESCRIPTORS",
    "ContractedLambdaSoap",
    "Descriptor",
    "check_hypers",
    "LambdaSoap",
    "make_descriptor",
    "select_system",
]
