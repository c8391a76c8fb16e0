"""Stock lambda-SOAP: blocks and metadata, O(3) equivariance, cache (gradients: see
test_contracted_descriptor.py, which checks both calculators)."""

import os

import ase.build
import metatensor.torch as mts
import pytest
import torch

from rholearn import layout
from rholearn.descriptors import DEFAULT_HYPERS, LambdaSoap
from rholearn.descriptors.base import structure_hash
from rholearn.testing import assert_equivariant
from rhocalc.pyscf import basis_set

# max_angular = 2 reaches o3_lambda = 4, the largest l of def2-universal-jkfit
HYPERS = {
    "cutoff": {"radius": 4.0, "smoothing": {"type": "ShiftedCosine", "width": 0.5}},
    "density": {"type": "Gaussian", "width": 0.3},
    "basis": {"type": "TensorProduct", "max_angular": 2, "radial": {"type": "Gto", "max_radial": 2}},
}
ATOM_TYPES = [1, 6, 7, 8]


def rattled(name: str, seed: int = 0) -> ase.Atoms:
    atoms = ase.build.molecule(name)
    atoms.rattle(0.1, seed=seed)
    return atoms


@pytest.fixture(scope="module")
def basis():
    return basis_set("def2-universal-jkfit", ["H", "C", "N", "O"])


@pytest.fixture(scope="module")
def soap(basis):
    return LambdaSoap(HYPERS, ATOM_TYPES, target_keys=basis.keys())


def block(tensor, key):
    return tensor.block(dict(zip(layout.KEY_NAMES, key)))


def test_blocks_are_the_target_keys_of_the_elements_present(soap, basis):
    frames = [ase.build.molecule("H2O"), ase.build.molecule("CH4")]
    descriptor = soap.compute(frames, system_ids=[4, 9])

    keys = {tuple(key) for key in descriptor.keys.values.tolist()}
    assert keys == set(basis.keys(["H", "C", "O"]))
    n_features = soap.n_features()
    for key, found in descriptor.items():
        l, _, z = (int(x) for x in key.values)
        assert found.samples.names == layout.SAMPLE_NAMES
        assert found.components[0].names == [layout.COMPONENT_NAME]
        assert found.components[0].values.reshape(-1).tolist() == list(range(-l, l + 1))
        assert len(found.properties) == n_features[(l, 1, z)]
        expected_samples = [
            [system, i]
            for system, atoms in zip([4, 9], frames)
            for i, zi in enumerate(atoms.numbers)
            if zi == z
        ]
        assert found.samples.values.tolist() == expected_samples


def test_properties_do_not_depend_on_the_elements_present(soap):
    in_water = soap.compute([ase.build.molecule("H2O")])
    in_ammonia = soap.compute([ase.build.molecule("NH3")])
    for l in range(3):
        assert block(in_water, (l, 1, 1)).properties == block(in_ammonia, (l, 1, 1)).properties


@pytest.mark.parametrize("name", ["H2O", "CH3OH", "CH3NO2"])
def test_descriptor_is_equivariant(soap, name):
    atoms = rattled(name)
    descriptor = soap.compute([atoms])
    assert max(int(key["o3_lambda"]) for key in descriptor.keys) == 4
    for found in descriptor.blocks():  # equivariance of zeros would prove nothing
        assert found.values.abs().max() > 1e-3
    worst = assert_equivariant(lambda a: soap.compute([a]), atoms, seed=1, atol=1e-10)
    assert worst < 1e-10


def test_equivariance_checker_catches_a_wrong_transformation(soap):
    def swapped_l1(atoms):
        """The descriptor with m = -1 and m = +1 swapped in the l = 1 blocks."""
        descriptor = soap.compute([atoms])
        blocks = []
        for key, found in descriptor.items():
            values = found.values
            if int(key["o3_lambda"]) == 1:
                values = values[:, [2, 1, 0], :]
            blocks.append(mts.TensorBlock(values, found.samples, found.components, found.properties))
        return mts.TensorMap(descriptor.keys, blocks)

    with pytest.raises(AssertionError, match="o3_lambda=1"):
        assert_equivariant(swapped_l1, rattled("CH3OH"), inversion=False)


def test_default_hypers_cover_the_basis_and_are_equivariant(basis):
    soap = LambdaSoap(DEFAULT_HYPERS, ATOM_TYPES, target_keys=basis.keys(["H", "O"]))
    assert set(soap.n_features()) == set(basis.keys(["H", "O"]))
    assert_equivariant(lambda a: soap.compute([a]), rattled("H2O"), seed=2)


def test_too_small_max_angular_is_an_error(basis):
    hypers = {**HYPERS, "basis": {**HYPERS["basis"], "max_angular": 1}}
    with pytest.raises(ValueError, match="o3_lambda=3.*max_angular >= 2"):
        LambdaSoap(hypers, ATOM_TYPES, target_keys=basis.keys())


def test_unknown_element_names_the_structure(basis):
    soap = LambdaSoap(HYPERS, [1, 8], target_keys=basis.keys(["H", "O"]))
    frames = [ase.build.molecule("H2O"), ase.build.molecule("NH3")]
    with pytest.raises(ValueError, match=r"structure 3 \(H3N\).*\['N'\]"):
        soap.compute(frames, system_ids=[2, 3])


def test_cache_returns_the_computed_descriptor_and_checks_settings(soap, tmp_path):
    frames = [ase.build.molecule("H2O"), ase.build.molecule("CH4")]
    cached = soap.compute_cached(frames, [3, 8], str(tmp_path))
    names = [f"3-{structure_hash(frames[0])}.mts", f"8-{structure_hash(frames[1])}.mts"]
    assert sorted(os.listdir(tmp_path)) == sorted([*names, "descriptor.json"])
    fresh = soap.compute(frames, [3, 8])
    assert {tuple(k) for k in cached.keys.values.tolist()} == {
        tuple(k) for k in fresh.keys.values.tolist()
    }
    for key, found in fresh.items():
        assert torch.equal(cached.block(key).values, found.values)
        assert cached.block(key).samples == found.samples

    # a second call reads the files: a replaced file is what comes back
    layout.save(str(tmp_path / names[0]), mts.zeros_like(soap.compute(frames[:1], [3])))
    again = soap.compute_cached(frames[:1], [3], str(tmp_path))
    assert all(bool((found.values == 0).all()) for found in again.blocks())

    # the same index with a moved atom is computed again, and its older file removed
    moved = frames[0].copy()
    moved.positions[1, 0] += 0.01
    recomputed = soap.compute_cached([moved], [3], str(tmp_path))
    for key, found in soap.compute([moved], [3]).items():
        assert torch.equal(recomputed.block(key).values, found.values)
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f"3-{structure_hash(moved)}.mts", names[1], "descriptor.json"])

    other = LambdaSoap({**HYPERS, "density": {"type": "Gaussian", "width": 0.5}}, ATOM_TYPES, soap.target_keys)
    with pytest.raises(ValueError, match="other settings"):
        other.compute_cached(frames, [3, 8], str(tmp_path))
