"""PySCF's basis-function order <-> the canonical order, and aux basis sets."""

import ase.build
import numpy as np
import pytest
from pyscf import gto

from rholearn.basis import BasisSet, Shell
from rholearn.rotations import random_rotation, wigner_d_matrices
from rhocalc.pyscf import basis_set, order
from rhocalc.pyscf.basis import pyscf_basis
from rhocalc.pyscf.molecule import aux_molecule

MAX_L = 7


def test_round_trips_are_identity(water, water_basis):
    aux = aux_molecule(water, water_basis)
    vector = np.random.default_rng(0).normal(size=aux.nao)
    matrix = np.random.default_rng(1).normal(size=(aux.nao, aux.nao))
    to_canonical, to_pyscf = order.vector_to_canonical, order.vector_to_pyscf
    assert np.array_equal(to_pyscf(to_canonical(vector, aux), aux), vector)
    assert np.array_equal(to_canonical(to_pyscf(vector, aux), aux), vector)
    assert np.array_equal(
        order.matrix_to_pyscf(order.matrix_to_canonical(matrix, aux), aux), matrix
    )
    assert sorted(order.pyscf_to_canonical(aux)) == list(range(aux.nao))


def test_canonical_order_matches_basis_functions(water, water_basis):
    """Atom, l and (for p) m of every function agree with ``BasisSet.functions``."""
    aux = aux_molecule(water, water_basis)
    labels = [aux.ao_labels(fmt=False)[i] for i in order.pyscf_to_canonical(aux)]
    functions = water_basis.functions(water.get_chemical_symbols())
    assert len(labels) == len(functions)
    p_m = {"x": 1, "y": -1, "z": 0}
    for (atom, _, shell, component), (f_atom, l, _, m) in zip(labels, functions):
        assert atom == f_atom
        assert "spdfghi".index(shell[-1]) == l
        if l == 1:
            assert p_m[component] == m


@pytest.mark.parametrize("seed", [0, 1])
def test_pyscf_harmonics_rotate_with_featomic_wigner_d(seed):
    """Y(R^-1 r) = Y(r) D(R) for PySCF's functions in canonical order: pins m order
    and signs against rholearn.rotations (featomic convention) up to l = 7."""
    basis = BasisSet("test", {"H": [Shell(l, (0.3,), (1.0,)) for l in range(MAX_L + 1)]})
    aux = aux_molecule(ase.Atoms("H"), basis)
    rotation = random_rotation(seed)
    wigner_d = wigner_d_matrices(rotation, MAX_L)
    points = np.random.default_rng(seed).normal(size=(200, 3))
    index = order.pyscf_to_canonical(aux)
    values = aux.eval_gto("GTOval_sph", points)[:, index]
    rotated = aux.eval_gto("GTOval_sph", points @ rotation)[:, index]  # rows R^T r
    start = 0
    for l in range(MAX_L + 1):
        block = slice(start, start + 2 * l + 1)
        np.testing.assert_allclose(rotated[:, block], values[:, block] @ wigner_d[l], atol=1e-12)
        start += 2 * l + 1


def test_general_contractions_are_split_into_equivalent_shells():
    """cc-pVDZ has a general s contraction on O: the split BasisSet spans the same
    functions, in the same canonical order, as PySCF's own (contracted) molecule."""
    basis = basis_set("cc-pvdz", ["O"])
    library = gto.basis.load("cc-pvdz", "O")
    assert len(basis.shells["O"]) == sum(len(entry[1]) - 1 for entry in library)
    assert basis.n_radial("O") == {0: 3, 1: 2, 2: 1}
    atoms = ase.Atoms("O")
    split = aux_molecule(atoms, basis)
    contracted = gto.M(atom="O 0 0 0", basis="cc-pvdz", spin=0, verbose=0)
    assert max(contracted.bas_nctr(i) for i in range(contracted.nbas)) > 1
    np.testing.assert_allclose(
        order.matrix_to_canonical(split.intor("int1e_ovlp"), split),
        order.matrix_to_canonical(contracted.intor("int1e_ovlp"), contracted),
        atol=1e-12,
    )


def test_basis_set_json_round_trip(tmp_path, water_basis):
    path = str(tmp_path / "basis.json")
    water_basis.save(path)
    loaded = BasisSet.load(path)
    assert loaded == water_basis
    assert loaded.n_radial("O") == {0: 10, 1: 8, 2: 4, 3: 2, 4: 1}
    assert loaded.shells["O"][0].exponents[0] == pytest.approx(625.2829811)


def test_unknown_element_names_element_and_basis():
    with pytest.raises(KeyError, match=r"my-structure.*'Na'.*cc-pvdz-jkfit"):
        basis_set("cc-pvdz-jkfit", ["Na", "H"], where="my-structure")


def test_numeric_basis_cannot_go_to_pyscf():
    numeric = BasisSet("aims-like", {"H": [Shell(0)]})
    with pytest.raises(ValueError, match="numeric radial functions for 'H'"):
        pyscf_basis(numeric, ["H"])
