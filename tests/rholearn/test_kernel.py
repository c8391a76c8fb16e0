"""The sparse equivariant kernel model: references, projection, equivariance, save/load, export."""

import math

import ase.build
import pytest
import torch
from metatomic.torch import systems_to_torch

from rholearn.models import DensityModel
from rholearn.models.kernel import farthest_point_order, farthest_point_sampling, reference_counts
from rholearn.testing import assert_equivariant
from rhocalc.pyscf import basis_set
from rhocalc.structures import distorted_waters

from small_setup import HYPERS

# def2-universal-jkfit: l up to 4 on O and C, 2 on H
AUXBASIS = "def2-universal-jkfit"


def training_frames():
    frames = distorted_waters(6, seed=2)
    for seed in range(3):
        atoms = ase.build.molecule("CH3OH")
        atoms.rattle(0.1, seed=seed)
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def model():
    model = DensityModel(basis_set(AUXBASIS, ["H", "C", "O"]), HYPERS, "kernel", n_references=5, seed=1)
    frames = training_frames()
    model.net.fit_references(model.descriptor.compute(frames))
    with torch.no_grad():  # random weights, so that every output block is nonzero
        for parameter in model.net.head.parameters():
            parameter.copy_(torch.randn_like(parameter))
    return model


def test_farthest_point_sampling_picks_the_extremes_first():
    points = torch.tensor([[0.0], [1.0], [10.0], [4.0], [9.0]], dtype=torch.float64)
    assert farthest_point_sampling(points, 3).tolist() == [0, 2, 3]
    assert farthest_point_sampling(points, 10).tolist() == [0, 2, 3, 1, 4]
    order, gaps = farthest_point_order(points, 10)  # each pick's squared distance to those before
    assert order.tolist() == [0, 2, 3, 1, 4]
    assert gaps.tolist() == [math.inf, 100.0, 16.0, 1.0, 1.0]


def test_references_are_fitted_per_element_and_block(model):
    active = dict(zip(model.keys, model.net.active_features()))
    for (l, _, z), n_active in active.items():
        assert 0 < n_active <= 5 * (2 * l + 1), (l, z)


def test_projected_features_reproduce_the_kernel_of_the_references(model):
    """Psi Psi^T = K on the references: the K_MM^{-1/2} projection is exact within the cut-off."""
    features = model.net.features
    for index, key in enumerate(features.keys):
        block = features.blocks[index]
        n = int(block.n_active)
        references, invariants = block.references, block.reference_invariants
        psi = block(references, invariants, features.zeta)  # (M, 2l+1, M (2l+1))
        k0 = invariants @ invariants.T
        kernel = torch.einsum("aif,bjf->aibj", references, references) * k0[:, None, :, None]
        gram = torch.einsum("aik,bjk->aibj", psi[..., :n], psi[..., :n])
        scale = float(kernel.abs().max())
        assert float((gram - kernel).abs().max()) < 1e-6 * scale, key
        assert float(psi[..., n:].abs().sum()) == 0.0


def test_the_kernel_model_is_equivariant_for_every_lambda(model):
    atoms = ase.build.molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=7)
    prediction = model.predict([atoms])
    lambdas = {int(key["o3_lambda"]) for key, block in prediction.items() if block.values.abs().max() > 0}
    assert lambdas == {0, 1, 2, 3, 4}
    assert_equivariant(lambda a: model.predict([a]), atoms, seed=3, atol=1e-9, inversion=True)


def test_a_saved_kernel_model_predicts_the_same(model, tmp_path):
    path = str(tmp_path / "model.pt")
    model.save(path)
    reloaded = DensityModel.load(path)
    frames = distorted_waters(2, seed=11)
    expected = model.predict(frames)
    for key, block in reloaded.predict(frames).items():
        torch.testing.assert_close(block.values, expected.block(key).values, rtol=0, atol=0)


def test_a_saved_kernel_model_stores_only_the_references_used(tmp_path):
    """8 hydrogen and 3 carbon atoms in training, 100 references asked for: the file
    holds 8 and 3 (and the kept columns of the projection), not 100 padded ones."""
    frames = [ase.build.molecule("CH4"), ase.build.molecule("C2H2"), ase.build.molecule("H2")]
    model = DensityModel(basis_set(AUXBASIS, ["H", "C"]), HYPERS, "kernel", n_references=100)
    model.net.fit_references(model.descriptor.compute(frames))
    path = str(tmp_path / "model.pt")
    model.save(path)
    state = torch.load(path, weights_only=True)["net_state"]
    for (l, _, z), block in zip(model.keys, model.net.features.blocks):
        prefix = f"features.blocks.{model.keys.index((l, 1, z))}."
        n_atoms = {1: 8, 6: 3}[z]
        assert state[prefix + "references"].shape == (n_atoms, 2 * l + 1, block.references.shape[2])
        assert state[prefix + "projection"].shape == (n_atoms * (2 * l + 1), int(block.n_active))
    reloaded = DensityModel.load(path)
    expected = model.predict(frames)
    for key, block in reloaded.predict(frames).items():
        torch.testing.assert_close(block.values, expected.block(key).values, rtol=0, atol=0)


def test_reference_counts_cover_every_element_to_one_resolution_within_the_budget():
    per_reference = {1: 18, 6: 75, 8: 77}
    # hydrogen's environments are far apart, carbon's alike, oxygen's few
    gaps = {1: torch.tensor([math.inf] + [1.0 / k for k in range(1, 100)]),
            6: torch.tensor([math.inf] + [0.01 / k for k in range(1, 100)]),
            8: torch.tensor([math.inf, 0.5, 0.2])}
    assert reference_counts(gaps, per_reference, None) == {1: 100, 6: 100, 8: 3}
    counts = reference_counts(gaps, per_reference, 3000)
    assert sum(counts[z] * per_reference[z] for z in counts) <= 3000
    assert counts[8] == 3 and counts[1] > counts[6] >= 1
    # the resolution is common: every pick left out is no farther than every pick taken
    taken = [float(gaps[z][k]) for z in gaps for k in range(1, counts[z])]
    left = [float(gaps[z][k]) for z in gaps for k in range(counts[z], len(gaps[z]))]
    assert min(taken) >= max(left)
    assert reference_counts(gaps, per_reference, 1) == {1: 1, 6: 1, 8: 1}  # the first of each


def normalised_invariants(descriptor, z):
    values = descriptor.block({"o3_lambda": 0, "o3_sigma": 1, "center_type": z}).values
    values = values.reshape(len(values), -1)
    return values / values.norm(dim=1, keepdim=True)


def test_the_weight_budget_caps_the_references_the_model_picks():
    frames = training_frames()  # 6 waters and 3 methanols: 24 H, 3 C, 9 O atoms
    basis = basis_set(AUXBASIS, ["H", "C", "O"])
    free = DensityModel(basis, HYPERS, "kernel", n_references=20)
    capped = DensityModel(basis, HYPERS, "kernel", n_references=20, max_weights=900)
    descriptor = free.descriptor.compute(frames)
    free.net.fit_references(descriptor)
    capped.net.fit_references(descriptor)

    def references(model):
        return {z: len(block.references) for (l, _, z), block in zip(model.keys, model.net.features.blocks)}

    per_reference = capped.net.weights_per_reference
    assert references(free) == {1: 20, 6: 3, 8: 9}
    counts = references(capped)
    assert sum(counts[z] * per_reference[z] for z in counts) <= 900
    assert all(1 <= counts[z] <= n for z, n in references(free).items()) and counts != references(free)
    # the atoms left out are no farther from the references than any reference was when picked
    gaps = {z: farthest_point_order(normalised_invariants(descriptor, z), 20)[1] for z in counts}
    taken = [float(gaps[z][k]) for z in gaps for k in range(1, counts[z])]
    left = [float(gaps[z][k]) for z in gaps for k in range(counts[z], len(gaps[z]))]
    assert min(taken) >= max(left)
    with pytest.raises(ValueError, match="max_weights"):
        DensityModel(basis, HYPERS, "kernel", max_weights=0)


def test_a_kernel_model_saved_with_padded_references_still_loads(model, tmp_path):
    """Files written before references were trimmed held ``M`` zero-padded references
    and a square projection: they load and predict the same."""
    path = str(tmp_path / "model.pt")
    model.save(path)
    saved = torch.load(path, weights_only=True)
    n_references = model.net.features.n_references
    for index, (l, _, _) in enumerate(model.keys):
        prefix, width = f"features.blocks.{index}.", 2 * l + 1
        for name, shape in (("references", (n_references,)),
                            ("reference_invariants", (n_references,)),
                            ("projection", (n_references * width, n_references * width))):
            stored = saved["net_state"][prefix + name]
            padded = stored.new_zeros(shape + stored.shape[len(shape):])
            padded[tuple(slice(0, n) for n in stored.shape)] = stored
            saved["net_state"][prefix + name] = padded
    saved["format"] = "rholearn.DensityModel/2"
    torch.save(saved, path)
    reloaded = DensityModel.load(path)
    frames = distorted_waters(2, seed=11)
    expected = model.predict(frames)
    for key, block in reloaded.predict(frames).items():
        torch.testing.assert_close(block.values, expected.block(key).values, rtol=0, atol=1e-14)


def test_the_exported_kernel_model_predicts_the_same(model, tmp_path):
    path = str(tmp_path / "model.torchscript")
    model.export(path)
    scripted = torch.jit.load(path)
    frames = distorted_waters(2, seed=12)
    expected = model.predict(frames)
    found = scripted(systems_to_torch(frames, dtype=torch.float64))
    for key, block in expected.items():
        torch.testing.assert_close(found.block(key).values, block.values, rtol=1e-12, atol=1e-12)


def test_the_kernel_model_needs_invariant_blocks_and_references():
    from rholearn.models import KernelModel

    with pytest.raises(ValueError, match="invariant .* center_type \\[8\\]"):
        KernelModel([(1, 1, 8)], [10], [3])
    with pytest.raises(ValueError, match="n_references must be >= 1"):
        KernelModel([(0, 1, 8)], [10], [3], n_references=0)
