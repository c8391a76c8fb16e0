"""Parsing aims RI output of every aims version into the PySCF backend's TensorMaps.

The aims version in aims.out decides the conventions, never the file names.
"""

import os
import shutil

import metatensor
import numpy as np
import pytest
from pyscf.data.nist import BOHR

import aims_test_files
from rholearn import layout
from rhocalc.pyscf import realspace
from rhocalc.aims import outputs
from rhocalc.aims.aimsout import parse_aims_out
from rhocalc.aims.outputs import AimsOutputError, read_ri_run
from aims_test_files import OLD_LAYOUTS


@pytest.fixture(scope="module")
def canonical(molecule, molecule_basis, molecule_targets):
    """The molecule's PySCF coefficients, projections and overlap as dense canonical arrays."""
    numbers = molecule.numbers
    return (
        layout.tensormap_to_vector(molecule_targets.coefficients, numbers, molecule_basis),
        layout.tensormap_to_vector(molecule_targets.projections, numbers, molecule_basis),
        layout.pair_tensormap_to_matrix(molecule_targets.overlap, numbers, molecule_basis),
    )


def write_run(directory, layout_name, molecule, basis, canonical, triu=True, seed=0, **kwargs):
    """A run folder in one layout: "2024", or one of aims_test_files.OLD_LAYOUTS."""
    symbols = molecule.get_chemical_symbols()
    if layout_name == "2024":
        aims_test_files.write_2024_run(directory, symbols, basis, *canonical, triu=triu,
                                       **kwargs)
    else:
        aims_test_files.write_old_run(directory, layout_name, symbols, basis, *canonical,
                                      np.random.default_rng(seed), **kwargs)
    return str(directory)


LAYOUTS = [("2024", True), ("2024", False), ("221103", False), ("221103-index", False),
           ("2023-development", False)]


@pytest.mark.parametrize("layout_name, triu", LAYOUTS, ids=[
    "2024-upper-triangle", "2024-full-overlap", "221103-idx_prodbas_details",
    "221103-idx_prodbas", "2023-development-product_basis_idxs"])
def test_parsed_targets_equal_pyscf_ones(tmp_path, molecule, molecule_basis, molecule_targets,
                                         canonical, layout_name, triu):
    directory = write_run(tmp_path, layout_name, molecule, molecule_basis, canonical, triu)
    targets, basis = read_ri_run(directory, molecule, system=0)

    assert basis.n_radial("O") == molecule_basis.n_radial("O")
    assert basis.n_radial("H") == molecule_basis.n_radial("H")
    assert basis.name == "aims-prodbas"
    assert all(shell.exponents == () for shell in basis.shells["O"])
    metatensor.allclose_raise(targets.coefficients, molecule_targets.coefficients, rtol=1e-14)
    metatensor.allclose_raise(targets.projections, molecule_targets.projections, rtol=1e-14)
    metatensor.allclose_raise(targets.overlap, molecule_targets.overlap, rtol=1e-14, atol=1e-15)
    expected_version = "240926" if layout_name == "2024" else OLD_LAYOUTS[layout_name][0]
    assert targets.info["aims_version"] == expected_version
    assert targets.info["aims_version_from"] == "aims.out"
    expected_order = [] if layout_name == "2024" else list(OLD_LAYOUTS[layout_name][4])
    assert targets.info["aims_order"] == expected_order
    assert targets.info["n_aux_functions"] == len(canonical[0])


@pytest.mark.parametrize("layout_name", list(OLD_LAYOUTS))
def test_old_files_differ_from_canonical_before_conversion(tmp_path, molecule,
                                                           molecule_basis, canonical, layout_name):
    """The old test files really are permuted and signed, so the test above pins both."""
    directory = write_run(tmp_path, layout_name, molecule, molecule_basis, canonical)
    raw = np.loadtxt(os.path.join(directory, OLD_LAYOUTS[layout_name][1]))
    assert not np.allclose(raw, canonical[0])
    assert np.allclose(np.sort(np.abs(raw)), np.sort(np.abs(canonical[0])))
    assert not np.allclose(np.sort(raw), np.sort(canonical[0]), rtol=0, atol=1e-6)


# ------------------------------------------------ the version decides ---
def test_old_names_from_a_canonical_build_are_not_converted(tmp_path, molecule, molecule_basis,
                                                            molecule_targets, canonical):
    """A build >= 240403 writing the 2023 names (and a stale product_basis_idxs.out) is
    already canonical: applying the labels would convert twice."""
    directory = write_run(tmp_path / "old", "2023-development", molecule, molecule_basis,
                          canonical)
    labels = os.path.join(directory, "product_basis_idxs.out")
    directory = write_run(tmp_path / "new", "2024", molecule, molecule_basis, canonical,
                          version="240507", names=("ri_coeffs.out", "ri_projs.out"))
    shutil.copy(labels, directory)
    targets, _ = read_ri_run(directory, molecule)
    metatensor.allclose_raise(targets.coefficients, molecule_targets.coefficients, rtol=1e-14)
    metatensor.allclose_raise(targets.overlap, molecule_targets.overlap, rtol=1e-14, atol=1e-15)
    assert targets.info["aims_order"] == []


def test_version_boundary_is_240403(tmp_path, molecule, molecule_basis, molecule_targets,
                                    canonical):
    """The same internal-order files are converted when aims.out says 240402, and read as
    they are from 240403 on (aims then writes canonical files itself, SALTED's rule)."""
    directory = write_run(tmp_path, "221103", molecule, molecule_basis, canonical)
    for version, converted in (("240402", True), ("240403", False)):
        aims_test_files.write_aims_out(directory, version)
        targets, _ = read_ri_run(directory, molecule)
        same = metatensor.allclose(targets.coefficients, molecule_targets.coefficients,
                                   rtol=1e-14)
        assert same == converted, version


@pytest.mark.parametrize("layout_name", list(OLD_LAYOUTS))
def test_folder_without_aims_out_is_refused_or_read_with_the_given_version(
        tmp_path, molecule, molecule_basis, molecule_targets, canonical, layout_name):
    directory = write_run(tmp_path, layout_name, molecule, molecule_basis, canonical,
                          aims_out=False)
    with pytest.raises(AimsOutputError, match=r"aims.out' is missing, .* aims_version="):
        read_ri_run(directory, molecule)
    version = OLD_LAYOUTS[layout_name][0]
    targets, _ = read_ri_run(directory, molecule, aims_version=version)
    metatensor.allclose_raise(targets.coefficients, molecule_targets.coefficients, rtol=1e-14)
    metatensor.allclose_raise(targets.overlap, molecule_targets.overlap, rtol=1e-14, atol=1e-15)
    assert targets.info["aims_version_from"] == "aims_version argument"


def test_version_missing_unreadable_or_contradicted_is_an_error(tmp_path, molecule,
                                                                molecule_basis, canonical):
    directory = write_run(tmp_path, "2024", molecule, molecule_basis, canonical)
    with pytest.raises(AimsOutputError, match=r"aims_version='221103' given, but .*aims.out' "
                                              r"reports version 240926"):
        read_ri_run(directory, molecule, aims_version="221103")
    with open(os.path.join(directory, "aims.out"), "w") as f:
        f.write("  Have a nice day.\n")
    with pytest.raises(AimsOutputError, match=r"aims.out' prints no 'FHI-aims version'"):
        read_ri_run(directory, molecule)
    aims_test_files.write_aims_out(directory, "master")
    with pytest.raises(AimsOutputError, match=r"aims.out': cannot read the aims version 'master'"):
        read_ri_run(directory, molecule)


@pytest.mark.parametrize("layout_name, removed, missing", [
    ("221103", ["idx_prodbas_details.out", "prodbas_condon_shotley_list.out"],
     r"none of 'idx_prodbas_details.out', 'product_basis_idxs.out' or 'idx_prodbas.out' \+ "
     r"'prodbas_condon_shotley_list.out'"),
    ("221103-index", ["prodbas_condon_shotley_list.out"],
     r"has 'idx_prodbas.out' but no 'prodbas_condon_shotley_list.out'"),
    ("2023-development", ["product_basis_idxs.out"], r"none of 'idx_prodbas_details.out'"),
])
def test_old_folder_without_its_order_is_refused_naming_the_file(
        tmp_path, molecule, molecule_basis, canonical, layout_name, removed, missing):
    directory = write_run(tmp_path, layout_name, molecule, molecule_basis, canonical)
    for name in removed:
        os.remove(os.path.join(directory, name))
    with pytest.raises(AimsOutputError, match=missing):
        read_ri_run(directory, molecule)


def test_sign_list_contradicting_the_labels_is_an_error(tmp_path, molecule, molecule_basis,
                                                        canonical):
    for layout_name, match in (("221103", r"prodbas_condon_shotley_list.out' against "
                                          r".*idx_prodbas_details.out': file position \d+ "
                                          r"\(1-based\) is not listed"),
                               ("221103-index", r"idx_prodbas.out' with .* is not listed for "
                                                r"a sign change")):
        directory = write_run(tmp_path / layout_name, layout_name, molecule, molecule_basis,
                              canonical)
        path = os.path.join(directory, "prodbas_condon_shotley_list.out")
        _write_lines(path, _lines(path)[1:])
        with pytest.raises(AimsOutputError, match=match):
            read_ri_run(directory, molecule)


def test_index_file_not_a_permutation_is_an_error(tmp_path, molecule, molecule_basis, canonical):
    directory = write_run(tmp_path, "221103-index", molecule, molecule_basis, canonical)
    path = os.path.join(directory, "idx_prodbas.out")
    lines = _lines(path)
    lines[3] = lines[2]
    _write_lines(path, lines)
    with pytest.raises(AimsOutputError, match=r"idx_prodbas.out' .*not a permutation"):
        read_ri_run(directory, molecule)


def test_two_names_of_one_vector_must_agree(tmp_path, molecule, molecule_basis,
                                            molecule_targets, canonical):
    directory = write_run(tmp_path, "2024", molecule, molecule_basis, canonical)
    shutil.copy(os.path.join(directory, "ri_restart_coeffs.out"),
                os.path.join(directory, "ri_coeffs.out"))
    targets, _ = read_ri_run(directory, molecule)
    metatensor.allclose_raise(targets.coefficients, molecule_targets.coefficients, rtol=1e-14)
    aims_test_files.write_values(os.path.join(directory, "ri_coeffs.out"), 2 * canonical[0])
    with pytest.raises(AimsOutputError, match=r"both 'ri_restart_coeffs.out' and "
                                              r"'ri_coeffs.out' with different values"):
        read_ri_run(directory, molecule)


def test_basis_name_carries_the_product_basis_settings(tmp_path, molecule, molecule_basis,
                                                       canonical):
    directory = write_run(tmp_path, "2024", molecule, molecule_basis, canonical)
    with open(os.path.join(directory, "control.in"), "w") as f:
        f.write("xc pbe\ndefault_prodbas_acc 1e-05  # accuracy\ndefault_max_l_prodbas 4\n")
    _, basis = read_ri_run(directory, molecule)
    assert basis.name == "aims-prodbas(default_prodbas_acc=1e-05,default_max_l_prodbas=4)"


def test_orbital_resolved_files_are_read_with_their_suffix(tmp_path, molecule, molecule_basis,
                                                           molecule_targets, canonical):
    directory = write_run(tmp_path, "2023-development", molecule, molecule_basis, canonical)
    for name in ("ri_coeffs.out", "ri_projs.out"):
        os.rename(os.path.join(directory, name),
                  os.path.join(directory, name.replace(".out", "_0003.out")))
    with pytest.raises(AimsOutputError,
                       match="missing aims output file: .* no RI coefficients .*ri_coeffs.out"):
        read_ri_run(directory, molecule)
    targets, _ = read_ri_run(directory, molecule, orbital=3)
    metatensor.allclose_raise(targets.coefficients, molecule_targets.coefficients, rtol=1e-14)
    assert targets.info["orbital"] == 3


def test_fit_error_from_grid_files_matches_pyscf(tmp_path, molecule, molecule_basis, molecule_scf,
                                                 molecule_targets, canonical):
    """aims' grid files (atomic units) written from PySCF densities, each in its own point
    order, give PySCF's own L1 fit error, relative to the electron count of aims.out;
    without it, to the grid integral. The older file names give the same."""
    directory = write_run(tmp_path, "2024", molecule, molecule_basis, canonical)
    points, weights = realspace.integration_grid(molecule, level=3)  # Angstrom, Angstrom^3
    aims_test_files.write_grid_files(directory, points / BOHR, {
        "rho_scf.out": realspace.scf_density_at_points(molecule_scf, points),
        "rho_rebuilt_ri.out": realspace.density_at_points(canonical[0], molecule, molecule_basis,
                                                          points),
        "partition_tab.out": weights / BOHR**3,
    }, rng=np.random.default_rng(5))
    reference = molecule_targets.info
    grid_relative = reference["fit_l1_error_percent"] * 10 / reference["n_electrons_scf_grid"]
    for old_names in (False, True):
        if old_names:
            os.rename(os.path.join(directory, "rho_scf.out"),
                      os.path.join(directory, "rho_ref.out"))
            os.rename(os.path.join(directory, "rho_rebuilt_ri.out"),
                      os.path.join(directory, "rho_ri.out"))
        info = read_ri_run(directory, molecule)[0].info
        for name in ("n_electrons_scf_grid", "n_electrons_fitted_grid"):
            assert info[name] == pytest.approx(reference[name], rel=1e-10)
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
    moved = points.copy()
    moved[7] += 0.1
    aims_test_files.write_grid_files(directory, moved, {"partition_tab.out": np.ones(20)})
    with pytest.raises(AimsOutputError, match=r"partition_tab.out' is on other grid points .*"
                                              r"its point .* is not on it"):
        read_ri_run(directory, molecule)
    aims_test_files.write_grid_files(directory, points[:-1], {"partition_tab.out": np.ones(19)})
    with pytest.raises(AimsOutputError, match=r"partition_tab.out' .* \(19 and 20 points\)"):
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
    directory = write_run(tmp_path, "2023-development", molecule, molecule_basis, canonical)
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
    directory = write_run(tmp_path, "2023-development", molecule, molecule_basis, canonical)
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
