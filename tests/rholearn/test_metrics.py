"""Coefficient-space metrics against dense numpy expressions, on real PySCF overlaps."""

import json

import metatensor.torch as mts
import numpy as np
import pytest
import torch

import overlap_systems as data
from rholearn.metrics import (
    atom_error_shares,
    error_summary,
    overlap_norms,
    relative_l2_errors,
    relative_rmse,
    subtract_baseline,
)
from rholearn.models import Baseline


@pytest.fixture(scope="module")
def structures():
    return data.batch()


@pytest.fixture(scope="module")
def references(structures):
    return data.random_vectors(structures, seed=0)


@pytest.fixture(scope="module")
def predictions(structures, references):
    """References plus 1, 5 and 10 % noise."""
    noise = data.random_vectors(structures, seed=1)
    return [c + scale * n for c, n, scale in zip(references, noise, [0.01, 0.05, 0.1])]


@pytest.fixture(scope="module")
def tensors(structures, references, predictions):
    """Prediction, reference (shuffled samples) and overlap TensorMaps."""
    return (
        data.coefficients(structures, predictions),
        data.shuffled(data.coefficients(structures, references), seed=2),
        data.overlaps(structures),
    )


@pytest.fixture(scope="module")
def baseline(tensors):
    """Mean o3_lambda = 0 coefficients per element: one sample per block."""
    means = mts.mean_over_samples(tensors[1], sample_names=["system", "atom"])
    invariants = mts.Labels(["o3_lambda"], torch.tensor([[0]], dtype=torch.int32))
    return mts.filter_blocks(means, invariants)


def dense_baseline(baseline, structure):
    """The baseline broadcast onto a structure's canonical vector."""
    values = {
        int(key["center_type"]): block.values[0, 0].numpy() for key, block in baseline.items()
    }
    return np.array(
        [
            values[structure.atomic_numbers[atom]][n] if l == 0 else 0.0
            for atom, l, n, _ in data.basis().functions(structure.symbols)
        ]
    )


def test_relative_l2_errors(structures, references, predictions, tensors):
    systems, errors = relative_l2_errors(*tensors)
    assert systems.tolist() == [s.system for s in structures]
    expected = [
        100 * np.sqrt((x - y) @ s.overlap @ (x - y) / (y @ s.overlap @ y))
        for s, x, y in zip(structures, predictions, references)
    ]
    np.testing.assert_allclose(errors.numpy(), expected, rtol=1e-12)
    assert expected[0] < expected[1] < expected[2]  # the noise levels show through


def test_relative_rmse(structures, references, predictions, tensors, baseline):
    errors, spreads = 0.0, 0.0
    for s, x, y in zip(structures, predictions, references):
        base = dense_baseline(baseline, s)
        errors += (x - y) @ s.overlap @ (x - y)
        spreads += (y - base) @ s.overlap @ (y - base)
    expected = 100 * np.sqrt(errors / spreads)
    assert relative_rmse(*tensors, baseline) == pytest.approx(expected, rel=1e-12)
    # the model's baseline is the same per-element mean
    model_baseline = Baseline.from_coefficients([tensors[1]]).means
    assert relative_rmse(*tensors, model_baseline) == pytest.approx(expected, rel=1e-12)
    # predicting the baseline itself scores 100 %
    reference = tensors[1]
    as_baseline = mts.subtract(reference, subtract_baseline(reference, baseline))
    assert relative_rmse(as_baseline, reference, tensors[2], baseline) == pytest.approx(100.0)


def test_perfect_prediction_scores_zero(tensors, baseline):
    _, reference, overlap = tensors
    assert relative_l2_errors(reference, reference, overlap)[1].abs().max() == 0.0
    assert relative_rmse(reference, reference, overlap, baseline) == 0.0


def test_error_summary(structures, references, predictions, tensors, baseline):
    summary = error_summary(overlap_norms(*tensors, baseline))
    systems, errors = relative_l2_errors(*tensors)
    table = summary["relative_l2_percent"]
    assert summary["n_structures"] == 3
    assert table["per_structure"] == pytest.approx(dict(zip(systems.tolist(), errors.tolist())))
    assert table["mean"] == pytest.approx(float(errors.mean()))
    assert table["max"] == pytest.approx(float(errors.max()))
    assert table["max_system"] == 7  # the 10 % noise structure
    assert summary["rmse_percent"] == pytest.approx(relative_rmse(*tensors, baseline))
    assert "rmse_percent" not in error_summary(overlap_norms(*tensors))
    json.dumps(summary)
    # batch by batch: the same summary
    norms = [
        overlap_norms(
            data.coefficients(structures[i], predictions[i]),
            data.coefficients(structures[i], references[i]),
            data.overlaps(structures[i]),
            baseline,
        )
        for i in (slice(0, 1), slice(1, 3))
    ]
    per_batch = error_summary(norms)
    assert per_batch["rmse_percent"] == pytest.approx(summary["rmse_percent"], rel=1e-12)
    for name in ("mean", "max", "max_system", "per_structure"):
        found, expected = per_batch["relative_l2_percent"][name], table[name]
        assert found == pytest.approx(expected, rel=1e-12)


def test_metrics_do_not_track_gradients(tensors):
    prediction = mts.requires_grad(tensors[0], True)
    _, errors = relative_l2_errors(prediction, *tensors[1:])
    assert not errors.requires_grad


def test_baseline_errors(tensors):
    reference = tensors[1]
    per_atom = mts.filter_blocks(
        reference, mts.Labels(["o3_lambda"], torch.tensor([[0]], dtype=torch.int32))
    )
    with pytest.raises(ValueError, match="baseline block o3_lambda=0, o3_sigma=1, center_type=1"):
        subtract_baseline(reference, per_atom)


def test_atom_error_shares_are_loewdin_populations(structures, references, predictions, tensors):
    """Each atom's share is its part of |S^(1/2) dc|^2: non-negative, summing to 100 %
    of the structure's dc^T S dc, on real PySCF overlaps."""
    for s, x, y in zip(structures, predictions, references):
        system = mts.Labels(["system"], torch.tensor([[s.system]], dtype=torch.int32))
        one = [mts.slice(tensor, "samples", system) for tensor in tensors]
        shares = atom_error_shares(*one, s.atomic_numbers, data.basis())
        dc = x - y
        eigenvalues, eigenvectors = np.linalg.eigh(s.overlap)
        root = eigenvectors @ (np.sqrt(eigenvalues) * (eigenvectors.T @ dc))
        owner = np.array([atom for atom, _, _, _ in data.basis().functions(s.symbols)])
        expected = 100 * np.bincount(owner, weights=root**2) / (dc @ s.overlap @ dc)
        assert shares.shape == (len(s.symbols),)
        assert (shares >= 0).all()
        assert shares.sum() == pytest.approx(100.0, rel=1e-12)
        np.testing.assert_allclose(shares, expected, rtol=1e-10)


def test_atom_error_shares_of_an_exact_prediction_are_zero(structures, tensors):
    s = structures[0]
    system = mts.Labels(["system"], torch.tensor([[s.system]], dtype=torch.int32))
    reference, overlap = (mts.slice(t, "samples", system) for t in tensors[1:])
    shares = atom_error_shares(reference, reference, overlap, s.atomic_numbers, data.basis())
    assert shares.tolist() == [0.0] * len(s.symbols)
