"""compute_targets: fit quality, electron count, equivariance, files and errors."""

import pickle

import ase
import ase.build
import metatensor
import numpy as np
import pytest
import scipy.linalg
from pyscf import df
from pyscf.data.nist import BOHR

from rholearn import layout
from rholearn.rotations import random_rotation, rotate_blocks, wigner_d_matrices
from rhocalc.pyscf import PySCFOptions, SCFNotConverged, basis_set, compute_targets, fit, order
from rhocalc.pyscf.molecule import aux_molecule
from rhocalc.pyscf.overlap import overlap_bound, pair_cutoffs, pair_overlap, shell_envelopes
from rhocalc.pyscf.scf import total_density_matrix
from rholearn.dataset import Targets

# Hartree-Fock has no XC grid, so rotated molecules give the same density to
# the SCF tolerance
ROTATION_OPTIONS = PySCFOptions(xc="HF", conv_tol=1e-12)


def _vector(tensor, atoms, basis):
    return layout.tensormap_to_vector(tensor, atoms.numbers, basis)


def _matrix(tensor, atoms, basis):
    return layout.pair_tensormap_to_matrix(tensor, atoms.numbers, basis)


def test_unconstrained_fit_nearly_conserves_electrons(water_targets):
    info = water_targets.info
    assert info["n_electrons"] == 10
    assert info["n_electrons_fitted"] == pytest.approx(10, abs=1e-3)
    assert info["n_electrons_fitted"] != pytest.approx(10, abs=1e-8)
    assert info["n_electrons_fitted_grid"] == pytest.approx(info["n_electrons_fitted"], abs=1e-4)
    assert info["n_electrons_scf_grid"] == pytest.approx(10, abs=1e-4)


def test_constrained_fit_conserves_electrons_exactly(water, water_basis):
    targets = compute_targets(water, PySCFOptions(constrain_electrons=True))
    assert targets.info["n_electrons_fitted"] == pytest.approx(10, abs=1e-8)
    assert targets.info["n_electrons_fitted_grid"] == pytest.approx(10, abs=1e-4)
    # the same number from the coefficients and the functions' integrals
    aux = aux_molecule(water, water_basis)
    integrals = order.vector_to_canonical(fit.function_integrals(aux), aux)
    coefficients = _vector(targets.coefficients, water, water_basis)
    assert integrals @ coefficients == pytest.approx(10, abs=1e-8)


def test_fit_is_accurate_in_real_space(water_targets):
    assert 0 < water_targets.info["fit_l1_error_percent"] < 2
    assert 0 < water_targets.info["fit_l2_error_percent"] < 5


def test_grid_l2_error_matches_analytic_integrals(water, water_basis, water_scf, water_targets):
    """||rho - rho_fit||^2 = (rho|rho) - 2 (rho|fit) + (fit|fit) with exact integrals."""
    molecule, density_matrix = water_scf.mol, total_density_matrix(water_scf)
    aux = aux_molecule(water, water_basis)
    rho_rho = np.einsum(
        "ijkl,ij,kl->", molecule.intor("int4c1e", comp=1), density_matrix, density_matrix
    )
    rho_chi = np.einsum(
        "ijp,ij->p", df.incore.aux_e2(molecule, aux, intor="int3c1e"), density_matrix
    )
    c = order.vector_to_pyscf(_vector(water_targets.coefficients, water, water_basis), aux)
    error_squared = rho_rho - 2 * rho_chi @ c + c @ aux.intor("int1e_ovlp") @ c
    analytic = 100 * np.sqrt(error_squared / rho_rho)
    assert water_targets.info["fit_l2_error_percent"] == pytest.approx(analytic, rel=1e-2)


def test_projections_are_overlap_times_coefficients(water, water_basis, water_targets):
    overlap = _matrix(water_targets.overlap, water, water_basis)
    coefficients = _vector(water_targets.coefficients, water, water_basis)
    np.testing.assert_allclose(
        _vector(water_targets.projections, water, water_basis), overlap @ coefficients, atol=1e-14
    )
    assert np.allclose(overlap, overlap.T)
    assert np.allclose(np.diag(overlap), 1.0)  # normalised functions
    # water is small: every atom pair is kept
    assert len(water_targets.overlap.block(0).samples) > 0
    assert np.linalg.eigvalsh(overlap).min() > 0


def test_overlap_metric_fit_reproduces_exact_projections(water, water_basis, water_scf):
    """With the overlap metric (unconstrained), S c equals the exact projections
    (chi_P | rho_scf), and the L2 error is not larger than with the Coulomb metric."""
    targets = compute_targets(water, PySCFOptions(metric="overlap"))
    aux = aux_molecule(water, water_basis)
    exact = np.einsum(
        "ijp,ij->p",
        df.incore.aux_e2(water_scf.mol, aux, intor="int3c1e"),
        total_density_matrix(water_scf),
    )
    projections = _vector(targets.projections, water, water_basis)
    np.testing.assert_allclose(order.vector_to_pyscf(projections, aux), exact, atol=1e-7)
    assert targets.info["fit_l1_error_percent"] < 2


def _rotated(atoms, rotation):
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rotation.T  # r -> R r
    return rotated


def _block_diagonal_wigner_d(atoms, basis, rotation):
    wigner_d = wigner_d_matrices(rotation, basis.max_l)
    return scipy.linalg.block_diag(
        *(
            wigner_d[l]
            for symbol in atoms.get_chemical_symbols()
            for l, count in basis.n_radial(symbol).items()
            for _ in range(count)
        )
    )


@pytest.mark.parametrize("formula, seed", [("H2O", 0), ("NH3", 1)])
def test_targets_rotate_with_wigner_d(formula, seed):
    """Rotating the molecule rotates coefficients by D(R), the overlap by D S D^T."""
    atoms = ase.build.molecule(formula)
    rotation = random_rotation(seed)
    original = compute_targets(atoms, ROTATION_OPTIONS)
    rotated = compute_targets(_rotated(atoms, rotation), ROTATION_OPTIONS)
    expected = rotate_blocks(original.coefficients, rotation)
    assert metatensor.allclose(rotated.coefficients, expected, atol=1e-6, rtol=0)
    # the test must be able to fail: coefficients of l > 0 do change
    assert not metatensor.allclose(rotated.coefficients, original.coefficients, atol=1e-3)
    assert metatensor.allclose(
        rotated.projections, rotate_blocks(original.projections, rotation), atol=1e-6, rtol=0
    )
    basis = basis_set(ROTATION_OPTIONS.auxbasis, atoms.get_chemical_symbols())
    wigner_d = _block_diagonal_wigner_d(atoms, basis, rotation)
    np.testing.assert_allclose(
        _matrix(rotated.overlap, atoms, basis),
        wigner_d @ _matrix(original.overlap, atoms, basis) @ wigner_d.T,
        atol=1e-10,
    )


def test_write_read_round_trip(tmp_path, water_targets):
    folder = str(tmp_path / "0")
    water_targets.write(folder)
    loaded = Targets.read(folder)
    for name in ("coefficients", "projections", "overlap"):
        assert metatensor.equal(getattr(loaded, name), getattr(water_targets, name)), name
    assert loaded.info == water_targets.info


def test_system_index_is_the_sample(water):
    targets = compute_targets(water, PySCFOptions(xc="HF"), system=7)
    for tensor in (targets.coefficients, targets.projections, targets.overlap):
        for block in tensor.blocks():
            assert set(block.samples.column("system").tolist()) == {7}


@pytest.mark.parametrize(
    "atoms_info, n_electrons", [({"charge": -1}, 10), ({"spin": 1}, 9)]
)
def test_charge_and_spin_from_atoms_info(atoms_info, n_electrons):
    hydroxide = ase.Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]], info=atoms_info)
    targets = compute_targets(hydroxide, PySCFOptions(xc="HF"), name="hydroxide")
    info = targets.info
    assert info["n_electrons"] == n_electrons
    assert info["charge"] == atoms_info.get("charge", 0)
    assert info["spin"] == atoms_info.get("spin", 0)
    assert info["n_electrons_fitted"] == pytest.approx(n_electrons, abs=2e-3)
    assert info["n_electrons_scf_grid"] == pytest.approx(n_electrons, abs=1e-4)
    assert info["fit_l1_error_percent"] < 2


def test_impossible_spin_names_the_structure():
    water = ase.build.molecule("H2O")
    water.info["spin"] = 1
    with pytest.raises(ValueError, match="odd-water"):
        compute_targets(water, PySCFOptions(xc="HF"), name="odd-water")


def test_periodic_structure_is_refused_naming_it():
    crystal = ase.build.molecule("H2O", vacuum=3.0)
    crystal.pbc = True
    crystal.info["name"] = "water-in-a-box"
    with pytest.raises(ValueError, match="water-in-a-box: periodic structure"):
        compute_targets(crystal, PySCFOptions(xc="HF"))


def test_structures_are_named_by_their_info_name(water):
    named = water.copy()
    named.info["name"] = "water-17"
    with pytest.raises(SCFNotConverged, match="water-17"):
        compute_targets(named, PySCFOptions(xc="HF", max_cycle=1))


def test_unconverged_scf_names_structure_and_cycles(water):
    with pytest.raises(SCFNotConverged, match=r"my-water.*after 1 cycles"):
        compute_targets(water, PySCFOptions(xc="HF", max_cycle=1), name="my-water")


def test_element_missing_from_aux_basis_names_structure_element_basis():
    sodium_hydride = ase.Atoms("NaH", positions=[[0, 0, 0], [0, 0, 1.9]])
    with pytest.raises(KeyError, match=r"nah-1.*'Na'.*cc-pvdz-jkfit"):
        compute_targets(sodium_hydride, PySCFOptions(auxbasis="cc-pvdz-jkfit"), name="nah-1")


def test_element_missing_from_orbital_basis_names_structure_element_basis():
    hydrogen_iodide = ase.Atoms("HI", positions=[[0, 0, 0], [0, 0, 1.6]])
    with pytest.raises(KeyError, match=r"hi-1.*I.*6-31g"):
        compute_targets(hydrogen_iodide, PySCFOptions(basis="6-31g"), name="hi-1")


@pytest.mark.parametrize(
    "bad, option",
    [
        ({"metric": "L1"}, "metric"),
        ({"xc": "not-a-functional"}, "xc"),
        ({"basis": "not-a-basis"}, "basis"),
        ({"auxbasis": "not-a-basis"}, "auxbasis"),
        ({"max_cycle": 0}, "max_cycle"),
        ({"conv_tol": -1.0}, "conv_tol"),
        ({"overlap_threshold": -1.0}, "overlap_threshold"),
        ({"grid_level": 12}, "grid_level"),
    ],
)
def test_bad_options_are_rejected(bad, option):
    with pytest.raises(ValueError, match=f"PySCFOptions.{option}"):
        PySCFOptions(**bad)


def test_options_pickle_and_record():
    options = PySCFOptions(xc="B3LYP", metric="overlap", constrain_electrons=True)
    assert pickle.loads(pickle.dumps(options)) == options
    assert PySCFOptions(**options.to_dict()) == options


def test_projections_in_small_blocks_equal_one_block(monkeypatch, water, water_basis, water_scf):
    """Blocking the three-centre integrals over auxiliary shells changes nothing."""
    aux = aux_molecule(water, water_basis)
    density_matrix = total_density_matrix(water_scf)
    one_block = fit.density_projections(water_scf.mol, density_matrix, aux, "int3c2e")
    monkeypatch.setattr(fit, "_BLOCK_BYTES", 8 * 300 * 20)  # ~20 functions per block
    assert len(list(fit._aux_shell_blocks(aux, 300))) > 5
    blocked = fit.density_projections(water_scf.mol, density_matrix, aux, "int3c2e")
    np.testing.assert_allclose(blocked, one_block, rtol=1e-13, atol=1e-13)


def _dimer(formula, distance):
    """A molecule of ase's collection and a copy ``distance`` Angstrom away along x."""
    atoms = ase.build.molecule(formula)
    if distance:
        other = atoms.copy()
        other.translate([distance, 0.0, 0.0])
        atoms += other
    return atoms


@pytest.mark.parametrize(
    "formula, distance, threshold",
    [("H2O", 0, 1e-10), ("CH3CH2OH", 0, 1e-10), ("NH3", 9.5, 1e-10), ("H2O", 6.0, 1e-6),
     ("H2O", 6.0, 0.0)],
)
def test_pair_overlap_equals_the_dense_reference(formula, distance, threshold):
    """The sparse build keeps the pairs and values of the dense matrix split into pairs."""
    atoms = _dimer(formula, distance)
    basis = basis_set("def2-universal-jkfit", atoms.get_chemical_symbols())
    aux = aux_molecule(atoms, basis)
    dense = order.matrix_to_canonical(aux.intor("int1e_ovlp", hermi=1), aux)
    reference = layout.matrix_to_pair_tensormap(dense, atoms.numbers, basis, 4, threshold)
    coefficients = np.random.default_rng(0).standard_normal(len(dense))
    sparse, projections = pair_overlap(atoms, aux, basis, 4, threshold, coefficients)
    assert metatensor.equal_metadata(sparse, reference)  # same keys, pairs, order
    assert metatensor.allclose(sparse, reference, atol=1e-12, rtol=0)
    n_pairs = len({tuple(s) for b in reference.blocks() for s in b.samples.values.tolist()})
    if distance and threshold > 0:  # the test must be able to fail: pairs were dropped
        assert n_pairs < len(atoms) ** 2
    # the pairs beyond the cut-offs change S c by less than threshold * sum |c|
    error = np.abs(projections - dense @ coefficients).max()
    assert error <= max(threshold * np.abs(coefficients).sum(), 1e-12)
    assert pair_overlap(atoms, aux, basis, 4, threshold)[1] is None


@pytest.mark.parametrize("symbols", ["OO", "OH", "HH", "CN"])
def test_atoms_beyond_the_cutoff_overlap_below_the_threshold(symbols):
    """At and beyond the element pair's cut-off distance every |S| is below the
    threshold; the bound holds at shorter distances and is not loose by more than 10 %."""
    basis = basis_set("def2-universal-jkfit", list(symbols))
    threshold = layout.OVERLAP_THRESHOLD
    pair = ase.Atoms(symbols, positions=[[0, 0, 0], [0, 0, 1.0]])
    cutoff = pair_cutoffs(aux_molecule(pair, basis), threshold)[tuple(symbols)]
    direction = np.array([0.3, -0.4, 0.866]) / np.linalg.norm([0.3, -0.4, 0.866])
    largest = {}
    for factor in (0.6, 0.9, 1.0, 1.001, 1.2):
        pair.positions[1] = factor * cutoff * direction
        aux = aux_molecule(pair, basis)
        first = aux.aoslice_by_atom()[0][3]
        largest[factor] = np.abs(aux.intor("int1e_ovlp")[:first, first:]).max()
        bound = overlap_bound(
            shell_envelopes(aux, 0), shell_envelopes(aux, 1), factor * cutoff / BOHR
        )
        assert largest[factor] <= bound
    assert max(largest[1.0], largest[1.001], largest[1.2]) <= threshold
    assert largest[0.9] > threshold  # the cut-off is within 10 % of the true distance
