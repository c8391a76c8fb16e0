"""Loading weights keeps a model's metatensor metadata on the model's device.

metatensor-learn modules save their Labels (keys, properties) with the weights;
a plain ``load_state_dict`` restores them on the CPU even into a model on another
device, which then fails at the first prediction (seen on CUDA). The "meta"
device shows the same on a machine without a GPU.
"""

import pytest
import torch

from rholearn.models.linear import LinearModel
from rholearn.models.weights import load_weights

KEYS = [(0, 1, 8), (1, 1, 8)]


@pytest.mark.filterwarnings("ignore:for module_map")
def test_loaded_labels_follow_the_weights_device():
    state = LinearModel(KEYS, [4, 4], [3, 2]).state_dict()
    plain = LinearModel(KEYS, [4, 4], [3, 2]).to("meta")
    plain.load_state_dict(state)
    assert plain.module_map._out_properties[0].device.type == "cpu"  # the pitfall

    model = LinearModel(KEYS, [4, 4], [3, 2]).to("meta")
    load_weights(model, state)
    assert next(model.parameters()).device.type == "meta"
    assert model.module_map._in_keys.device.type == "meta"
    assert all(labels.device.type == "meta" for labels in model.module_map._out_properties)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no GPU")
def test_a_model_trained_on_cuda_predicts_after_loading_its_best_weights():
    state = LinearModel(KEYS, [4, 4], [3, 2]).state_dict()
    model = LinearModel(KEYS, [4, 4], [3, 2], device="cuda")
    load_weights(model, state)
    assert all(labels.device.type == "cuda" for labels in model.module_map._out_properties)
