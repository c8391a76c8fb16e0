"""Dataset folders as torch datasets: reading, lazy loading, batching, splitting, errors."""

import functools
import os
import shutil

import ase
import ase.build
import metatensor.torch as mts
import numpy as np
import pytest
import torch

from rholearn import data, layout
from rholearn.dataset import check_same_basis, read_dataset
from rholearn.basis import BasisSet
from rholearn.descriptors import LambdaSoap
from rhocalc.batch import run_batch
from rhocalc.pyscf import basis_set, compute_targets

from small_setup import HYPERS, OPTIONS

FAILED = 3  # OH radical without unpaired electron: PySCF refuses the spin


def structures():
    frames = [ase.build.molecule(name) for name in ("H2O", "NH3", "CH4", "OH", "H2O")]
    frames[-1].rattle(0.05, seed=1)
    return frames


@pytest.fixture(scope="module")
def basis():
    return basis_set(OPTIONS.auxbasis, ["H", "C", "N", "O"])


@pytest.fixture(scope="module")
def root(tmp_path_factory, basis):
    """A dataset folder computed by rhocalc (PySCF), with one failed structure."""
    root = str(tmp_path_factory.mktemp("dataset"))
    compute = functools.partial(compute_targets, options=OPTIONS)
    run_batch(structures(), root, compute, basis, progress=False)
    return root


@pytest.fixture
def folder(root):
    with pytest.warns(UserWarning, match=f"{FAILED}: HO, ValueError"):
        return read_dataset(root)


def test_read_dataset_skips_and_reports_failures(folder, basis):
    assert len(folder.frames) == 5
    assert folder.indices == [0, 1, 2, 4]
    assert list(folder.failures) == [FAILED]
    assert "spin 0" in folder.failures[FAILED]
    assert folder.basis == basis
    np.testing.assert_allclose(folder.frames[1].positions, ase.build.molecule("NH3").positions)


def test_empty_dataset_is_refused(tmp_path, basis):
    root = str(tmp_path / "all-failed")
    compute = functools.partial(compute_targets, options=OPTIONS)
    run_batch([ase.build.molecule("OH")], root, compute, basis, progress=False)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no completed structures in"):
        read_dataset(root)


def test_missing_dataset_files_are_named(tmp_path, root):
    with pytest.raises(FileNotFoundError, match="no such dataset folder"):
        read_dataset(str(tmp_path / "nothing"))
    copy = str(tmp_path / "copy")
    shutil.copytree(root, copy)
    os.remove(os.path.join(copy, layout.STRUCTURES_FILE))
    with pytest.raises(FileNotFoundError, match="copy/structures.xyz"):
        read_dataset(copy)


def test_basis_of_model_must_match_targets(root, basis):
    other = basis_set("def2-universal-jkfit", ["H", "C", "N", "O"])
    with pytest.raises(
        ValueError,
        match=r"basis.json' holds another auxiliary basis \('def2-universal-jfit'.*the model's "
        r"\('def2-universal-jkfit'",
    ):
        read_dataset(root, basis=other)
    fewer = BasisSet(basis.name, {s: basis.shells[s] for s in ("H", "O")})
    with pytest.raises(ValueError, match=r"elements \['H', 'C', 'N', 'O'\] instead of \['H', 'O'\]"):
        check_same_basis(fewer, basis, where="here")
    check_same_basis(basis, BasisSet.load(os.path.join(root, layout.BASIS_FILE)), "same")


def test_targets_are_read_lazily_on_access(tmp_path, root):
    copy = str(tmp_path / "copy")
    shutil.copytree(root, copy)
    with pytest.warns(UserWarning):
        folder = read_dataset(copy)
    dataset = data.make_dataset(folder, targets=["coefficients"])
    assert len(dataset) == 4
    # replace structure 1's file after the dataset was made: the new values are read
    path = os.path.join(copy, "1", layout.COEFFICIENTS_FILE)
    numbers = folder.frames[1].numbers
    vector = np.arange(folder.basis.n_functions(folder.frames[1].get_chemical_symbols()))
    layout.save(path, layout.vector_to_tensormap(vector, numbers, folder.basis, system=1))
    sample = dataset.get_sample(1)
    assert sample.sample_id == 1
    assert sample.frame.get_chemical_formula() == "H3N"
    np.testing.assert_array_equal(
        layout.tensormap_to_vector(sample.coefficients, numbers, folder.basis), vector
    )
    # and a file removed after the dataset was made is reported on access, by path
    os.remove(path)
    with pytest.raises(ValueError, match="'coefficients' for sample '1'") as error:
        dataset.get_sample(1)
    assert isinstance(error.value.__cause__, FileNotFoundError)
    assert f"copy/1/{layout.COEFFICIENTS_FILE}" in str(error.value.__cause__)


def test_dataset_fields_dtype_and_device(folder):
    dataset = data.make_dataset(folder, indices=[2], dtype=torch.float32)
    sample = dataset[0]
    assert sample._fields == ("sample_id", "frame", "coefficients", "projections", "overlap")
    for tensor in (sample.coefficients, sample.projections, sample.overlap):
        assert tensor.block(0).values.dtype == torch.float32
        assert tensor.device == torch.device("cpu")
    assert sample.overlap.keys.names == layout.PAIR_KEY_NAMES


def test_make_dataset_errors_name_structure_and_file(tmp_path, root, folder):
    with pytest.raises(ValueError, match=f"structure {FAILED} is not completed.*ValueError"):
        data.make_dataset(folder, indices=[0, FAILED])
    with pytest.raises(ValueError, match="unknown target 'density'"):
        data.make_dataset(folder, targets=["density"])

    copy = str(tmp_path / "copy")
    shutil.copytree(root, copy)
    os.remove(os.path.join(copy, "2", layout.OVERLAP_FILE))
    with pytest.warns(UserWarning):
        broken = read_dataset(copy)
    with pytest.raises(FileNotFoundError, match=f"copy/2/{layout.OVERLAP_FILE}"):
        data.make_dataset(broken)

    path = os.path.join(copy, "4", layout.PROJECTIONS_FILE)
    numbers = broken.frames[4].numbers
    vector = np.ones(broken.basis.n_functions(broken.frames[4].get_chemical_symbols()))
    vector[7] = np.nan
    layout.save(path, layout.vector_to_tensormap(vector, numbers, broken.basis, system=4))
    dataset = data.make_dataset(broken, indices=[0, 4], targets=["projections"])
    dataset.get_sample(0)
    with pytest.raises(ValueError, match="'projections' for sample '4'") as error:
        dataset.get_sample(4)
    assert f"structure 4: NaN or infinite values in '{path}'" in str(error.value.__cause__)

    vector[7] = 0.0
    layout.save(path, layout.vector_to_tensormap(vector, numbers, broken.basis, system=0))
    with pytest.raises(ValueError) as error:
        dataset.get_sample(4)
    assert f"structure 4: '{path}' holds samples of system(s) [0]" in str(error.value.__cause__)


def test_targets_lacking_atoms_or_pairs_are_named(tmp_path, root):
    """A coefficient file without an atom, an overlap with a pair in one order only:
    refused when read (the overlap would not be a metric)."""
    copy = str(tmp_path / "copy")
    shutil.copytree(root, copy)
    with pytest.warns(UserWarning):
        folder = read_dataset(copy)
    numbers = folder.frames[0].numbers  # H2O: O, H, H
    overlap_path = os.path.join(copy, "0", layout.OVERLAP_FILE)
    matrix = layout.pair_tensormap_to_matrix(mts.load(overlap_path), numbers, folder.basis)
    n_o = folder.basis.n_functions(["O"])
    n_h = folder.basis.n_functions(["H"])
    matrix[n_o : n_o + n_h, :n_o] = 0.0  # the (H 1, O 0) pair dropped, (O 0, H 1) kept
    layout.save(overlap_path, layout.matrix_to_pair_tensormap(matrix, numbers, folder.basis))
    coefficients_path = os.path.join(copy, "0", layout.COEFFICIENTS_FILE)
    vector = np.ones(n_o + n_h)
    layout.save(coefficients_path, layout.vector_to_tensormap(vector, numbers[:2], folder.basis))

    dataset = data.make_dataset(folder, indices=[0, 1])
    dataset.get_sample(1)
    with pytest.raises(ValueError, match="'coefficients' for sample '0'") as error:
        dataset.get_sample(0)
    assert (f"structure 0: '{coefficients_path}': block o3_lambda=0, center_type=1 holds atoms "
            "[1], the structure has [1, 2]") in str(error.value.__cause__)
    dataset = data.make_dataset(folder, indices=[0], targets=["overlap"])
    with pytest.raises(ValueError) as error:
        dataset.get_sample(0)
    assert (f"structure 0: '{overlap_path}' holds atom pair (0, 1) but not (1, 0): an "
            "incomplete overlap") in str(error.value.__cause__)


def test_split_files_are_checked_naming_the_index():
    assert data.check_split({"train": [3, 1], "test": None}, "s.json") == {
        "train": [1, 3], "val": [], "test": []}
    for split, message in [
        ([0, 1], "split 's.json' must map"),
        ({"train": [0], "validation": [1]}, "unknown subset 'validation'"),
        ({"train": "0, 1"}, "'train' must be a list"),
        ({"train": [0, True]}, "'train' holds True, not a structure index"),
        ({"train": [0, -1]}, "'train' holds -1"),
        ({"train": [0, "1"]}, "'train' holds '1'"),
        ({"train": [0], "val": [1, 1]}, "structure 1 is twice in 'val'"),
        ({"train": [0, 1], "val": [2], "test": [1]}, "structure 1 is in 'train' and in 'test'"),
    ]:
        with pytest.raises(ValueError, match=message):
            data.check_split(split, "s.json")


def test_collate_joins_structures_along_samples(folder, tmp_path):
    soap = LambdaSoap(HYPERS, atom_types=[1, 6, 7, 8], target_keys=folder.basis.keys())
    descriptors = soap.compute([folder.frames[i] for i in folder.indices], folder.indices)
    dataset = data.make_dataset(folder, descriptors=descriptors)
    loader = data.make_dataloader(dataset, batch_size=3)
    batch = next(iter(loader))

    assert batch.sample_id == (0, 1, 2)
    assert [f.get_chemical_formula() for f in batch.frame] == ["H2O", "H3N", "CH4"]
    # union of keys: the carbon block only holds methane's atom, hydrogen blocks all
    carbon = batch.coefficients.block({"o3_lambda": 0, "o3_sigma": 1, "center_type": 6})
    assert carbon.samples.values.tolist() == [[2, 0]]
    hydrogen = batch.descriptor.block({"o3_lambda": 1, "o3_sigma": 1, "center_type": 1})
    assert hydrogen.samples.values.tolist() == [[0, 1], [0, 2], [1, 1], [1, 2], [1, 3]] + [
        [2, i] for i in range(1, 5)
    ]
    # each structure's part of the joined batch is that structure's own data
    for index in batch.sample_id:
        selection = mts.Labels(["system"], torch.tensor([[index]], dtype=torch.int32))
        for name in ("coefficients", "overlap", "descriptor"):
            joined = getattr(batch, name)
            own = mts.drop_empty_blocks(mts.slice(joined, "samples", selection))
            alone = getattr(dataset.get_sample(index), name)
            assert mts.equal(mts.sort(own), mts.sort(alone)), (name, index)

    # descriptors computed lazily (from the calculator's cache) give the same batch
    lazy = data.make_dataset(
        folder,
        descriptors=data.StructureDescriptors(soap, folder.frames, cache_dir=str(tmp_path)),
        targets=[],
    )
    lazy_batch = next(iter(data.make_dataloader(lazy, batch_size=3)))
    assert mts.allclose(mts.sort(lazy_batch.descriptor), mts.sort(batch.descriptor), atol=1e-12)


def test_split_indices_is_reproducible_and_disjoint():
    indices = list(range(10, 30))
    train, val, test = data.split_indices(indices, n_train=12, n_val=4, seed=3)
    assert (len(train), len(val), len(test)) == (12, 4, 4)
    assert sorted(train + val + test) == indices
    assert (train, val, test) == data.split_indices(indices, n_train=12, n_val=4, seed=3)
    assert (train, val, test) != data.split_indices(indices, n_train=12, n_val=4, seed=4)
    assert train == sorted(train)

    by_fraction = data.split_indices(indices, fractions=(0.5, 0.25, 0.25), seed=3)
    assert [len(part) for part in by_fraction] == [10, 5, 5]
    assert data.split_indices(indices, n_train=2, n_val=1, n_test=1, seed=0)[2] != []
    with pytest.raises(ValueError, match="cannot split 20 structures into 15 train, 6"):
        data.split_indices(indices, n_train=15, n_val=6, seed=0)
    with pytest.raises(ValueError, match="either"):
        data.split_indices(indices, n_train=1, n_val=1, fractions=(0.5, 0.5, 0), seed=0)
