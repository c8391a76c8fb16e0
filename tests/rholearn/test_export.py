"""metatomic export: the file loads without rholearn and predicts what the model predicts."""

import json

import ase
import metatensor.torch as mts
import numpy as np
import torch
from metatomic.torch import ModelEvaluationOptions, ModelOutput, load_atomistic_model, systems_to_torch
from vesin.metatomic import neighbor_lists_for_model

from rhocalc.pyscf import basis_set
from rholearn.basis import BasisSet
from rholearn.export import EXPORT_FORMAT, OUTPUT_NAME, export_atomistic
from rholearn.models import DensityModel

from small_setup import HYPERS, OPTIONS


def _water(shift=0.0):
    return ase.Atoms("OH2", positions=[[0, 0, shift], [0.76, 0.59, 0], [-0.76, 0.58, 0.1]])


def test_exported_model_matches_predict(tmp_path):
    basis = basis_set(OPTIONS.auxbasis, ["H", "O"])
    model = DensityModel(basis, HYPERS, model="linear")
    frames = [_water(), _water(0.2)]
    if hasattr(model, "fit_descriptor"):
        model.fit_descriptor(frames)
    path = str(tmp_path / "exported.pt")
    export_atomistic(model, path)

    loaded = load_atomistic_model(path)
    capabilities = loaded.capabilities()
    assert capabilities.atomic_types == [1, 8]
    assert capabilities.length_unit == "angstrom"
    assert capabilities.interaction_range == HYPERS["cutoff"]["radius"]
    extra = loaded.metadata().extra
    assert extra["format"] == EXPORT_FORMAT
    assert BasisSet.from_dict(json.loads(extra["basis"])) == basis

    systems = systems_to_torch(frames, dtype=torch.float64)
    for calculator in neighbor_lists_for_model("angstrom", loaded):
        calculator.add_neighbor_list(systems)
    options = ModelEvaluationOptions(
        length_unit="angstrom", outputs={OUTPUT_NAME: ModelOutput(sample_kind="atom")}
    )
    exported = loaded(systems, options, check_consistency=True)[OUTPUT_NAME]
    expected = model.predict(frames)
    assert mts.equal_metadata(exported, expected)
    for key, block in expected.items():
        np.testing.assert_allclose(
            exported.block(key).values.numpy(), block.values.numpy(), atol=1e-12
        )
