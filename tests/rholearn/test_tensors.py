"""Cartesian <-> spherical molecular tensors: round trips, norms, featomic, rotations."""

import metatensor
import numpy as np
import pytest
from featomic.clebsch_gordan import cartesian_to_spherical
from metatensor import Labels, TensorBlock, TensorMap

from rholearn import layout, tensors
from rholearn.rotations import random_rotation, rotate_blocks


def _symmetric(rng, n):
    matrices = rng.normal(size=(n, 3, 3))
    return matrices + matrices.transpose(0, 2, 1)


def test_round_trips_keep_values_and_norms(tmp_path):
    rng = np.random.default_rng(0)
    vectors, symmetric = rng.normal(size=(4, 3)), _symmetric(rng, 4)
    for cartesian, lambdas in ((vectors, [1]), (symmetric, [0, 2])):
        spherical = tensors.cartesian_to_tensormap(cartesian, [3, 5, 7, 9])
        assert spherical.keys.names == ["o3_lambda", "o3_sigma"]
        assert [int(l) for l in spherical.keys.column("o3_lambda")] == lambdas
        for block in spherical.blocks():
            assert block.samples.names == ["system"]
            assert block.samples.column("system").tolist() == [3, 5, 7, 9]
            assert block.properties.values.tolist() == [[0]]
        np.testing.assert_allclose(tensors.tensormap_to_cartesian(spherical), cartesian,
                                   atol=1e-14)
        # orthogonal: the Frobenius norm of each structure's tensor is kept
        squared = sum((block.values[..., 0] ** 2).sum(axis=1) for block in spherical.blocks())
        np.testing.assert_allclose(squared, (cartesian ** 2).reshape(4, -1).sum(axis=1))
    # a round trip through a file
    spherical = tensors.cartesian_to_tensormap(symmetric, range(4))
    layout.save(str(tmp_path / "tensor.mts"), spherical)
    loaded = layout.load(str(tmp_path / "tensor.mts"))
    np.testing.assert_allclose(tensors.tensormap_to_cartesian(loaded), symmetric, atol=1e-14)


def test_isotropic_part_is_trace_over_sqrt3_and_antisymmetric_part_is_dropped():
    rng = np.random.default_rng(1)
    symmetric = _symmetric(rng, 1)[0]
    antisymmetric = np.array([[0.0, 1.0, -2.0], [-1.0, 0.0, 0.5], [2.0, -0.5, 0.0]])
    spherical = tensors.symmetric_to_spherical(symmetric + antisymmetric)
    assert spherical[0][0] == pytest.approx(np.trace(symmetric) / np.sqrt(3))
    np.testing.assert_allclose(tensors.spherical_to_symmetric(spherical), symmetric, atol=1e-14)
    np.testing.assert_allclose(tensors.symmetric_to_spherical(np.eye(3))[2], 0, atol=1e-16)


def test_same_as_featomic_up_to_the_sign_of_the_isotropic_part():
    rng = np.random.default_rng(2)
    vectors, symmetric = rng.normal(size=(3, 3)), _symmetric(rng, 3)
    ours_1 = tensors.cartesian_to_tensormap(vectors, range(3))
    ours_2 = tensors.cartesian_to_tensormap(symmetric, range(3))

    def featomic(values, names):
        block = TensorBlock(
            values[..., None],
            Labels.range("system", len(values)),
            [Labels.range(name, 3) for name in names],
            Labels.range("n", 1),
        )
        return cartesian_to_spherical(TensorMap(Labels.single(), [block]), names)

    theirs_1 = featomic(vectors, ["xyz"])
    np.testing.assert_allclose(ours_1.block({"o3_lambda": 1}).values,
                               theirs_1.block({"o3_lambda": 1}).values, atol=1e-14)
    theirs_2 = featomic(symmetric, ["xyz_1", "xyz_2"])
    np.testing.assert_allclose(ours_2.block({"o3_lambda": 2}).values,
                               theirs_2.block({"o3_lambda": 2}).values, atol=1e-14)
    np.testing.assert_allclose(ours_2.block({"o3_lambda": 0}).values,
                               -theirs_2.block({"o3_lambda": 0}).values, atol=1e-14)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rotated_cartesian_tensors_are_wigner_d_rotated_spherical_ones(seed):
    rng = np.random.default_rng(seed)
    rotation = random_rotation(seed)
    vectors, symmetric = rng.normal(size=(2, 3)), _symmetric(rng, 2)
    for cartesian, rotated in (
        (vectors, vectors @ rotation.T),
        (symmetric, rotation @ symmetric @ rotation.T),
    ):
        expected = rotate_blocks(tensors.cartesian_to_tensormap(cartesian, [0, 1]), rotation)
        found = tensors.cartesian_to_tensormap(rotated, [0, 1])
        for key, block in found.items():
            np.testing.assert_allclose(block.values, expected.block(key).values, atol=1e-13)


def test_bad_shapes_and_blocks_are_refused():
    with pytest.raises(ValueError, match=r"shape \(n, 3\) or \(n, 3, 3\)"):
        tensors.cartesian_to_tensormap(np.zeros((2, 4)), [0, 1])
    with pytest.raises(ValueError, match="2 tensors but 1 systems"):
        tensors.cartesian_to_tensormap(np.zeros((2, 3)), [0])
    only_lambda_2 = metatensor.drop_blocks(
        tensors.cartesian_to_tensormap(np.zeros((1, 3, 3)), [0]),
        Labels(["o3_lambda", "o3_sigma"], np.array([[0, 1]])),
    )
    with pytest.raises(ValueError, match=r"got \(2,\)"):
        tensors.tensormap_to_cartesian(only_lambda_2)
