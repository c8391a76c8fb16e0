"""Sparse overlap products against dense numpy ones, on real PySCF overlaps."""

import numpy as np
import pytest
import metatensor.torch as mts
import torch

import overlap_systems as data
from rholearn.overlap import (
    SparseOverlap,
    SparseOverlapCache,
    align_samples,
    bilinear_form,
    overlap_matvec,
    per_system_dot,
    systems_of,
)


@pytest.fixture(scope="module")
def structures():
    return data.batch()


@pytest.fixture(scope="module")
def overlap(structures):
    return data.overlaps(structures)


def test_bilinear_form_matches_dense_in_any_sample_order(structures, overlap):
    a = data.coefficients(structures, data.random_vectors(structures, seed=0))
    b = data.coefficients(structures, data.random_vectors(structures, seed=1))
    systems, values = bilinear_form(
        data.shuffled(a, seed=2), data.shuffled(b, seed=3), data.shuffled(overlap, seed=4)
    )
    assert systems.tolist() == [s.system for s in structures]
    expected = [
        data.dense_vector(a, s) @ s.overlap @ data.dense_vector(b, s) for s in structures
    ]
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-12)


def test_blocks_with_different_pairs(structures, overlap):
    """A pair missing from one (o3_lambda_1, o3_lambda_2) block only counts as zero there."""
    blocks = []
    for key, block in overlap.items():
        keep = slice(None)
        if [int(key[name]) for name in overlap.keys.names] == [1, 1, 8, 1]:
            keep = slice(1, None)  # drop the first (O, H) pair of the p-p block
        samples = mts.Labels(block.samples.names, block.samples.values[keep])
        blocks.append(
            mts.TensorBlock(block.values[keep], samples, block.components, block.properties)
        )
    holed = mts.TensorMap(overlap.keys, blocks)
    a = data.coefficients(structures, data.random_vectors(structures, seed=17))
    _, values = bilinear_form(a, a, holed)
    matrices = [data.dense_matrix(holed, s) for s in structures]
    assert np.abs(matrices[0] - structures[0].overlap).max() > 1e-3  # the hole, in water
    expected = [
        data.dense_vector(a, s) @ matrix @ data.dense_vector(a, s)
        for s, matrix in zip(structures, matrices)
    ]
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-12)


def test_matvec_matches_dense(structures, overlap):
    a = data.shuffled(data.coefficients(structures, data.random_vectors(structures, seed=5)), 6)
    product = overlap_matvec(a, overlap)
    assert product.keys == a.keys
    for s in structures:
        np.testing.assert_allclose(
            data.dense_vector(product, s), s.overlap @ data.dense_vector(a, s), atol=1e-13
        )


def test_dense_systems_are_the_structures_overlaps(structures, overlap):
    """Each structure's dense matrix is its overlap, with rows where its coefficients are put."""
    a = data.shuffled(data.coefficients(structures, data.random_vectors(structures, seed=10)), 11)
    b = align_samples(data.coefficients(structures, data.random_vectors(structures, seed=12)), a)
    metric = SparseOverlap(data.shuffled(overlap, seed=13), a)
    dense = metric.dense_systems()
    assert [d.system for d in dense] == [s.system for s in structures]
    assert metric.system_sizes().tolist() == [len(s.overlap) for s in structures]
    values_a, values_b = [block.values for block in a.blocks()], [block.values for block in b.blocks()]
    for d, s in zip(dense, structures):
        np.testing.assert_allclose(np.linalg.eigvalsh(d.matrix.numpy()), np.linalg.eigvalsh(s.overlap),
                                   atol=1e-12)  # the same matrix, rows permuted
        expected = data.dense_vector(a, s) @ s.overlap @ data.dense_vector(b, s)
        assert float(d.vector(values_a) @ d.matrix @ d.vector(values_b)) == pytest.approx(expected, rel=1e-12)
        # extra trailing dimensions follow the rows: (r, 2) from two stacked vectors
        stacked = d.vector([torch.stack([x, y], dim=-1) for x, y in zip(values_a, values_b)])
        torch.testing.assert_close(stacked, torch.stack([d.vector(values_a), d.vector(values_b)], dim=-1))


def test_per_system_dot_is_the_euclidean_product(structures):
    a = data.coefficients(structures, data.random_vectors(structures, seed=7))
    b = data.shuffled(data.coefficients(structures, data.random_vectors(structures, seed=8)), 9)
    b = align_samples(b, a)
    values = per_system_dot(a, b, systems_of(a))
    expected = [data.dense_vector(a, s) @ data.dense_vector(b, s) for s in structures]
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-12)


def test_float32(structures, overlap):
    a = data.coefficients(structures, data.random_vectors(structures, seed=10))
    _, reference = bilinear_form(a, a, overlap)
    a_single = a.to(dtype=torch.float32)
    _, single = bilinear_form(a_single, a_single, overlap.to(dtype=torch.float32))
    assert single.dtype == torch.float32
    np.testing.assert_allclose(single.numpy(), reference.numpy(), rtol=1e-5)


def test_sparse_overlap_errors(structures, overlap):
    a = data.coefficients(structures, data.random_vectors(structures, seed=11))
    with pytest.raises(ValueError, match="float32 on cpu but the coefficients are torch.float64"):
        SparseOverlap(overlap.to(dtype=torch.float32), a)
    fewer = data.coefficients(structures[:2], data.random_vectors(structures[:2], seed=12))
    with pytest.raises(KeyError, match="has no coefficient block o3_lambda=0, center_type=6"):
        SparseOverlap(overlap, fewer)
    with pytest.raises(KeyError, match=r"no overlap blocks for system\(s\) \[7\]"):
        SparseOverlap(data.overlaps(structures[:2]), a)
    water_overlap = data.overlaps([data.structure("H2O", system=3)])
    water = data.coefficients([structures[0]], data.random_vectors([structures[0]], seed=0))
    with pytest.raises(ValueError, match="a must have the keys and samples of the layout"):
        SparseOverlap(water_overlap, water).quadratic(data.shuffled(water, seed=1))


def test_blocks_of_one_element_must_hold_the_same_atoms(structures, overlap):
    a = data.coefficients(structures, data.random_vectors(structures, seed=16))
    blocks = []
    for key, block in a.items():
        samples = block.samples.values.clone()
        if (int(key["o3_lambda"]), int(key["center_type"])) == (1, 8):
            samples[0, 1] = 7  # the oxygen of water is atom 0
        samples = mts.Labels(block.samples.names, samples)
        blocks.append(mts.TensorBlock(block.values, samples, block.components, block.properties))
    with pytest.raises(KeyError, match="blocks of center_type=8 hold different atoms"):
        SparseOverlap(overlap, mts.TensorMap(a.keys, blocks))


def test_missing_rows_name_the_overlap_key(structures):
    water = structures[0]
    coefficients = data.coefficients([water], data.random_vectors([water], seed=0))
    # a water dimer under the same system id: atoms 3 to 5 have no coefficients
    dimer = data.structure("H2O", system=water.system, spacing=6.0)
    with pytest.raises(
        KeyError,
        match="overlap blocks center_type_1=1, center_type_2=1 have atom pairs whose",
    ):
        SparseOverlap(data.overlaps([dimer]), coefficients)


def test_align_samples_errors(structures):
    a = data.coefficients(structures, data.random_vectors(structures, seed=13))
    dropped = mts.Labels(a.keys.names, torch.tensor([[2, 1, 8]], dtype=torch.int32))
    fewer = mts.drop_blocks(a, dropped)
    with pytest.raises(KeyError, match="no block for o3_lambda=2, o3_sigma=1, center_type=8"):
        align_samples(fewer, a, "b")
    with pytest.raises(KeyError, match=r"b has block\(s\) \[\(2, 1, 8\)\]"):
        align_samples(a, fewer, "b")
    moved = [data.structure(f, s.system + 1) for f, s in zip(["H2O", "NH3", "CH4"], structures)]
    b = data.coefficients(moved, data.random_vectors(moved, seed=15))
    with pytest.raises(
        KeyError,
        match="b: block o3_lambda=0, o3_sigma=1, center_type=1 lacks the sample system=3, atom=1",
    ):
        align_samples(b, a, "b")


def _scaled(tensor, factor):
    """The same metadata with values multiplied by ``factor`` (another geometry, say)."""
    blocks = [
        mts.TensorBlock(factor * b.values, b.samples, b.components, b.properties)
        for b in tensor.blocks()
    ]
    return mts.TensorMap(tensor.keys, blocks)


def test_cache_reuses_the_index_of_a_batch_met_again(structures, overlap):
    """Stored at the second meeting, reused afterwards, also for a copy of the batch
    (as read again from disk) and a prediction with a graph; results unchanged."""
    cache = SparseOverlapCache()
    a = data.coefficients(structures, data.random_vectors(structures, seed=0))
    expected = SparseOverlap(overlap, a).quadratic(a)
    first, second = cache.get(overlap, a), cache.get(overlap, a)
    assert (cache.hits, cache.misses, len(cache)) == (0, 2, 1)
    copy = data.overlaps(structures)  # new objects, same content
    prediction = mts.requires_grad(data.coefficients(structures, data.random_vectors(
        structures, seed=0)), True)
    third = cache.get(copy, prediction)
    assert third is second and first is not second
    assert (cache.hits, cache.misses) == (1, 2)
    torch.testing.assert_close(third.quadratic(prediction), expected, rtol=1e-13, atol=0)
    # the stored index holds no graph of the prediction it was built for
    assert not any(block.values.requires_grad for block in third.layout.blocks())
    assert cache.nbytes == third.nbytes > 0


def test_cache_tells_batches_apart(structures, overlap):
    """Other values with the same labels, other structures, or another sample
    order of the coefficients are other batches."""
    cache = SparseOverlapCache()
    a = data.coefficients(structures, data.random_vectors(structures, seed=0))
    for _ in range(2):
        cache.get(overlap, a)
    other = _scaled(overlap, 1.5)
    sparse = cache.get(other, a)
    assert cache.hits == 0
    np.testing.assert_allclose(
        sparse.quadratic(a).numpy(), 1.5 * SparseOverlap(overlap, a).quadratic(a).numpy(),
        rtol=1e-12,
    )
    shuffled = data.shuffled(a, seed=5)
    cache.get(overlap, shuffled)
    two = data.batch(("H2O", "NH3"))
    b = data.coefficients(two, data.random_vectors(two, seed=0))
    cache.get(data.overlaps(two), b)
    assert cache.hits == 0


def test_cache_of_shuffled_minibatches(structures):
    """Minibatches of changing composition (Adam) are built each time, stored only
    when met twice, and give the uncached results."""
    singles = [data.batch((f,), first=3 + 2 * i)[0] for i, f in enumerate(("H2O", "NH3", "CH4"))]
    cache = SparseOverlapCache()
    for epoch, order in enumerate([(0, 1), (2, 0), (1, 2), (0, 1)]):
        batch = [singles[i] for i in order]
        a = data.coefficients(batch, data.random_vectors(batch, seed=epoch))
        overlap = data.overlaps(batch)
        found = cache.get(overlap, a).quadratic(a)
        torch.testing.assert_close(found, SparseOverlap(overlap, a).quadratic(a))
    assert (cache.hits, cache.misses, len(cache)) == (0, 4, 1)  # (0, 1) met twice


def test_cache_memory_is_bounded(structures, overlap):
    a = data.coefficients(structures, data.random_vectors(structures, seed=0))
    size = SparseOverlap(overlap, a).nbytes
    cache = SparseOverlapCache(max_bytes=int(1.5 * size))
    for factor in (1.0, 2.0, 1.0, 2.0, 1.0):  # two batches, each met more than once
        cache.get(_scaled(overlap, factor), a)
    assert len(cache) == 1 and cache.nbytes == size <= cache.max_bytes
    disabled = SparseOverlapCache(max_bytes=0)
    for _ in range(3):
        disabled.get(overlap, a)
    assert (len(disabled), disabled.misses) == (0, 3)
    with pytest.raises(ValueError, match="max_bytes"):
        SparseOverlapCache(max_bytes=-1)


def test_cached_bilinear_form_and_matvec(structures, overlap):
    a = data.coefficients(structures, data.random_vectors(structures, seed=0))
    b = data.coefficients(structures, data.random_vectors(structures, seed=1))
    cache = SparseOverlapCache()
    for _ in range(3):
        systems, values = bilinear_form(a, b, overlap, cache=cache)
        product = overlap_matvec(a, overlap, cache=cache)
    assert cache.hits == 4
    torch.testing.assert_close(values, bilinear_form(a, b, overlap)[1], rtol=1e-14, atol=0)
    assert mts.allclose(product, overlap_matvec(a, overlap), rtol=1e-14, atol=0)
