"""The spherical expansion in pure torch equals featomic's (1e-10, float64, CPU): molecules,
periodic cells, other cutoff functions, neighbour lists given by the engine; its gradients
agree; the contracted lambda-SOAP built on it is equivariant, scriptable and runs without
featomic."""

import copy
import subprocess
import sys

import ase
import ase.build
import numpy as np
import pytest
import torch
from metatomic.torch import NeighborListOptions, System, systems_to_torch

from rholearn.descriptors import DEFAULT_HYPERS, ContractedLambdaSoap
from rholearn.descriptors.expansion import (
    FeatomicExpansion, TorchExpansion, all_pairs, make_expansion, resolve,
)
from rholearn.testing import assert_equivariant

ATOM_TYPES = [1, 6, 7, 8]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rattled(name: str, seed: int = 0) -> ase.Atoms:
    atoms = ase.build.molecule(name)
    atoms.rattle(0.1, seed=seed)
    return atoms


def periodic_waters() -> ase.Atoms:
    """Two waters in a slanted periodic cell smaller than twice the cutoff (an atom
    sees its own images), one atom outside the cell."""
    atoms = rattled("H2O", 1) + rattled("H2O", 2)
    atoms.positions[3:] += [2.0, 1.5, 0.5]
    atoms.cell = [[5.0, 0.0, 0.0], [1.0, 4.5, 0.0], [0.5, 0.7, 4.8]]
    atoms.pbc = True
    atoms.positions[0] -= [0.0, 0.0, 1.0]  # below the cell's first plane
    return atoms


FRAMES = [rattled("CH3NO2"), rattled("H2O", 1), rattled("C6H6", 2), periodic_waters()]


def hypers_with(**changes) -> dict:
    hypers = copy.deepcopy(DEFAULT_HYPERS)
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = hypers
        for key in parents:
            node = node[key]
        node[last] = value
    return hypers


HYPERS = {
    "default": DEFAULT_HYPERS,
    "step, wider density, centre weight": hypers_with(
        cutoff__smoothing={"type": "Step"}, density__width=0.5, density__center_atom_weight=0.3,
    ),
    "fine spline, larger basis": hypers_with(
        cutoff__radius=5.0, basis__max_angular=6, basis__radial={"type": "Gto", "max_radial": 7},
        basis__spline_accuracy=1e-10,
    ),
}


@pytest.mark.parametrize("name", list(HYPERS))
def test_torch_expansion_equals_featomic(name):
    hypers = HYPERS[name]
    systems = systems_to_torch(FRAMES, dtype=torch.float64)
    expected = FeatomicExpansion(hypers, ATOM_TYPES)(systems)
    found = TorchExpansion(hypers, ATOM_TYPES)(systems)
    assert found.shape == expected.shape
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(found, expected, rtol=0, atol=1e-10)


def test_neighbour_lists_attached_by_the_engine_give_the_same_values():
    from vesin.metatomic import NeighborList

    expansion = TorchExpansion(DEFAULT_HYPERS, ATOM_TYPES)
    systems = systems_to_torch(FRAMES, dtype=torch.float64)
    expected = expansion(systems)
    (options,) = expansion.requested_neighbor_lists()
    for full_list in (True, False):
        systems = systems_to_torch(FRAMES, dtype=torch.float64)
        half = NeighborListOptions(cutoff=options.cutoff + 0.5, full_list=full_list, strict=False)
        NeighborList(half, "angstrom").add_neighbor_list(systems)
        torch.testing.assert_close(expansion(systems), expected, rtol=0, atol=1e-13)


def test_all_pairs_match_ase_neighbour_list():
    from ase.neighborlist import neighbor_list

    atoms = periodic_waters()
    first, second, shifts = all_pairs(
        torch.tensor(atoms.positions), torch.tensor(atoms.cell.array), torch.tensor(atoms.pbc), 4.0
    )
    i, j, S = neighbor_list("ijS", atoms, 4.0)
    assert sorted(zip(first.tolist(), second.tolist(), map(tuple, shifts.tolist()))) == sorted(
        zip(i.tolist(), j.tolist(), map(tuple, S.tolist()))
    )


@pytest.mark.parametrize("frame", [0, 3], ids=["molecule", "periodic"])
def test_position_and_cell_gradients_equal_featomic(frame):
    generator = torch.Generator().manual_seed(frame)
    n_m = (DEFAULT_HYPERS["basis"]["max_angular"] + 1) ** 2
    n_channels = len(ATOM_TYPES) * (DEFAULT_HYPERS["basis"]["radial"]["max_radial"] + 1)
    weights = torch.randn(n_m, n_channels, generator=generator, dtype=torch.float64)
    gradients = []
    atoms = FRAMES[frame]
    for expansion in (FeatomicExpansion(DEFAULT_HYPERS, ATOM_TYPES), TorchExpansion(DEFAULT_HYPERS, ATOM_TYPES)):
        system = System(
            types=torch.tensor(atoms.numbers, dtype=torch.int32),
            positions=torch.tensor(atoms.positions, requires_grad=True),
            cell=torch.tensor(atoms.cell.array, requires_grad=True),
            pbc=torch.tensor(atoms.pbc),
        )
        value = (expansion([system]) * weights).sum()
        gradients.append(torch.autograd.grad(value, [system.positions, system.cell], allow_unused=True))
    if not atoms.pbc.any():  # featomic does not use the cell of a molecule
        gradients[0] = (gradients[0][0], torch.zeros(3, 3, dtype=torch.float64))
    assert gradients[0][0].abs().max() > 1e-2
    assert (gradients[0][1].abs().max() > 1e-2) == bool(atoms.pbc.any())
    for expected, found in zip(*gradients):
        torch.testing.assert_close(found, expected, rtol=0, atol=1e-9)


def test_auto_is_torch_on_cuda_only():
    assert resolve("auto", torch.device("cuda")) == "torch"
    assert resolve("auto", torch.device("cpu")) == "featomic"
    assert resolve("featomic", torch.device("cuda")) == "featomic"
    with pytest.raises(ValueError, match="unknown expansion 'rust'"):
        resolve("rust", torch.device("cpu"))
    assert isinstance(make_expansion("torch", DEFAULT_HYPERS, ATOM_TYPES, torch.float64), TorchExpansion)


@pytest.mark.parametrize("scripted", [False, True])
def test_unknown_atom_types_name_the_system_and_element(scripted):
    """Nitrogen (7, a gap in the type table, which was read as the last type) and chlorine
    (17, beyond the table) raise an error naming the system, the atom and the atomic number."""
    expansion = TorchExpansion(DEFAULT_HYPERS, [1, 6, 8])
    module = torch.jit.script(expansion) if scripted else expansion
    water, ammonia, methyl_chloride = rattled("H2O"), rattled("NH3"), rattled("CH3Cl")
    for frames, message in (
        ([water, ammonia], r"system 1 has atomic number 7 \(atom 0\), which is not in the "
                           r"atom_types \[1, 6, 8\]"),
        ([methyl_chloride], r"system 0 has atomic number 17 \(atom 1\)"),
    ):
        with pytest.raises((ValueError, torch.jit.Error), match=message):
            module(systems_to_torch(frames, dtype=torch.float64))
    assert module(systems_to_torch([water], dtype=torch.float64)).shape[0] == 3


def test_unsupported_hypers_name_what_and_the_way_out():
    hypers = hypers_with(density__scaling={"type": "Willatt2018", "scale": 1.0, "rate": 1.0, "exponent": 2})
    with pytest.raises(ValueError, match="does not support density.*expansion='featomic'"):
        TorchExpansion(hypers, ATOM_TYPES)
    with pytest.raises(ValueError, match="spline_accuracy None"):
        TorchExpansion(hypers_with(basis__spline_accuracy=None), ATOM_TYPES)


@pytest.fixture(scope="module")
def descriptors():
    """The fitted contracted lambda-SOAP with each expansion (same contraction)."""
    training = [rattled(name, seed) for seed in range(2) for name in ["CH3OH", "CH3NO2", "H2O"]]
    featomic = ContractedLambdaSoap(DEFAULT_HYPERS, ATOM_TYPES, n_channels=6, expansion="featomic")
    featomic.fit(training)
    torch_ = ContractedLambdaSoap(DEFAULT_HYPERS, ATOM_TYPES, n_channels=6, expansion="torch")
    torch_.fit(training)
    torch_.load_state(featomic.state())  # PCAs of nearly degenerate channels may differ
    return featomic, torch_


def test_contracted_lambda_soap_is_the_same_with_either_expansion(descriptors):
    featomic, torch_ = descriptors
    assert torch_.settings() == featomic.settings()  # same fitted contraction too
    assert torch_.options()["expansion"] == "torch"
    expected, found = featomic.compute(FRAMES, [3, 1, 4, 5]), torch_.compute(FRAMES, [3, 1, 4, 5])
    assert found.keys == expected.keys
    for key, block in expected.items():
        assert found.block(key).samples == block.samples
        torch.testing.assert_close(found.block(key).values, block.values, rtol=0, atol=1e-10)


def test_torch_contracted_lambda_soap_is_equivariant_and_scriptable(descriptors):
    _, soap = descriptors
    atoms = rattled("CH3NO2", seed=5)
    assert assert_equivariant(lambda a: soap.compute([a]), atoms, seed=4, atol=1e-10) < 1e-10
    scripted = torch.jit.script(soap.module)
    systems = soap.systems(FRAMES)
    for key, block in soap.module(systems).items():
        torch.testing.assert_close(scripted(systems).block(key).values, block.values, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_and_devices_agree(descriptors, device):
    featomic, soap = descriptors
    reference = featomic.compute(FRAMES[:2])
    other = soap.to(torch.float32, device)
    assert isinstance(other.module.expansion, TorchExpansion)
    found = other.compute(FRAMES[:2]).to(dtype=torch.float64, device="cpu")
    for key, block in reference.items():
        scale = float(block.values.abs().max())
        torch.testing.assert_close(found.block(key).values, block.values, rtol=0, atol=1e-4 * scale)


RUN_WITHOUT_FEATOMIC = """
import sys, ase.build, torch
import metatomic.torch
module = torch.jit.load(sys.argv[1])
atoms = ase.build.molecule("CH3OH")
systems = metatomic.torch.systems_to_torch([atoms], dtype=torch.float64)
total = sum(float(block.values.abs().sum()) for block in module(systems).blocks())
assert "featomic" not in sys.modules, "featomic was imported"
print(total)
"""


def test_scripted_torch_descriptor_runs_without_featomic(descriptors, tmp_path):
    _, soap = descriptors
    path = str(tmp_path / "descriptor.pt")
    torch.jit.script(soap.module).save(path)
    result = subprocess.run([sys.executable, "-c", RUN_WITHOUT_FEATOMIC, path], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = sum(float(b.values.abs().sum()) for b in soap.compute([ase.build.molecule("CH3OH")]).blocks())
    np.testing.assert_allclose(float(result.stdout), expected, rtol=1e-12)
