"""Parsing aims RI output, both file generations, into the PySCF backend's TensorMaps."""

import os

import metatensor
import numpy as np
import pytest
from pyscf.data.nist import BOHR

import aims_test_files
from rholearn import layout
from rhocalc import realspace
from rhocalc.aims import outputs
from rhocalc.aims.aimsout import parse_aims_out
from rhocalc.aims.outputs import AimsOutputError, read_ri_run


@pytest.fixture(scope="module")
def canonical(molecule, molecule_basis, molecule_targets):
    """The molecule's PySCF coefficients, projections and overlap as dense canonical arrays."""
    numbers = molecule.numbers
    return (
        layout.tensormap_to_vector(molecule_targets.coefficients, numbers, molecule_basis),
        layout.tensormap_to_vector(molecule_targets.projections, numbers, molecule_basis),
        layout.pair_tensormap_to_matrix(molecule_targets.overlap, numbers, molecule_basis),
    )


def write_run(directory, generation, molecule, basis, canonical, triu=True, seed=0):
    symbols = molecule.get_chemical_symbols()
    if generation == "2024":
        aims_test_files.write_2024_run(directory, symbols, basis, *canonical, triu=triu)
    else:
        aims_test_files.write_2022_run(
            directory, symbols, basis, *canonical, np.random.default_rng(seed)
        )
    return str(directory)


@pytest.mark.parametrize(
    "generation, triu", [("2024", True), ("2024", False), ("2022", False)],
    ids=["2024-upper-triangle", "2024-full-overlap", "2022-internal-order"],
)
def test_parsed_targets_equal_pyscf_ones(tmp_path, molecule, molecule_basis, molecule_targets,
                                         canonical, generation, triu):
    directory = write_run(tmp_path, generation, molecule, molecule_basis, canonical, triu)
    targets, basis = read_ri_run(directory, molecule, system=0)

    assert basis.n_radial("O") == molecule_basis.n_radial("O")
    assert basis.n_radial("H") == molecule_basis.n_radial("H")
    assert basis.name == "aims-prodbas"
    assert all(shell.exponents == () for shell in basis.shells["O"])
    metatensor.allclose_raise(targets.coefficients, molecule_targets.coefficients, rtol=1e-14)
    metatensor.allclose_raise(targets.projections, molecule_targets.projections, rtol=1e-14)
    metatensor.allclose_raise(targets.overlap, molecule_targets.overlap, rtol=1e-14, atol=1e-16)
    assert targets.info["aims_files"] == generation
    assert targets.info["n_aux_functions"] == len(canonical[0])


def test_2022_files_differ_from_canonical_before_conversion(tmp_path, molecule,
                                                            molecule_basis, canonical):
    """The 2022 test files really are permuted and signed, so the test above pins both."""
    directory = write_run(tmp_path, "2022", molecule, molecule_basis, canonical)
    raw = np.loadtxt(os.path.join(directory, "ri_coeffs.out"))
    assert not np.allclose(raw, canonical[0])
    assert np.allclose(np.sort(np.abs(raw)), np.sort(np.abs(canonical[0])))
    assert not np.allclose(np.sort(raw), np.sort(canonical[0]), rtol=0, atol=1e-6)


def test_basis_name_carries_the_product_basis_settings(tmp_path, molecule, molecule_basis,
                                                       canonical):
    directory = write_run(tmp_path, "2024", molecule, molecule_basis, canonical)
    with open(os.path.join(directory, "control.in"), "w") as f:
        f.write("xc pbe\ndefault_prodbas_acc 1e-05  # accuracy\ndefault_max_l_prodbas 4\n")
    _, basis = read_ri_run(directory, molecule)
    assert basis.name == "aims-prodbas(default_prodbas_acc=1e-05,default_max_l_prodbas=4)"


def test_orbital_resolved_files_are_read_with_their_suffix(tmp_path, molecule, molecule_basis,
                                                           molecule_targets, canonical):
    directory = write_run(tmp_path, "2022", molecule, molecule_basis, canonical)
    for name in ("ri_coeffs.out", "ri_projs.out"):
        os.rename(os.path.join(directory, name),
                  os.path.join(directory, name.replace(".out", "_0003.out")))
    with pytest.raises(AimsOutputError, match="missing aims output file .*ri_coeffs.out"):
        read_ri_run(directory, molecule)
    targets, _ = read_ri_run(directory, molecule, orbital=3)
    metatensor.allclose_raise(targets.coefficients, molecule_targets.coefficients, rtol=1e-14)
    assert targets.info["orbital"] == 3


def test_fit_error_from_grid_files_matches_pyscf(tmp_path, molecule, molecule_basis, molecule_scf,
                                                 molecule_targets, canonical):
    """aims' grid files (atomic units) written from PySCF densities give PySCF's own L1 fit
    error, relative to the electron count of aims.out; without it, to the grid integral."""
    directory = write_run(tmp_path, "2024", molecule, molecule_basis, canonical)
    points, weights = realspace.integration_grid(molecule, level=3)  # Angstrom, Angstrom^3
    aims_test_files.write_grid_files(directory, points / BOHR, {
        "rho_scf.out": realspace.scf_density_at_points(molecule_scf, points),
        "rho_rebuilt_ri.out": realspace.density_at_points(canonical[0], molecule, molecule_basis,
                                                          points),
        "partition_tab.out": weights / BOHR**3,
    })
    reference = molecule_targets.info
    info = read_ri_run(directory, molecule)[0].info
    for name in ("n_electrons_scf_grid", "n_electrons_fitted_grid"):
        assert info[name] == pytest.approx(reference[name], rel=1e-10)
    grid_relative = reference["fit_l1_error_percent"] * 10 / reference["n_electrons_scf_grid"]
    assert info["fit_l1_error_percent"] == pytest.approx(grid_relative, rel=1e-10)

    with open(os.path.join(directory, "aims.out"), "w") as f:
        f.write(AIMS_OUT)  # a total of 10.000 electrons
    info = read_ri_run(directory, molecule)[0].info
    # the grid integral is 1e-7 off 10 electrons: the tolerance tells them apart
    assert info["fit_l1_error_percent"] == pytest.approx(
        reference["fit_l1_error_percent"], rel=1e-10
    )
    # a fit of weighted orbital densities holds fewer electrons: the grid integral is used
    open(os.path.join(directory, "ks_orbital_weights.in"), "w").close()
    info = read_ri_run(directory, molecule)[0].info
    assert info["fit_l1_error_percent"] == pytest.approx(grid_relative, rel=1e-10)


def test_fit_error_on_mismatched_grids_is_an_error(tmp_path, molecule, molecule_basis, canonical):
    directory = write_run(tmp_path, "2024", molecule, molecule_basis, canonical)
    points = np.random.default_rng(0).normal(size=(20, 3))
    aims_test_files.write_grid_files(directory, points, {
        "rho_scf.out": np.ones(20), "rho_rebuilt_ri.out": np.ones(20)})
    aims_test_files.write_grid_files(directory, points + 0.1, {"partition_tab.out": np.ones(20)})
    with pytest.raises(AimsOutputError, match="partition_tab.out' is on other grid points"):
        read_ri_run(directory, molecule)


# ------------------------------------------------------------- bad files ---
def _lines(path):
    with open(path) as f:
        return f.readlines()


def _write_lines(path, lines):
    with open(path, "w") as f:
        f.writelines(lines)


def test_truncated_vector_names_file_and_counts(tmp_path, molecule, molecule_basis, canonical):
    directory = write_run(tmp_path, "2024", molecule, molecule_basis, canonical)
    path = os.path.join(directory, "ri_restart_coeffs.out")
    _write_lines(path, _lines(path)[:-5])
    n = len(canonical[0])
    with pytest.raises(AimsOutputError,
                       match=f"ri_restart_coeffs.out' holds {n - 5} values, .* {n} functions"):
        read_ri_run(directory, molecule)


def test_size_not_matching_basis_definition(tmp_path, molecule, molecule_basis, canonical):
    directory = write_run(tmp_path, "2024", molecule, molecule_basis, canonical)
    path = os.path.join(directory, "ri_projections.out")
    _write_lines(path, _lines(path) + ["1.0\n"])
    with pytest.raises(AimsOutputError, match="ri_projections.out' holds .* the basis definition"):
        read_ri_run(directory, molecule)
    directory = write_run(tmp_path / "ovlp", "2024", molecule, molecule_basis, canonical)
    path = os.path.join(directory, "ri_ovlp.out")
    _write_lines(path, _lines(path)[:-1])
    with pytest.raises(AimsOutputError, match=r"ri_ovlp.out' holds .* need .* \(upper triangle\)"):
        read_ri_run(directory, molecule)


def test_nan_entry_names_file_and_line(tmp_path, molecule, molecule_basis, canonical):
    directory = write_run(tmp_path, "2022", molecule, molecule_basis, canonical)
    path = os.path.join(directory, "ri_projs.out")
    lines = _lines(path)
    lines[6] = "NaN\n"
    _write_lines(path, lines)
    with pytest.raises(AimsOutputError, match=r"ri_projs.out', line 7: non-finite value"):
        read_ri_run(directory, molecule)


def test_unreadable_entry_names_file_and_line(tmp_path, molecule, molecule_basis, canonical):
    directory = write_run(tmp_path, "2024", molecule, molecule_basis, canonical)
    path = os.path.join(directory, "ri_ovlp.out")
    lines = _lines(path)
    lines[11] = "0.5 *****\n"
    _write_lines(path, lines)
    with pytest.raises(AimsOutputError, match=r"ri_ovlp.out', line 12: expected 1 number"):
        read_ri_run(directory, molecule)


def test_missing_file_is_named(tmp_path, molecule, molecule_basis, canonical):
    directory = write_run(tmp_path, "2024", molecule, molecule_basis, canonical)
    os.remove(os.path.join(directory, "ri_ovlp.out"))
    with pytest.raises(AimsOutputError, match="missing aims output file .*ri_ovlp.out"):
        read_ri_run(directory, molecule)
    os.remove(os.path.join(directory, "basis_info.out"))
    with pytest.raises(AimsOutputError, match="neither of 'basis_info.out'"):
        read_ri_run(directory, molecule)


def test_asymmetric_overlap_names_element_and_lines(tmp_path, molecule, molecule_basis, canonical):
    overlap = canonical[2].copy()
    overlap[3, 10] += 1e-3
    n = len(overlap)
    directory = write_run(tmp_path, "2024", molecule, molecule_basis,
                          (canonical[0], canonical[1], overlap), triu=False)
    with pytest.raises(
        AimsOutputError,
        match=rf"ri_ovlp.out': overlap matrix is not symmetric: S\[3,10\] .* S\[10,3\] .*"
              rf"lines {3 * n + 11} and {10 * n + 4}",
    ):
        read_ri_run(directory, molecule)


def test_bad_function_label_names_file_and_line(tmp_path, molecule, molecule_basis, canonical):
    directory = write_run(tmp_path, "2022", molecule, molecule_basis, canonical)
    path = os.path.join(directory, "product_basis_idxs.out")
    lines = _lines(path)
    lines[4] = lines[4].split()[0] + " 1 9 1 0\n"  # l = 9 is not in O's basis
    _write_lines(path, lines)
    with pytest.raises(AimsOutputError, match=r"product_basis_idxs.out', line 5: function"):
        read_ri_run(directory, molecule)


def test_truncated_basis_definition_is_named(tmp_path, molecule, molecule_basis, canonical):
    directory = write_run(tmp_path, "2024", molecule, molecule_basis, canonical)
    path = os.path.join(directory, "basis_info.out")
    _write_lines(path, _lines(path)[:-1])
    with pytest.raises(AimsOutputError, match="basis_info.out': block of atom 3 is not closed"):
        read_ri_run(directory, molecule)


def test_basis_definition_for_another_structure_is_named(tmp_path, molecule, molecule_basis,
                                                         canonical):
    directory = write_run(tmp_path, "2024", molecule, molecule_basis, canonical)
    with pytest.raises(AimsOutputError, match="atoms .* but the structure has 2 atoms"):
        read_ri_run(directory, molecule[:2])


def test_empty_file_is_named_empty(tmp_path):
    path = tmp_path / "rho_scf.out"
    path.write_text("\n  # no data\n")
    with pytest.raises(AimsOutputError, match=f"aims output file '{path}' is empty"):
        outputs.read_table(str(path), 4)


def test_fortran_numbers_without_exponent_letter_are_read(tmp_path):
    path = tmp_path / "values.out"
    path.write_text("  0.1234567890123456E+01\n  0.5000000000000000-100\n -1.0D-03\n")
    assert np.array_equal(outputs.read_table(str(path), 1)[:, 0], [1.234567890123456, 5e-101,
                                                                   -1e-3])


# --------------------------------------------------------------- aims.out ---
# Lines as FHI-aims prints them (format strings of its write statements); test data
AIMS_OUT = """\
          Invoking FHI-aims ...
          FHI-aims version      : 240926
          Commit number         : 3b3a8e1f2
  | Number of atoms                   :        3
  | Number of spin channels           :        1
  | Number of k-points                             :         1
  The structure contains        3 atoms,  and a total of         10.000 electrons.
  Species H: Using default value for prodbas_acc =   1.000000E-04.
  Species O: Using default value for prodbas_acc =   1.000000E-04.
  Product basis:
  | charge radius:    exact
  | field radius:     exact
  | Species   l  charge radius    field radius  multipol momen
  |    O      0        3.123 A        4.567 A      0.1234E+01 a.u.
  |    O      1        2.500 A        3.000 A      0.2000E+00 a.u.
  |    H      0        2.000 A        2.500 A      0.5000E+00 a.u.

  | Shrink_full_auxil_basis : there are totally                  113 partial auxiliary wave functions.
  | Change of total energy        : -0.1160E-05 eV
  Highest occupied state (VBM) at     -9.04639836 eV
  Lowest unoccupied state (CBM) at    -0.05213986 eV
  Overall HOMO-LUMO gap:      8.99425850 eV.
  | Chemical potential (Fermi level):    -9.07068018 eV
  | Change of total energy        : -0.1160E-11 eV
  Self-consistency cycle converged.
  | Total energy of the DFT / Hartree-Fock s.c.f. calculation      :         -2078.592149198 eV
  | Number of self-consistency cycles          :           21
  | Total time                                  :       28.746 s          28.901 s
          Have a nice day.
"""


def test_aims_out_summary(tmp_path):
    path = tmp_path / "aims.out"
    path.write_text(AIMS_OUT)
    summary = parse_aims_out(str(path))
    assert summary["version"] == "240926"
    assert summary["finished"] and summary["scf_converged"]
    assert summary["n_atoms"] == 3 and summary["n_electrons"] == 10.0
    assert summary["n_k_points"] == 1 and summary["n_scf_cycles"] == 21
    assert summary["total_energy_ev"] == -2078.592149198
    assert summary["total_energy_hartree"] == pytest.approx(-2078.592149198 / 27.211386, 1e-6)
    assert (summary["homo_ev"], summary["lumo_ev"]) == (-9.04639836, -0.05213986)
    assert summary["homo_lumo_gap_ev"] == 8.9942585
    assert summary["fermi_level_ev"] == -9.07068018
    assert summary["n_aux_functions"] == 113
    assert summary["time_total_s"] == {"cpu": 28.746, "wall": 28.901}
    assert summary["prodbas_acc"] == {"H": 1e-4, "O": 1e-4}
    assert summary["prodbas_radii"]["O"][1] == {
        "l": 1, "charge_radius": 2.5, "field_radius": 3.0, "multipole_moment": 0.2}
    assert [row["l"] for row in summary["prodbas_radii"]["H"]] == [0]


def test_unfinished_aims_out(tmp_path):
    path = tmp_path / "aims.out"
    path.write_text(AIMS_OUT.split("  Self-consistency")[0])
    summary = parse_aims_out(str(path))
    assert not summary["finished"] and not summary["scf_converged"]
    assert "total_energy_ev" not in summary
    with pytest.raises(FileNotFoundError, match="no aims output .*missing.out"):
        parse_aims_out(str(tmp_path / "missing.out"))
