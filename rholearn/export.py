"""A trained model as a metatomic ``AtomisticModel``, loadable by any metatomic engine.

The exported file holds the whole prediction pipeline in TorchScript (descriptor,
network, baseline) behind metatomic's model interface. It is loaded with
``metatomic.torch.load_atomistic_model(path)`` without rholearn, and computes
one output, :data:`OUTPUT_NAME`: the density coefficients of every atom as a
TensorMap in the layout of :mod:`rholearn.layout` (keys ``o3_lambda, o3_sigma,
center_type``, samples ``system, atom``, component ``o3_mu``, properties ``n``).
The auxiliary basis those coefficients refer to is stored as JSON in the
model's metadata (``metadata().extra["basis"]``), next to the file format.
"""


import json
from typing import Dict, List, Optional

import metatensor.torch as mts
import torch
from metatensor.torch import Labels, TensorMap
from metatomic.torch import (
    AtomisticModel,
    ModelCapabilities,
    ModelMetadata,
    ModelOutput,
    System,
)

from . import __version__
from .files import atomic_path
from .models.density_model import DensityModel

OUTPUT_NAME = "rholearn::density_coefficients"
"""Name of the output of exported models (metatomic's ``<domain>::<output>`` form)."""

EXPORT_FORMAT = "rholearn.AtomisticModel/1"
"""Version of what an exported model carries in its metadata; bumped on any change."""


class AtomisticDensity(torch.nn.Module):
    """metatomic's model interface around a scripted rholearn pipeline.

    Parameters
    ----------
    pipeline : torch.nn.Module
        ``List[System] -> TensorMap`` of coefficients (:meth:`DensityModel.pipeline`).
    """

    def __init__(self, pipeline: torch.nn.Module):
        super().__init__()
        self.pipeline = pipeline
        self.output_name = OUTPUT_NAME  # TorchScript reads no global strings

    def forward(
        self,
        systems: List[System],
        outputs: Dict[str, ModelOutput],
        selected_atoms: Optional[Labels] = None,
    ) -> Dict[str, TensorMap]:
        if self.output_name not in outputs:
            return {}
        coefficients = self.pipeline(systems)
        if selected_atoms is not None:
            coefficients = mts.slice(coefficients, axis="samples", selection=selected_atoms)
        return {self.output_name: coefficients}


def export_atomistic(model: DensityModel, path: str, name: str = "rholearn density model") -> None:
    """Write ``model`` as a metatomic ``AtomisticModel`` file, atomically.

    Parameters
    ----------
    model : DensityModel
        A trained model; exported in its current dtype (float32 or float64).
    path : str
        Output file (conventionally ``.pt``).
    name : str
        Name recorded in the model's metadata.

    Notes
    -----
    Capabilities: the model's atom types, the descriptor cutoff as the
    interaction range, lengths in Angstrom, CPU and CUDA devices.
    """
    model = model.eval()
    dtype = str(model.dtype).replace("torch.", "")
    capabilities = ModelCapabilities(
        outputs={
            OUTPUT_NAME: ModelOutput(
                sample_kind="atom",
                description="density coefficients in the auxiliary basis of metadata extra['basis']",
            )
        },
        atomic_types=list(model.atom_types),
        interaction_range=float(model.hypers["cutoff"]["radius"]),
        length_unit="angstrom",
        supported_devices=["cpu", "cuda"],
        dtype=dtype,
    )
    metadata = ModelMetadata(
        name=name,
        description=(
            f"Electron density coefficients in the auxiliary basis '{model.basis.name}' "
            f"({model.model_type} model), predicted by rholearn {__version__}"
        ),
        references={"implementation": ["rholearn"]},
        extra={"format": EXPORT_FORMAT, "basis": json.dumps(model.basis.to_dict())},
    )
    atomistic = AtomisticModel(AtomisticDensity(model.pipeline()).eval(), metadata, capabilities)
    with atomic_path(path) as tmp:
        atomistic.save(tmp)
