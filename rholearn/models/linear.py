"""Linear equivariant model: one linear map per target block."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from metatensor.torch import Labels
from metatensor.torch.learn.nn import EquivariantLinear

from .. import layout

Key = Tuple[int, int, int]


class LinearModel(EquivariantLinear):
    """Lambda-SOAP block ``(l, sigma, Z)`` -> target block ``(l, sigma, Z)``, linearly.

    The same weights act on every ``o3_mu`` component, so the map is
    equivariant; only invariant blocks (``o3_lambda = 0``) have a bias.

    Parameters
    ----------
    keys : sequence of (o3_lambda, o3_sigma, center_type)
        Target blocks, e.g. :meth:`rholearn.basis.BasisSet.keys`.
    in_features : sequence of int
        Number of descriptor properties of each block.
    out_features : sequence of int
        Number of radial channels ``n`` of each target block.
    seed : int
        Seed of the weight initialisation.
    dtype : torch.dtype
    device : torch.device or str, optional

    Notes
    -----
    ``forward(descriptor)`` maps the blocks present in ``descriptor`` (a subset of
    ``keys``) and returns them with properties ``n``: a key absent from a batch is
    absent from the output.
    """

    def __init__(
        self,
        keys: Sequence[Key],
        in_features: Sequence[int],
        out_features: Sequence[int],
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        device: Optional[torch.device] = None,
    ):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            super().__init__(
                in_keys=key_labels(keys),
                in_features=[int(n) for n in in_features],
                out_properties=radial_labels(out_features),
                bias=True,
                dtype=dtype,
            )
        self.to(device)


def key_labels(keys: Sequence[Key]) -> Labels:
    """``Labels`` of target keys ``(o3_lambda, o3_sigma, center_type)``."""
    return Labels(layout.KEY_NAMES, torch.tensor([list(key) for key in keys], dtype=torch.int32))


def radial_labels(out_features: Sequence[int]) -> list:
    """Properties ``n = 0 .. count - 1`` of each target block."""
    return [Labels.range(layout.PROPERTY_NAME, int(count)) for count in out_features]
