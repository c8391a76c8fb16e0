"""Gated nonlinear equivariant model.

For a target block ``(l, sigma, Z)``::

    h      = EquivariantLinear(descriptor block (l, sigma, Z))    # (atoms, 2l+1, width)
    gate   = MLP(descriptor block (0, 1, Z))                      # (atoms, 1, width)
    output = EquivariantLinear(h * gate)                          # (atoms, 2l+1, n)

The nonlinearity only ever acts on invariants and the gate multiplies every
``o3_mu`` component of a channel alike, so the output stays equivariant under
rotations and inversion (as in the original rho_learn gated model).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from metatensor.torch import TensorBlock, TensorMap
from metatensor.torch.learn.nn import EquivariantLinear, Linear, Sequential, SiLU

from .linear import key_labels, radial_labels

Key = Tuple[int, int, int]


class NonlinearModel(torch.nn.Module):
    """Equivariant linear layers gated by an MLP of the invariant features.

    Parameters
    ----------
    keys : sequence of (o3_lambda, o3_sigma, center_type)
        Target blocks. Every center type needs its invariant key ``(0, 1, Z)``,
        whose descriptor block feeds the gates.
    in_features : sequence of int
        Number of descriptor properties of each block.
    out_features : sequence of int
        Number of radial channels ``n`` of each target block.
    hidden_sizes : sequence of int
        Widths of the hidden layers of the gate MLP (SiLU activations).
    width : int
        Number of gated equivariant channels.
    seed : int
        Seed of the weight initialisation.
    dtype : torch.dtype
    device : torch.device or str, optional
    """

    def __init__(
        self,
        keys: Sequence[Key],
        in_features: Sequence[int],
        out_features: Sequence[int],
        hidden_sizes: Sequence[int] = (64,),
        width: int = 32,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        device: Optional[torch.device] = None,
    ):
        super().__init__()
        keys = [tuple(int(x) for x in key) for key in keys]
        in_features = [int(n) for n in in_features]
        invariant_features = _invariant_features(keys, in_features)
        in_keys = key_labels(keys)
        gate_sizes = [invariant_features[z] for _, _, z in keys]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.equivariant_in = EquivariantLinear(
                in_keys, in_features, out_features=width, bias=True, dtype=dtype
            )
            layers: List[torch.nn.Module] = []
            for size in hidden_sizes:
                layers.append(Linear(in_keys, gate_sizes, out_features=int(size), dtype=dtype))
                layers.append(SiLU(in_keys))
                gate_sizes = [int(size)] * len(keys)
            layers.append(Linear(in_keys, gate_sizes, out_features=width, dtype=dtype))
            self.gates = Sequential(in_keys, *layers)
            self.equivariant_out = EquivariantLinear(
                in_keys, width, out_properties=radial_labels(out_features), bias=True, dtype=dtype
            )
        self.to(device)

    def forward(self, descriptor: TensorMap) -> TensorMap:
        """Map lambda-SOAP blocks (a subset of ``keys``) to target blocks."""
        hidden = self.equivariant_in(descriptor)
        gates = self.gates(_invariant_inputs(descriptor))
        gated: List[TensorBlock] = []
        for index in range(len(hidden.keys)):
            block = hidden.block(index)
            gated.append(
                TensorBlock(
                    values=block.values * gates.block(index).values,
                    samples=block.samples,
                    components=block.components,
                    properties=block.properties,
                )
            )
        return self.equivariant_out(TensorMap(hidden.keys, gated))


def _invariant_features(keys: List[Key], in_features: List[int]) -> Dict[int, int]:
    """``center_type`` -> number of features of its invariant block."""
    invariant = {z: n for (l, sigma, z), n in zip(keys, in_features) if (l, sigma) == (0, 1)}
    missing = sorted({z for _, _, z in keys} - set(invariant))
    if missing:
        raise ValueError(
            f"the nonlinear model gates each block with the invariant (o3_lambda=0, "
            f"o3_sigma=1) block of its center type, which is missing for center_type {missing}"
        )
    return invariant


def _invariant_inputs(descriptor: TensorMap) -> TensorMap:
    """For each block, the invariant descriptor block of the same center type."""
    blocks: List[TensorBlock] = []
    for key, _ in descriptor.items():
        selection = {"o3_lambda": 0, "o3_sigma": 1, "center_type": int(key["center_type"])}
        invariant = descriptor.block(selection)
        blocks.append(
            TensorBlock(
                values=invariant.values,
                samples=invariant.samples,
                components=invariant.components,
                properties=invariant.properties,
            )
        )
    return TensorMap(descriptor.keys, blocks)
