"""The shared layout: canonical vectors and matrices <-> TensorMaps, files on disk."""

import numpy as np
import pytest

from rholearn import layout
from rholearn.basis import BasisSet, Shell

WATER = [8, 1, 1]


@pytest.fixture
def basis():
    """A small hand-made basis with l up to 2 and several radial functions per l."""
    return BasisSet(
        name="test-basis",
        shells={
            "O": [Shell(0, (10.0, 2.0), (0.5, 0.5)), Shell(0, (1.0,), (1.0,)),
                  Shell(1, (3.0,), (1.0,)), Shell(2, (1.5,), (1.0,)), Shell(1, (0.5,), (1.0,))],
            "H": [Shell(0, (2.0,), (1.0,)), Shell(1, (1.0,), (1.0,))],
        },
    )


def test_basis_counts_and_order(basis):
    assert basis.n_radial("O") == {0: 2, 1: 2, 2: 1}
    assert basis.n_functions(["O", "H", "H"]) == (2 + 2 * 3 + 5) + 2 * (1 + 3)
    functions = basis.functions(["O", "H", "H"])
    assert len(functions) == basis.n_functions(["O", "H", "H"])
    # canonical order: atom, then l, then n, then m
    assert functions[:4] == [(0, 0, 0, 0), (0, 0, 1, 0), (0, 1, 0, -1), (0, 1, 0, 0)]
    assert functions == sorted(functions)
    assert basis.keys() == [(0, 1, 1), (0, 1, 8), (1, 1, 1), (1, 1, 8), (2, 1, 8)]


def test_basis_json_round_trip(basis, tmp_path):
    path = str(tmp_path / "basis.json")
    basis.save(path)
    assert BasisSet.load(path) == basis


def test_basis_unknown_element_names_structure(basis):
    with pytest.raises(KeyError, match=r"water-7.*\['N'\].*test-basis"):
        basis.check_elements(["O", "N"], where="water-7")


def test_vector_round_trip(basis):
    n = basis.n_functions(["O", "H", "H"])
    vector = np.random.default_rng(0).normal(size=n)
    tensor = layout.vector_to_tensormap(vector, WATER, basis, system=4)
    assert tensor.keys.names == layout.KEY_NAMES
    block = tensor.block({"o3_lambda": 1, "o3_sigma": 1, "center_type": 8})
    assert block.values.shape == (1, 3, 2)
    assert block.samples.names == layout.SAMPLE_NAMES
    assert block.samples.values.tolist() == [[4, 0]]
    # (atom 0, l=1, n=1, m=-1) sits after 2 s + 3 p(n=0) functions
    assert block.values[0, 0, 1] == vector[2 + 3]
    np.testing.assert_array_equal(layout.tensormap_to_vector(tensor, WATER, basis), vector)


def test_vector_of_wrong_size_is_rejected(basis):
    with pytest.raises(ValueError, match="system 3.*test-basis"):
        layout.vector_to_tensormap(np.zeros(5), WATER, basis, system=3)


def test_matrix_round_trip_and_threshold(basis):
    n = basis.n_functions(["O", "H", "H"])
    a = np.random.default_rng(1).normal(size=(n, n))
    matrix = a @ a.T
    tensor = layout.matrix_to_pair_tensormap(matrix, WATER, basis, system=2, threshold=0.0)
    assert tensor.keys.names == layout.PAIR_KEY_NAMES
    block = tensor.block(
        {"o3_lambda_1": 2, "o3_lambda_2": 0, "center_type_1": 8, "center_type_2": 1}
    )
    assert block.values.shape == (2, 5, 1, 1)
    assert block.samples.values.tolist() == [[2, 0, 1], [2, 0, 2]]
    np.testing.assert_array_equal(layout.pair_tensormap_to_matrix(tensor, WATER, basis), matrix)

    # zero the coupling between the two H atoms: that pair is dropped
    o = basis.n_functions(["O"])
    h = basis.n_functions(["H"])
    matrix[o : o + h, o + h :] = 0.0
    matrix[o + h :, o : o + h] = 0.0
    sparse = layout.matrix_to_pair_tensormap(matrix, WATER, basis)
    pairs = {tuple(s[1:]) for block in sparse.blocks() for s in block.samples.values.tolist()}
    assert (1, 2) not in pairs and (2, 1) not in pairs and (1, 1) in pairs
    np.testing.assert_array_equal(layout.pair_tensormap_to_matrix(sparse, WATER, basis), matrix)


def test_save_is_atomic_and_load_names_file(basis, tmp_path):
    tensor = layout.vector_to_tensormap(
        np.arange(basis.n_functions(["O", "H", "H"]), dtype=float), WATER, basis
    )
    path = str(tmp_path / "c.mts")
    layout.save(path, tensor)
    assert [p.name for p in tmp_path.iterdir()] == ["c.mts"]
    loaded = layout.load(path)
    np.testing.assert_array_equal(
        layout.tensormap_to_vector(loaded, WATER, basis),
        layout.tensormap_to_vector(tensor, WATER, basis),
    )
    (tmp_path / "broken.mts").write_bytes(b"not a tensormap")
    with pytest.raises(ValueError, match="broken.mts"):
        layout.load(str(tmp_path / "broken.mts"))
    with pytest.raises(FileNotFoundError, match="missing.mts"):
        layout.load(str(tmp_path / "missing.mts"))
