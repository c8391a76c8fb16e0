"""Models: baseline, equivariance, fitting, save/load/export, and their errors."""

import ase.build
import metatensor.torch as mts
import numpy as np
import pytest
import torch
from metatomic.torch import systems_to_torch

from rholearn import layout
from rholearn.models import Baseline, DensityModel
from rholearn.testing import assert_equivariant
from rhocalc.pyscf import PySCFOptions, basis_set, compute_targets

# def2-universal-jkfit has l up to 4 on C and O; max_angular = 2 reaches o3_lambda = 4
AUXBASIS = "def2-universal-jkfit"
OPTIONS = PySCFOptions(xc="HF", basis="sto-3g", auxbasis=AUXBASIS, grid_level=0)
HYPERS = {
    "cutoff": {"radius": 4.0, "smoothing": {"type": "ShiftedCosine", "width": 0.5}},
    "density": {"type": "Gaussian", "width": 0.3},
    "basis": {"type": "TensorProduct", "max_angular": 2, "radial": {"type": "Gto", "max_radial": 2}},
}
MODELS = ["linear", "nonlinear"]


def rattled(name: str, seed: int = 0, amplitude: float = 0.1) -> ase.Atoms:
    atoms = ase.build.molecule(name)
    atoms.rattle(amplitude, seed=seed)
    return atoms


def random_coefficients(atoms: ase.Atoms, basis, seed: int, system: int = 0):
    """Random coefficients of the right layout (metatensor-core)."""
    vector = np.random.default_rng(seed).normal(size=basis.n_functions(atoms.get_chemical_symbols()))
    return layout.vector_to_tensormap(vector, atoms.numbers, basis, system=system)


def to_torch(tensor, tmp_path):
    """A metatensor-core TensorMap as a metatensor-torch one (through a file)."""
    path = str(tmp_path / "tensor.mts")
    layout.save(path, tensor)
    return mts.load(path)


def block_values(tensor, key):
    return tensor.block(dict(zip(layout.KEY_NAMES, key))).values


@pytest.fixture(scope="module")
def basis():
    return basis_set(AUXBASIS, ["H", "C", "O"])


@pytest.fixture(scope="module")
def baseline(basis):
    frames = [ase.build.molecule("H2O"), ase.build.molecule("CH4")]
    return Baseline.from_coefficients(
        [random_coefficients(atoms, basis, seed) for seed, atoms in enumerate(frames)]
    )


def test_baseline_is_the_mean_invariant_coefficient_per_element(basis):
    water, methane = ase.build.molecule("H2O"), ase.build.molecule("CH4")
    coefficients = [random_coefficients(water, basis, 0), random_coefficients(methane, basis, 1)]
    baseline = Baseline.from_coefficients(coefficients)

    hydrogens = np.concatenate(
        [c.block({"o3_lambda": 0, "center_type": 1}).values[:, 0, :] for c in coefficients]
    )
    assert hydrogens.shape[0] == 6
    means = baseline.to_dict()
    np.testing.assert_allclose(means[1], hydrogens.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(
        means[8], coefficients[0].block({"o3_lambda": 0, "center_type": 8}).values[0, 0], rtol=1e-14
    )

    # the model output is the network's plus the baseline, on l = 0 only
    model = DensityModel(basis, HYPERS, baseline=baseline)
    descriptor = model.descriptor.compute([water])
    with torch.no_grad():
        difference = mts.subtract(model(descriptor), model.net(descriptor))
    for key, found in difference.items():
        l, _, z = (int(x) for x in key.values)
        expected = torch.tensor(means[z], dtype=torch.float64) if l == 0 else 0.0
        expected = torch.zeros_like(found.values) + expected
        torch.testing.assert_close(found.values, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("kind", MODELS)
def test_model_is_equivariant(basis, baseline, kind):
    model = DensityModel(basis, HYPERS, model=kind, baseline=baseline, seed=3)
    atoms = rattled("CH3OH")
    prediction = model.predict([atoms])
    assert max(int(key["o3_lambda"]) for key in prediction.keys) == 4
    for found in prediction.blocks():  # equivariance of zeros would prove nothing
        assert found.values.abs().max() > 1e-6
    assert_equivariant(lambda a: model.predict([a]), atoms, seed=4, atol=1e-10)


def relative_error_after_fit(model, descriptor, targets) -> float:
    """Fit ``model`` to ``targets`` by L-BFGS; squared error / squared norm of targets."""

    def squared_error():
        prediction = model(descriptor)
        return sum(((prediction.block(key).values - found.values) ** 2).sum() for key, found in targets.items())

    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=150, history_size=100,
                                  tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = squared_error()
        loss.backward()
        return loss

    optimizer.step(closure)
    norm = sum(float((found.values ** 2).sum()) for found in targets.blocks())
    return float(squared_error().detach()) / norm


def test_linear_model_overfits_one_structure(basis, baseline):
    """Random targets an equivariant model can produce: those of another linear model.

    A strongly rattled water keeps the least-squares problem well conditioned."""
    water = rattled("H2O", seed=5, amplitude=0.3)
    teacher = DensityModel(basis, HYPERS, baseline=baseline, seed=7)
    descriptor = teacher.descriptor.compute([water])
    with torch.no_grad():
        targets = teacher(descriptor)
    student = DensityModel(basis, HYPERS, baseline=baseline, seed=0)
    with torch.no_grad():
        initial = mts.subtract(student(descriptor), targets)
    assert max(float(found.values.abs().max()) for found in initial.blocks()) > 1e-2
    assert relative_error_after_fit(student, descriptor, targets) < 1e-8


def test_linear_model_fits_pyscf_targets_only_in_their_own_convention(basis, tmp_path):
    """PySCF targets are fitted almost exactly; with the l = 1 components permuted
    (PySCF's x, y, z order instead of featomic's y, z, x) they are not."""
    water = rattled("H2O", seed=5)
    targets = to_torch(compute_targets(water, OPTIONS).coefficients, tmp_path)
    permuted = mts.TensorMap(
        targets.keys,
        [
            mts.TensorBlock(
                found.values[:, [2, 0, 1], :] if int(key["o3_lambda"]) == 1 else found.values,
                found.samples, found.components, found.properties,
            )
            for key, found in targets.items()
        ],
    )
    errors = []
    for coefficients in (targets, permuted):
        model = DensityModel(basis, HYPERS, baseline=Baseline.from_coefficients([coefficients]))
        model.check_targets(coefficients)
        descriptor = model.descriptor.compute([water])
        errors.append(relative_error_after_fit(model, descriptor, coefficients))
    # the small remainder: high-l components a max_angular = 2 descriptor cannot span
    assert errors[0] < 1e-6
    assert errors[1] > 100 * errors[0]


@pytest.mark.parametrize("kind", MODELS)
def test_saved_and_exported_models_predict_the_same(basis, baseline, kind, tmp_path):
    options = {"width": 8} if kind == "nonlinear" else {}
    model = DensityModel(basis, HYPERS, model=kind, baseline=baseline, seed=1, **options)
    frames = [rattled("CH3OH"), ase.build.molecule("H2O")]
    prediction = model.predict(frames, system_ids=[5, 2])
    path = str(tmp_path / "model.pt")
    model.save(path)
    reloaded = DensityModel.load(path).predict(frames, system_ids=[5, 2])

    model.export(str(tmp_path / "model.ts"))
    exported = torch.jit.load(str(tmp_path / "model.ts"))
    with torch.no_grad():
        scripted = exported(systems_to_torch(frames, dtype=torch.float64))

    assert reloaded.keys == prediction.keys
    for key, found in prediction.items():
        assert reloaded.block(key).samples == found.samples
        assert torch.equal(reloaded.block(key).values, found.values)
        assert torch.allclose(scripted.block(key).values, found.values, rtol=0, atol=1e-14)


def test_element_not_trained_on_names_structure_and_element(tmp_path):
    model = DensityModel(basis_set(AUXBASIS, ["H", "O"]), HYPERS)
    frames = [ase.build.molecule("H2O"), ase.build.molecule("CH4")]
    with pytest.raises(ValueError, match=r"structure 7 \(CH4\).*not trained on.*\['C'\]"):
        model.predict(frames, system_ids=[0, 7])

    exported = str(tmp_path / "model.ts")
    model.export(exported)
    with pytest.raises(Exception, match="atom types outside"):
        torch.jit.load(exported)(systems_to_torch(frames, dtype=torch.float64))


def test_targets_of_another_basis_are_rejected(basis, tmp_path):
    model = DensityModel(basis, HYPERS)
    water = ase.build.molecule("H2O")
    other_basis = basis_set("def2-universal-jfit", ["H", "O"])
    other = to_torch(random_coefficients(water, other_basis, seed=0), tmp_path)
    with pytest.raises(ValueError, match="center_type=1 has 3 radial functions.*'def2-universal-jkfit' has 2"):
        model.check_targets(other, where="structure 0")

    water_only = DensityModel(basis_set(AUXBASIS, ["H", "O"]), HYPERS)
    methane = random_coefficients(ase.build.molecule("CH4"), basis, seed=0)
    with pytest.raises(ValueError, match="structure 4: block o3_lambda=0, o3_sigma=1, center_type=6 is not"):
        water_only.check_targets(methane, where="structure 4")


def test_descriptor_of_other_hypers_is_rejected(basis):
    model = DensityModel(basis, HYPERS)
    other = DensityModel(basis, {**HYPERS, "basis": {**HYPERS["basis"], "radial": {"type": "Gto", "max_radial": 3}}})
    descriptor = other.descriptor.compute([ase.build.molecule("H2O")])
    with pytest.raises(ValueError, match="descriptor block .* properties does not fit"):
        model(descriptor)


def test_nonlinear_model_gradients_reach_every_parameter_on_the_requested_device(basis, baseline):
    model = DensityModel(basis, HYPERS, model="nonlinear", baseline=baseline, device="cpu",
                         hidden_sizes=(16, 8), width=4)
    assert model.device == torch.device("cpu")
    assert all(p.device == torch.device("cpu") for p in model.parameters())
    descriptor = model.descriptor.compute([rattled("CH3OH"), rattled("H2O", seed=1)])
    prediction = model(descriptor)
    assert all(found.values.device == torch.device("cpu") for found in prediction.blocks())
    loss = sum((found.values ** 2).sum() for found in prediction.blocks())
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().max() > 0, name


def test_model_state_moves_with_to(basis, baseline):
    model = DensityModel(basis, HYPERS, baseline=baseline)
    model.to(dtype=torch.float32)
    prediction = model.predict([ase.build.molecule("H2O")])
    assert all(found.values.dtype == torch.float32 for found in prediction.blocks())
    reference = DensityModel(basis, HYPERS, baseline=baseline).predict([ase.build.molecule("H2O")])
    for key, found in reference.items():
        torch.testing.assert_close(prediction.block(key).values.double(), found.values, rtol=1e-5, atol=1e-6)
