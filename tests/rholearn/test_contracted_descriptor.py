"""Contracted lambda-SOAP: equal to the stock one without contraction, equivariant,
differentiable, scriptable, float32/CUDA, fitted state saved with the model."""

import ase.build
import numpy as np
import pytest
import torch

from rholearn import layout
from rholearn.descriptors import ContractedLambdaSoap, LambdaSoap
from rholearn.models import DensityModel
from rholearn.testing import assert_equivariant

# max_angular = 2 reaches o3_lambda = 4, the largest l of def2-universal-jkfit
HYPERS = {
    "cutoff": {"radius": 4.0, "smoothing": {"type": "ShiftedCosine", "width": 0.5}},
    "density": {"type": "Gaussian", "width": 0.3},
    "basis": {"type": "TensorProduct", "max_angular": 2, "radial": {"type": "Gto", "max_radial": 2}},
}
ATOM_TYPES = [1, 6, 7, 8]
N_RADIAL = 3
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rattled(name: str, seed: int = 0) -> ase.Atoms:
    atoms = ase.build.molecule(name)
    atoms.rattle(0.1, seed=seed)
    return atoms


TRAINING = [rattled(name, seed) for seed in range(3) for name in ["CH3OH", "CH3NO2", "H2O", "NH3"]]


def target_keys(atom_types=ATOM_TYPES):
    """Every o3_sigma = +1 block up to o3_lambda = 4 (as def2-universal-jkfit's O)."""
    return [(l, 1, z) for z in atom_types for l in range(5)]


@pytest.fixture(scope="module")
def fitted():
    soap = ContractedLambdaSoap(HYPERS, ATOM_TYPES, target_keys(), n_channels=5)
    soap.fit(TRAINING)
    return soap


def block(tensor, key):
    return tensor.block(dict(zip(layout.KEY_NAMES, key)))


def stock_as_channels(values: torch.Tensor, properties: torch.Tensor, order: dict) -> torch.Tensor:
    """Stock properties (l_1, l_2, t_1, n_1, t_2, n_2) as (l_1, l_2, k_1, k_2) rows."""
    index = torch.tensor([ATOM_TYPES.index(int(t)) for t in properties[:, 2]])
    k_1 = index * N_RADIAL + properties[:, 3]
    index = torch.tensor([ATOM_TYPES.index(int(t)) for t in properties[:, 4]])
    k_2 = index * N_RADIAL + properties[:, 5]
    rows = torch.stack([properties[:, 0], properties[:, 1], k_1, k_2], dim=1).tolist()
    permutation = [order[tuple(row)] for row in rows]
    assert sorted(permutation) == list(range(len(order)))  # a bijection
    reordered = torch.empty_like(values)
    reordered[..., permutation] = values
    return reordered


def test_without_contraction_it_equals_featomic_stock_lambda_soap():
    frames = [rattled("CH3NO2"), rattled("H2O", 1), rattled("NH3", 2)]
    stock = LambdaSoap(HYPERS, ATOM_TYPES, target_keys()).compute(frames, [7, 3, 5])
    identity = ContractedLambdaSoap(HYPERS, ATOM_TYPES, target_keys(), n_channels=None)
    identity.fit(frames)  # a no-op without contraction
    ours = identity.compute(frames, [7, 3, 5])

    assert set(map(tuple, ours.keys.values.tolist())) == set(map(tuple, stock.keys.values.tolist()))
    assert max(int(key["o3_lambda"]) for key in ours.keys) == 4
    for key, expected in stock.items():
        found = ours.block(key)
        assert found.samples == expected.samples
        assert found.components == expected.components
        order = {tuple(row): i for i, row in enumerate(found.properties.values.tolist())}
        reordered = stock_as_channels(expected.values, expected.properties.values, order)
        assert found.values.abs().max() > 1e-3
        torch.testing.assert_close(found.values, reordered, rtol=0, atol=1e-10)


def test_fitted_contraction_is_an_orthonormal_pca(fitted):
    contraction = fitted.state()["contraction"]
    assert contraction.shape == (4, 3, 4 * N_RADIAL, 5)
    gram = contraction.transpose(-1, -2) @ contraction
    torch.testing.assert_close(gram, torch.eye(5).expand_as(gram).to(gram), atol=1e-12, rtol=0)
    assert fitted.fitted and fitted.settings()["fitted"]

    # the leading channel captures more variance than the last one
    density, type_index, _ = fitted.module.density(fitted.systems(TRAINING))
    oxygen = density[type_index == ATOM_TYPES.index(8)]
    variance = (oxygen**2).sum(dim=(0, 1))
    assert variance[0] > variance[-1] > 0


def test_a_centre_type_absent_from_training_gets_the_pooled_pca():
    waters = [rattled("H2O", seed) for seed in range(3)]
    soap = ContractedLambdaSoap(HYPERS, ATOM_TYPES, target_keys(), n_channels=4)
    soap.fit(waters)
    contraction = soap.state()["contraction"]

    identity = ContractedLambdaSoap(HYPERS, ATOM_TYPES, target_keys(), n_channels=None)
    density, _, _ = identity.module.density(identity.systems(waters))  # H and O centres
    for l in range(3):
        x = density[:, l * l : (l + 1) * (l + 1)].reshape(-1, 4 * N_RADIAL)
        leading = torch.linalg.eigh(x.T @ x).eigenvectors.flip(-1)[:, :4]
        for absent in (6, 7):
            found = contraction[ATOM_TYPES.index(absent), l]
            torch.testing.assert_close(found.abs(), leading.abs(), rtol=0, atol=1e-8)


def test_features_do_not_grow_with_the_number_of_elements():
    two = ContractedLambdaSoap(HYPERS, [1, 8], target_keys([1, 8]), n_channels=5)
    four = ContractedLambdaSoap(HYPERS, ATOM_TYPES, target_keys([1, 8]), n_channels=5)
    assert two.n_features() == four.n_features()
    stock = LambdaSoap(HYPERS, ATOM_TYPES, target_keys([1, 8])).n_features()
    # 5 channels instead of 4 types x 3 radial = 12: 25 / 144 of the features
    assert all(25 * stock[key] == 144 * count for key, count in four.n_features().items())


@pytest.mark.parametrize("name", ["H2O", "CH3OH", "CH3NO2"])
def test_contracted_descriptor_is_equivariant_for_every_lambda(fitted, name):
    atoms = rattled(name, seed=5)
    descriptor = fitted.compute([atoms])
    lambdas = {int(key["o3_lambda"]) for key in descriptor.keys}
    assert lambdas == set(range(5))  # every lambda of the basis, up to 2 max_angular
    for found in descriptor.blocks():  # equivariance of zeros would prove nothing
        assert found.values.abs().max() > 1e-3
    worst = assert_equivariant(lambda a: fitted.compute([a]), atoms, seed=4, atol=1e-10)
    assert worst < 1e-10


def test_blocks_samples_and_feature_counts(fitted):
    frames = [ase.build.molecule("H2O"), ase.build.molecule("CH4")]
    descriptor = fitted.compute(frames, system_ids=[4, 9])
    assert {tuple(key) for key in descriptor.keys.values.tolist()} == set(target_keys([1, 6, 8]))
    n_features = fitted.n_features()
    for key, found in descriptor.items():
        l, _, z = (int(x) for x in key.values)
        assert found.properties.names == ["l_1", "l_2", "k_1", "k_2"]
        assert len(found.properties) == n_features[(l, 1, z)]
        assert found.components[0].values.reshape(-1).tolist() == list(range(-l, l + 1))
        assert found.samples.values.tolist() == [
            [system, i] for system, atoms in zip([4, 9], frames)
            for i, zi in enumerate(atoms.numbers) if zi == z
        ]
    # a structure's features do not depend on the batch it is computed in
    alone = fitted.compute(frames[1:], system_ids=[9])
    for key, found in alone.items():
        torch.testing.assert_close(
            found.values, descriptor.block(key).values[-len(found.samples):], rtol=0, atol=1e-12
        )


def test_unknown_element_names_the_structure():
    soap = ContractedLambdaSoap(HYPERS, [1, 8], target_keys([1, 8]))
    frames = [ase.build.molecule("H2O"), ase.build.molecule("NH3")]
    with pytest.raises(ValueError, match=r"structure 3 \(H3N\).*\['N'\]"):
        soap.compute(frames, system_ids=[2, 3])
    with pytest.raises(ValueError, match=r"structure 1 \(H3N\)"):
        soap.fit(frames)
    with pytest.raises(ValueError, match="system 1 has atom types outside"):
        soap.module(soap.systems(frames))


@pytest.mark.parametrize(
    "kind, device", [("stock", "cpu")] + [("contracted", device) for device in DEVICES]
)
def test_position_gradients_match_finite_differences(fitted, kind, device):
    if kind == "contracted":
        soap = fitted.to(torch.float64, device)
    else:
        soap = LambdaSoap(HYPERS, ATOM_TYPES, target_keys())
    atoms = rattled("CH3OH", seed=3)
    weights = {}

    def projection(descriptor):
        """A fixed random linear function of every descriptor value."""
        total = 0.0
        for key, found in descriptor.items():
            name = tuple(key.values.tolist())
            if name not in weights:
                generator = torch.Generator().manual_seed(len(weights))
                weights[name] = torch.randn(found.values.shape[1:], generator=generator, dtype=torch.float64)
            total = total + (found.values * weights[name].to(found.values.device)).sum()
        return total

    systems = soap.systems([atoms], positions_requires_grad=True)
    (gradient,) = torch.autograd.grad(projection(soap.compute_systems(systems)), systems[0].positions)
    step = 1e-4  # Angstrom
    for atom, axis in [(0, 0), (3, 2), (5, 1)]:
        values = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.positions[atom, axis] += sign * step
            values.append(float(projection(soap.compute([moved]))))
        finite_difference = (values[0] - values[1]) / (2 * step)
        assert abs(float(gradient[atom, axis])) > 1e-3
        np.testing.assert_allclose(float(gradient[atom, axis]), finite_difference, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_and_devices_agree_with_float64_cpu(fitted, device):
    frames = [rattled("CH3NO2", 1), rattled("H2O", 2)]
    reference = fitted.compute(frames)
    for dtype, tolerance in [(torch.float32, 1e-4), (torch.float64, 1e-10)]:
        other = fitted.to(dtype, device)
        assert other.settings()["contraction_sha256"] == fitted.settings()["contraction_sha256"]
        found = other.compute(frames)
        for values in (block.values for block in found.blocks()):
            assert values.dtype == dtype and values.device.type == device
        found = found.to(dtype=torch.float64, device="cpu")
        assert found.keys == reference.keys
        for key, expected in reference.items():
            scale = float(expected.values.abs().max())
            torch.testing.assert_close(
                found.block(key).values, expected.values, rtol=0, atol=tolerance * scale
            )


def test_module_is_scriptable_and_scripted_values_agree(fitted):
    frames = [rattled("CH3OH", 2), rattled("NH3", 4)]
    scripted = torch.jit.script(fitted.module)
    systems = fitted.systems(frames)
    eager, found = fitted.module(systems), scripted(systems)
    assert found.keys == eager.keys
    for key, expected in eager.items():
        assert found.block(key).properties == expected.properties
        torch.testing.assert_close(found.block(key).values, expected.values, rtol=0, atol=0)


def test_cache_settings_follow_the_fitted_contraction(tmp_path):
    soap = ContractedLambdaSoap(HYPERS, [1, 8], target_keys([1, 8]), n_channels=4)
    unfitted = soap.settings()
    assert not unfitted["fitted"]
    soap.compute_cached([ase.build.molecule("H2O")], [0], str(tmp_path))
    soap.fit([rattled("H2O", seed) for seed in range(4)])
    assert soap.settings()["contraction_sha256"] != unfitted["contraction_sha256"]
    with pytest.raises(ValueError, match="other settings"):
        soap.compute_cached([ase.build.molecule("H2O")], [0], str(tmp_path))


def test_saved_model_keeps_the_fitted_contraction(tmp_path):
    from rhocalc.pyscf import basis_set

    basis = basis_set("def2-universal-jkfit", ["H", "C", "N", "O"])
    model = DensityModel(
        basis, HYPERS, descriptor="contracted", descriptor_options={"n_channels": 4}, seed=3
    )
    model.fit_descriptor(TRAINING)
    assert model.descriptor.fitted
    frames = [rattled("CH3NO2", 7), rattled("H2O", 8)]
    before = model.predict(frames, system_ids=[2, 5])
    path = str(tmp_path / "model.pt")
    model.save(path)
    loaded = DensityModel.load(path)
    assert loaded.descriptor_kind == "contracted" and loaded.descriptor.fitted
    assert loaded.descriptor.settings() == model.descriptor.settings()
    after = loaded.predict(frames, system_ids=[2, 5])
    assert after.keys == before.keys
    for key, expected in before.items():
        assert after.block(key).samples == expected.samples
        torch.testing.assert_close(after.block(key).values, expected.values, rtol=0, atol=0)

    # predict (scripted pipeline) equals the eager modules, also after a refit
    model.fit_descriptor(TRAINING[:6])
    eager = model(model.descriptor.compute(frames))
    for key, expected in eager.items():
        torch.testing.assert_close(model.predict(frames).block(key).values, expected.values.detach())

    exported_path = str(tmp_path / "model.ts")
    loaded.export(exported_path)
    exported = torch.jit.load(exported_path)(loaded.descriptor.systems(frames))
    for key, expected in before.items():
        torch.testing.assert_close(exported.block(key).values, expected.values, rtol=0, atol=0)


def test_model_files_of_format_1_load_with_the_stock_descriptor(tmp_path):
    from rhocalc.pyscf import basis_set

    model = DensityModel(basis_set("def2-universal-jkfit", ["H", "O"]), HYPERS, descriptor="stock")
    path = str(tmp_path / "model.pt")
    model.save(path)
    state = torch.load(path, weights_only=True)
    for key in ("descriptor", "descriptor_options", "descriptor_state"):
        del state[key]
    state["format"] = "rholearn.DensityModel/1"
    torch.save(state, path)
    loaded = DensityModel.load(path)
    assert loaded.descriptor_kind == "stock"
    water = rattled("H2O", 3)
    for key, expected in model.predict([water]).items():
        torch.testing.assert_close(loaded.predict([water]).block(key).values, expected.values)


def test_predict_in_atom_chunks_equals_the_eager_model(tmp_path):
    from rhocalc.pyscf import basis_set

    from rholearn.models.density_model import PREDICT_CHUNK

    model = DensityModel(basis_set("def2-universal-jkfit", ["H", "O"]), HYPERS, descriptor="contracted")
    waters = [rattled("H2O", seed) for seed in range(100)]  # 300 atoms: 2 chunks of atoms
    assert 3 * len(waters) > PREDICT_CHUNK
    model.fit_descriptor(waters)
    ids = list(range(10, 110))
    chunked = model.predict(waters, system_ids=ids)
    eager = model(model.descriptor.compute(waters, ids))
    assert set(map(tuple, chunked.keys.values.tolist())) == set(map(tuple, eager.keys.values.tolist()))
    for key, expected in eager.items():
        found = chunked.block(key)
        assert found.samples == expected.samples
        assert found.properties == expected.properties
        torch.testing.assert_close(found.values, expected.values.detach(), rtol=0, atol=1e-12)
