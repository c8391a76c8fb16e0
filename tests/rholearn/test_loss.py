"""Losses against dense numpy expressions, on real PySCF overlaps of 3 joined molecules."""

import metatensor.torch as mts
import numpy as np
import pytest
import torch

import overlap_systems as data
from rholearn import layout
from rholearn.loss import CoefficientLoss, LossTarget, OverlapLoss, ProjectionLoss


@pytest.fixture(scope="module")
def structures():
    return data.batch()


@pytest.fixture(scope="module")
def target(structures):
    """Reference coefficients, their projections ``w = S c_ref`` and the overlap,
    each in its own random sample order."""
    references = data.random_vectors(structures, seed=0)
    projections = [s.overlap @ c for s, c in zip(structures, references)]
    return LossTarget(
        coefficients=data.shuffled(data.coefficients(structures, references), seed=1),
        projections=data.shuffled(data.coefficients(structures, projections), seed=2),
        overlap=data.shuffled(data.overlaps(structures, threshold=0.0), seed=3),
    )


def prediction_of(structures, seed=10):
    """Coefficients with values that require gradients."""
    tensor = data.coefficients(structures, data.random_vectors(structures, seed, scale=1.1))
    return mts.requires_grad(tensor, True)


def dense(tensor, structures):
    return [data.dense_vector(tensor, s) for s in structures]


def gradients(prediction, structures):
    """The gradient of the last backward pass, as dense vectors."""
    blocks = [
        mts.TensorBlock(b.values.grad, b.samples, b.components, b.properties)
        for b in prediction.blocks()
    ]
    return dense(mts.TensorMap(prediction.keys, blocks), structures)


def test_coefficient_loss(structures, target):
    prediction = prediction_of(structures)
    weights = {(1, 1, 8): 2.0, (0, 1, 1): 0.5}
    loss = CoefficientLoss(weights=weights)(prediction, target)
    loss.backward()
    c, c_ref = dense(prediction, structures), dense(target.coefficients, structures)
    expected, expected_gradients = 0.0, []
    for s, x, y in zip(structures, c, c_ref):
        w = np.array(
            [
                weights.get((l, 1, s.atomic_numbers[atom]), 1.0)
                for atom, l, _, _ in data.basis().functions(s.symbols)
            ]
        )
        expected += np.sum(w * (x - y) ** 2)
        expected_gradients.append(2 * w * (x - y))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    for found, wanted in zip(gradients(prediction, structures), expected_gradients):
        np.testing.assert_allclose(found, wanted, atol=1e-12)
    mean = CoefficientLoss(weights=weights, reduction="mean")(prediction, target)
    assert mean.item() == pytest.approx(expected / 3, rel=1e-12)


def test_overlap_loss_and_its_gradient(structures, target):
    prediction = prediction_of(structures)
    loss_fn = OverlapLoss()
    systems, per_structure = loss_fn.per_structure(prediction, target)
    assert systems.tolist() == [s.system for s in structures]
    c, c_ref = dense(prediction, structures), dense(target.coefficients, structures)
    expected = [(x - y) @ s.overlap @ (x - y) for s, x, y in zip(structures, c, c_ref)]
    np.testing.assert_allclose(per_structure.detach().numpy(), expected, rtol=1e-12)
    loss = loss_fn(prediction, target)
    assert loss.item() == pytest.approx(sum(expected), rel=1e-12)
    loss.backward()
    for s, x, y, found in zip(structures, c, c_ref, gradients(prediction, structures)):
        np.testing.assert_allclose(found, 2 * s.overlap @ (x - y), atol=1e-12)


def test_projection_loss_is_overlap_loss_minus_a_constant(structures, target):
    prediction = prediction_of(structures)
    _, overlap_loss = OverlapLoss().per_structure(prediction, target)
    _, projection_loss = ProjectionLoss().per_structure(prediction, target)
    c, c_ref = dense(prediction, structures), dense(target.coefficients, structures)
    constants = [y @ s.overlap @ y for s, y in zip(structures, c_ref)]
    np.testing.assert_allclose(
        (projection_loss + torch.tensor(constants)).detach().numpy(),
        overlap_loss.detach().numpy(),
        rtol=1e-10,
    )
    with_constant = ProjectionLoss(add_constant=True, reduction="mean")(prediction, target)
    assert with_constant.item() == pytest.approx(overlap_loss.mean().item(), rel=1e-10)
    # needs no reference coefficients, and has the analytic gradient 2 (S c - w)
    loss = ProjectionLoss()(prediction, target._replace(coefficients=None))
    loss.backward()
    w = dense(target.projections, structures)
    for s, x, y, found in zip(structures, c, w, gradients(prediction, structures)):
        np.testing.assert_allclose(found, 2 * (s.overlap @ x - y), atol=1e-12)


def test_dropped_pairs_make_a_small_bounded_difference():
    dimer = data.structure("H2O", system=0, spacing=6.0)  # two waters 6 A apart
    sparse = data.overlaps([dimer], threshold=1e-6)
    n_atoms = len(dimer.atomic_numbers)
    pairs = {tuple(x) for b in sparse.blocks() for x in b.samples.values[:, 1:].tolist()}
    assert len(pairs) < n_atoms**2  # some far pairs were dropped
    kept = data.dense_matrix(sparse, dimer)
    c_ref, c = data.random_vectors([dimer], seed=1) + data.random_vectors([dimer], seed=2)
    target = LossTarget(coefficients=data.coefficients([dimer], [c_ref]), overlap=sparse)
    loss = float(OverlapLoss()(data.coefficients([dimer], [c]), target))
    dc = c - c_ref
    assert loss == pytest.approx(dc @ kept @ dc, rel=1e-12)  # exactly the kept pairs
    exact = dc @ dimer.overlap @ dc
    bound = np.linalg.norm(dimer.overlap - kept, 2) * dc @ dc
    assert 0 < abs(loss - exact) <= bound
    assert abs(loss - exact) < 1e-4 * exact


def test_float32(structures, target):
    prediction = prediction_of(structures)
    single = LossTarget(*(t.to(dtype=torch.float32) for t in target))
    loss = OverlapLoss()(prediction.to(dtype=torch.float32), single)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(OverlapLoss()(prediction, target).item(), rel=1e-4)


def test_errors(structures, target):
    prediction = prediction_of(structures)
    with pytest.raises(ValueError, match="reduction must be one of"):
        OverlapLoss(reduction="max")
    with pytest.raises(ValueError, match="OverlapLoss needs the target 'overlap'"):
        OverlapLoss()(prediction, target._replace(overlap=None))
    with pytest.raises(ValueError, match="ProjectionLoss needs the target 'coefficients'"):
        ProjectionLoss(add_constant=True)(prediction, target._replace(coefficients=None))
    with pytest.raises(ValueError, match="target 'coefficients' is torch.float32"):
        single = target.coefficients.to(dtype=torch.float32)
        CoefficientLoss()(prediction, target._replace(coefficients=single))


def test_mismatched_targets_name_the_key(structures, target):
    prediction = prediction_of(structures)
    key = mts.Labels(layout.KEY_NAMES, torch.tensor([[1, 1, 7]], dtype=torch.int32))
    without_nitrogen_p = target._replace(coefficients=mts.drop_blocks(target.coefficients, key))
    with pytest.raises(KeyError, match="no block for o3_lambda=1, o3_sigma=1, center_type=7"):
        OverlapLoss()(prediction, without_nitrogen_p)
    first_radial = mts.Labels(["n"], torch.tensor([[0]], dtype=torch.int32))
    truncated = mts.slice(target.coefficients, "properties", first_radial)
    with pytest.raises(ValueError, match="coefficients: block o3_lambda=0, o3_sigma=1, center_type=1 "):
        CoefficientLoss()(prediction, target._replace(coefficients=truncated))


def test_nan_in_targets_names_the_system(structures, target):
    prediction = prediction_of(structures)
    blocks = []
    for key, block in target.coefficients.items():
        values = block.values.clone()
        if int(key["center_type"]) == 7 and int(key["o3_lambda"]) == 2:
            values[0, 0, 0] = float("nan")
        blocks.append(
            mts.TensorBlock(values, block.samples, block.components, block.properties)
        )
    broken = mts.TensorMap(target.coefficients.keys, blocks)
    with pytest.raises(ValueError, match=r"of system\(s\) \[5\] contain NaN.*center_type=7"):
        OverlapLoss()(prediction, target._replace(coefficients=broken))


def test_overlap_losses_reuse_the_index_of_a_fixed_batch(structures, target):
    """As LBFGS evaluates one batch many times: the second call stores the index,
    later ones reuse it, also for a copy of the targets; values and gradients
    equal those of a loss without cache."""
    for make in (OverlapLoss, lambda **kw: ProjectionLoss(add_constant=True, **kw)):
        loss_fn, uncached = make(), make(cache_bytes=0)
        expected = None
        for call in range(4):
            batch = target if call < 3 else LossTarget(*(t.copy() for t in target))
            prediction = prediction_of(structures)
            loss = loss_fn(prediction, batch)
            loss.backward()
            if expected is None:
                reference = prediction_of(structures)
                expected = uncached(reference, target)
                expected.backward()
                expected_gradients = gradients(reference, structures)
            assert loss.item() == pytest.approx(expected.item(), rel=1e-13)
            for found, wanted in zip(gradients(prediction, structures), expected_gradients):
                np.testing.assert_allclose(found, wanted, rtol=1e-12, atol=1e-14)
        assert (loss_fn.overlaps.hits, loss_fn.overlaps.misses) == (2, 2)
        assert (uncached.overlaps.hits, len(uncached.overlaps)) == (0, 0)
