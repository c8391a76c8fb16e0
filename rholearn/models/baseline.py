"""Per-element invariant baseline: the mean ``l = 0`` coefficients of each element.

Adding it to a model's output lets the model learn only the deviation from the
average atom. Only invariant blocks (``o3_lambda = 0``, ``o3_sigma = 1``) have a
baseline; every other block's baseline is zero, which keeps it equivariant.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import numpy as np
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatensor.torch.learn.nn import Module

from .. import layout


class Baseline(Module):
    """Mean invariant coefficients per element, added to the invariant blocks.

    Parameters
    ----------
    means : dict of int to sequence of float
        ``center_type`` (atomic number) -> mean ``l = 0`` coefficient of each
        radial channel ``n`` (dimensionless density coefficients).
    dtype : torch.dtype
    device : torch.device or str, optional
    """

    def __init__(
        self,
        means: Dict[int, Iterable[float]],
        dtype: torch.dtype = torch.float64,
        device: Optional[torch.device] = None,
    ):
        super().__init__()
        # metatensor-learn moves the means to this helper's dtype on every .to():
        # created in the default dtype (float32), it would round them
        self._mts_helper = torch.zeros(0, dtype=dtype, device=device)
        self.center_types: List[int] = sorted(int(z) for z in means)
        blocks = [
            TensorBlock(
                values=torch.tensor(
                    [float(x) for x in means[z]], dtype=dtype, device=device
                ).reshape(1, 1, -1),
                samples=Labels.single().to(device),
                components=[Labels([layout.COMPONENT_NAME], torch.tensor([[0]])).to(device)],
                properties=Labels.range(layout.PROPERTY_NAME, len(list(means[z]))).to(device),
            )
            for z in self.center_types
        ]
        keys = Labels(
            layout.KEY_NAMES,
            torch.tensor([[0, 1, z] for z in self.center_types], dtype=torch.int32).reshape(-1, 3),
        )
        self.register_buffer("means", TensorMap(keys.to(device), blocks), persistent=False)

    @classmethod
    def from_coefficients(
        cls,
        coefficients: Iterable,
        dtype: torch.dtype = torch.float64,
        device: Optional[torch.device] = None,
    ) -> "Baseline":
        """Average the invariant blocks of coefficient TensorMaps over all atoms.

        Parameters
        ----------
        coefficients : iterable of TensorMap
            Training targets in the layout of :mod:`rholearn.layout`
            (metatensor-core or metatensor-torch), one or several structures each.
        """
        sums: Dict[int, np.ndarray] = {}
        counts: Dict[int, int] = {}
        for index, tensor in enumerate(coefficients):
            for key, block in tensor.items():
                if int(key["o3_lambda"]) != 0 or int(key["o3_sigma"]) != 1:
                    continue
                z = int(key["center_type"])
                values = layout._to_numpy(block.values)[:, 0, :]
                if z in sums and sums[z].shape != values.shape[1:]:
                    raise ValueError(
                        f"coefficients {index}: block o3_lambda=0, center_type={z} has "
                        f"{values.shape[1]} radial channels, earlier ones had {len(sums[z])}"
                    )
                sums[z] = sums.get(z, 0.0) + values.sum(axis=0)
                counts[z] = counts.get(z, 0) + values.shape[0]
        if not sums:
            raise ValueError("no invariant (o3_lambda=0) blocks in the coefficients")
        return cls({z: sums[z] / counts[z] for z in sums}, dtype=dtype, device=device)

    def to_dict(self) -> dict:
        """Plain data (``center_type`` -> list of means) for saving."""
        return {
            z: self.means.block(i).values.reshape(-1).tolist()
            for i, z in enumerate(self.center_types)
        }

    def forward(self, tensor: TensorMap) -> TensorMap:
        """Add the baseline to the invariant blocks of ``tensor`` (target layout)."""
        blocks: List[TensorBlock] = []
        for key, block in tensor.items():
            values = block.values
            position = self.means.keys.position(key)
            if position is not None:
                mean = self.means.block(position).values
                if mean.shape[2] != values.shape[2]:
                    raise ValueError(
                        "baseline for key " + key.print() + " has "
                        + str(mean.shape[2]) + " radial channels, the tensor "
                        + str(values.shape[2])
                    )
                values = values + mean
            blocks.append(
                TensorBlock(
                    values=values,
                    samples=block.samples,
                    components=block.components,
                    properties=block.properties,
                )
            )
        return TensorMap(tensor.keys, blocks)
