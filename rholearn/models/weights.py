"""Loading saved weights into a model that lives on any device."""

from __future__ import annotations

from typing import Any, Dict

import torch


def load_weights(module: torch.nn.Module, state: Dict[str, Any]) -> None:
    """``module.load_state_dict(state)``, keeping everything on ``module``'s device.

    Tensors are copied onto the parameters' device by torch, but the metatensor
    data that metatensor-learn modules keep in their state (``Labels`` of keys
    and properties) is restored where it was saved (the CPU, for files read with
    ``map_location="cpu"``); moving the module to its own device again puts it
    back beside the weights.
    """
    module.load_state_dict(state)
    parameter = next(module.parameters(), None)
    if parameter is not None:
        module.to(parameter.device)
