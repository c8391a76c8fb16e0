"""aims order and sign <-> canonical: exact inverses, the labelled and indexed (aims < 240403)
orders, and the version boundary."""

import numpy as np
import pytest

import aims_test_files
from rhocalc.aims.order import (
    CANONICAL_FROM_VERSION, AimsOrder, aims_order, condon_shortley_sign, converts, from_aims,
    indexed_order, to_aims,
)


@pytest.fixture(scope="module")
def labelled(water, water_basis):
    """aims' internal order of water's functions, as product_basis_idxs.out labels it."""
    symbols = water.get_chemical_symbols()
    labels = aims_test_files.aims_internal_labels(
        water_basis, symbols, np.random.default_rng(0)
    )
    return aims_order(np.arange(len(labels)), labels, water_basis, symbols), labels


def test_condon_shortley_sign_flips_odd_positive_m_only():
    assert [condon_shortley_sign(m) for m in range(-3, 4)] == [1, 1, 1, 1, -1, 1, -1]


def test_labelled_order_moves_and_signs_each_function(labelled, water, water_basis):
    order, labels = labelled
    canonical = water_basis.functions(water.get_chemical_symbols())
    vector = np.arange(1.0, len(canonical) + 1)  # distinct values
    aims_values = to_aims(vector, order)
    for position, (atom, l, n, m) in enumerate(labels):
        sign = -1.0 if m > 0 and m % 2 == 1 else 1.0
        assert aims_values[position] == sign * vector[canonical.index((atom, l, n, m))]
    assert not np.array_equal(order.canonical_index, np.arange(len(labels)))
    assert (order.sign == -1).sum() > 0


@pytest.mark.parametrize("shape", ["vector", "matrix"])
def test_from_aims_inverts_to_aims_exactly(labelled, shape):
    order, _ = labelled
    n = order.n_functions
    rng = np.random.default_rng(1)
    values = rng.normal(size=n) if shape == "vector" else rng.normal(size=(n, n))
    assert np.array_equal(from_aims(to_aims(values, order), order), values)
    assert np.array_equal(to_aims(from_aims(values, order), order), values)


def test_matrix_conversion_is_the_vector_one_on_both_axes(labelled):
    order, _ = labelled
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=order.n_functions), rng.normal(size=order.n_functions)
    matrix = np.outer(a, b)
    assert np.allclose(from_aims(matrix, order), np.outer(from_aims(a, order), from_aims(b, order)))


def test_identity_order_changes_nothing():
    values = np.random.default_rng(3).normal(size=(7, 7))
    assert np.array_equal(from_aims(values, AimsOrder.identity(7)), values)
    assert np.array_equal(to_aims(values[0], AimsOrder.identity(7)), values[0])


def test_wrong_size_is_an_error(labelled):
    order, _ = labelled
    with pytest.raises(ValueError, match=f"does not match {order.n_functions} aims functions"):
        from_aims(np.zeros(order.n_functions + 1), order)


def test_bad_labels_are_named(water, water_basis, labelled):
    symbols = water.get_chemical_symbols()
    _, labels = labelled
    positions = np.arange(len(labels))
    duplicated = list(labels)
    duplicated[1] = duplicated[0]
    with pytest.raises(ValueError, match=r"function 1: .* appears twice"):
        aims_order(positions, duplicated, water_basis, symbols)
    unknown = list(labels)
    unknown[2] = (0, 99, 0, 0)
    with pytest.raises(ValueError, match=r"function 2: .*\(0, 99, 0, 0\) is not in the basis"):
        aims_order(positions, unknown, water_basis, symbols)
    with pytest.raises(ValueError, match="file position .* appears twice"):
        aims_order(np.zeros(len(labels), dtype=int), labels, water_basis, symbols)


def test_indexed_order_equals_the_labelled_one(labelled, water, water_basis):
    """idx_prodbas.out (file position of each canonical function) with the list of sign
    changes gives the same conversion as the per-function labels."""
    order, _ = labelled
    symbols = water.get_chemical_symbols()
    file_positions = np.argsort(order.canonical_index)  # of canonical function k
    flipped = np.flatnonzero(order.sign < 0)
    indexed = indexed_order(file_positions, flipped, water_basis, symbols)
    assert np.array_equal(indexed.canonical_index, order.canonical_index)
    assert np.array_equal(indexed.sign, order.sign)
    with pytest.raises(ValueError, match=r"is listed for a sign change, but aims changes"):
        indexed_order(file_positions, np.append(flipped, np.flatnonzero(order.sign > 0)[0]),
                      water_basis, symbols)
    repeated = file_positions.copy()
    repeated[1] = repeated[0]
    with pytest.raises(ValueError, match=r"not a permutation of 1\.\.\d+ \(1-based\)"):
        indexed_order(repeated, flipped, water_basis, symbols)


def test_version_decides_the_conversion():
    assert converts(221103) and converts(240402)
    assert not converts(240403) and not converts(240925) and CANONICAL_FROM_VERSION == 240403
