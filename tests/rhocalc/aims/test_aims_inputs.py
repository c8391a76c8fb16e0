"""control.in / geometry.in of each aims step, written through ase, and the rebuild vector."""

import os

import ase
import ase.build
import ase.io
import numpy as np
import pytest

import aims_test_files
from rholearn import layout
from rhocalc.aims import AimsOptions, write_inputs, write_ri_vector
from rhocalc.aims.inputs import ORBITAL_WEIGHTS, write_orbital_weights
from rhocalc.aims.order import aims_order, from_aims

OPTIONS = AimsOptions(species_dir=aims_test_files.SPECIES_DIR, max_l_prodbas=4)


def control_lines(directory):
    """``(keyword, value)`` of every non-comment line of control.in, in order."""
    lines = []
    with open(os.path.join(directory, "control.in")) as f:
        for line in f:
            tokens = line.split("#")[0].split(maxsplit=1)
            if tokens:
                lines.append((tokens[0], tokens[1].strip() if len(tokens) > 1 else ""))
    return lines


def keywords(directory):
    """The keywords before the first species block (``output`` may repeat: a list)."""
    result = {}
    for key, value in control_lines(directory):
        if key == "species":
            break
        result.setdefault(key, []).append(value)
    return {key: values[0] if len(values) == 1 else values for key, values in result.items()}


@pytest.fixture
def periodic():
    atoms = ase.build.molecule("H2O")
    atoms.center(vacuum=3.0)
    atoms.pbc = True
    return atoms


@pytest.mark.parametrize("kind", ["molecule", "periodic"])
def test_each_step_writes_its_keywords_and_species(tmp_path, kind, periodic):
    atoms = ase.build.molecule("H2O") if kind == "molecule" else periodic
    options = AimsOptions(
        species_dir=aims_test_files.SPECIES_DIR, max_l_prodbas=4,
        k_grid=(2, 2, 2) if kind == "periodic" else None,
    )
    found = {}
    for step in ("scf", "ri", "rebuild"):
        write_inputs(atoms, str(tmp_path / step), step, options)
        found[step] = keywords(tmp_path / step)
        lines = control_lines(tmp_path / step)
        assert [v for k, v in lines if k == "species"] == ["O", "H"]
        assert [v for k, v in lines if k == "nucleus"] == ["8", "1"]
        assert ("hydro", "3 d 7.6") in lines  # the O block's basis functions came along
        common = found[step]
        assert (common["xc"], common["relativistic"], common["spin"]) == (
            "pbe", "atomic_zora scalar", "none")
        assert float(common["charge"]) == 0
        assert (common.get("k_grid") == "2 2 2") == (kind == "periodic")

    assert found["scf"]["elsi_restart"] == "write 1000"
    assert "ri_skip_scf" not in found["scf"] and "ri_density_restart" not in found["scf"]
    ri = found["ri"]
    assert ri["elsi_restart"] == "read"
    assert ri["ri_density_restart"] == "write"
    for flag in ("ri_skip_scf", "ri_full_output", "ri_ovlp_write_triu"):
        assert ri[flag] == ".true."
    assert float(ri["default_prodbas_acc"]) == 1e-5 and ri["default_max_l_prodbas"] == "4"
    rebuild = found["rebuild"]
    assert rebuild["ri_density_restart"] == "read 0" and rebuild["ri_full_output"] == ".true."
    assert float(rebuild["default_prodbas_acc"]) == 1e-5
    assert rebuild["default_max_l_prodbas"] == "4"
    assert "elsi_restart" not in rebuild and "output" not in rebuild


def test_geometry_round_trips(tmp_path, periodic):
    molecule = ase.build.molecule("H2O")
    write_inputs(molecule, str(tmp_path / "molecule"), "scf", OPTIONS)
    write_inputs(periodic, str(tmp_path / "cell"), "scf", AimsOptions(
        species_dir=aims_test_files.SPECIES_DIR, k_grid=(1, 1, 1)))
    for atoms, folder in ((molecule, "molecule"), (periodic, "cell")):
        read = ase.io.read(tmp_path / folder / "geometry.in", format="aims")
        assert read.get_chemical_symbols() == atoms.get_chemical_symbols()
        assert np.allclose(read.positions, atoms.positions, atol=1e-12)
        assert np.array_equal(read.pbc, atoms.pbc)
        assert np.allclose(read.cell.array, atoms.cell.array, atol=1e-12)


def test_options_orbitals_cube_and_extra_keywords(tmp_path):
    atoms = ase.build.molecule("H2O")
    atoms.info["charge"] = 1
    options = AimsOptions(
        species_dir=aims_test_files.SPECIES_DIR, orbitals=(5, 5), cube=True,
        keywords={"sc_accuracy_rho": 1e-6, "xc": "pbe0"},
    )
    for step in ("scf", "ri", "rebuild"):
        write_inputs(atoms, str(tmp_path / step), step, options)
    scf, ri, rebuild = (keywords(tmp_path / step) for step in ("scf", "ri", "rebuild"))
    assert scf["ri_fit_write_orbital_info"] == ".true." and scf["output"] == "cube total_density"
    assert ri["ri_fit_field_from_kso_weights"] == ".true."
    assert rebuild["output"] == "cube total_density"
    assert "default_max_l_prodbas" not in ri  # aims' default when not set
    for found in (scf, ri, rebuild):
        assert float(found["charge"]) == 1 and found["xc"] == "pbe0"
        assert float(found["sc_accuracy_rho"]) == 1e-6


def test_missing_species_and_k_grid_are_clear_errors(tmp_path, monkeypatch, periodic):
    monkeypatch.delenv("AIMS_SPECIES_DIR", raising=False)
    water = ase.build.molecule("H2O")
    with pytest.raises(ValueError, match=r"no FHI-aims species defaults: .*\$AIMS_SPECIES_DIR"):
        write_inputs(water, str(tmp_path / "a"), "scf", AimsOptions())
    with pytest.raises(ValueError, match="species directory '/no/such/dir' does not exist"):
        write_inputs(water, str(tmp_path / "b"), "scf", AimsOptions(species_dir="/no/such/dir"))
    with pytest.raises(FileNotFoundError, match="no FHI-aims species file '07_N_default' for N"):
        write_inputs(ase.build.molecule("NH3"), str(tmp_path / "c"), "scf", OPTIONS)
    monkeypatch.setenv("AIMS_SPECIES_DIR", aims_test_files.SPECIES_DIR)
    write_inputs(water, str(tmp_path / "d"), "scf", AimsOptions())
    assert os.path.isfile(tmp_path / "d" / "control.in")
    with pytest.raises(ValueError, match="periodic: AimsOptions.k_grid"):
        write_inputs(periodic, str(tmp_path / "e"), "scf", OPTIONS)
    with pytest.raises(ValueError, match="unknown aims step 'relax'"):
        write_inputs(water, str(tmp_path / "f"), "relax", OPTIONS)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="k_grid must be 3 integers"):
        AimsOptions(k_grid=(2, 2))
    with pytest.raises(ValueError, match="orbitals must be"):
        AimsOptions(orbitals=(3, 2))
    with pytest.raises(ValueError, match="drop the redirection"):
        AimsOptions(command="aims.x > aims.out")


def test_ri_vector_is_written_in_aims_order(tmp_path, molecule, molecule_basis, molecule_targets):
    symbols = molecule.get_chemical_symbols()
    canonical = layout.tensormap_to_vector(
        molecule_targets.coefficients, molecule.numbers, molecule_basis)

    path = tmp_path / "ri_restart_coeffs.out"
    write_ri_vector(str(path), molecule_targets.coefficients, molecule, molecule_basis)
    assert np.array_equal(np.loadtxt(path), canonical)  # aims >= 240403: canonical

    labels = aims_test_files.aims_internal_labels(
        molecule_basis, symbols, np.random.default_rng(0))
    order = aims_order(np.arange(len(labels)), labels, molecule_basis, symbols)
    write_ri_vector(str(path), canonical, molecule, molecule_basis, order)
    written = np.loadtxt(path)
    assert not np.allclose(written, canonical)
    assert np.array_equal(from_aims(written, order), canonical)

    with pytest.raises(ValueError, match="contain NaN"):
        write_ri_vector(str(path), np.full_like(canonical, np.nan), molecule, molecule_basis)
    with pytest.raises(ValueError, match="does not match the .* functions"):
        write_ri_vector(str(path), canonical[:-1], molecule, molecule_basis)


def test_orbital_weights_select_the_state_window(tmp_path):
    # ks_orbital_info.out: orbital, state, spin, k-point, k weight, occupation, energy (eV)
    info = np.array([
        [1, 1, 1, 1, 0.5, 2.0, -20.0], [2, 2, 1, 1, 0.5, 2.0, -10.0],
        [3, 1, 1, 2, 0.5, 2.0, -19.0], [4, 2, 1, 2, 0.5, 2.0, -9.0],
        [5, 3, 1, 1, 0.5, 0.0, 1.0], [6, 3, 1, 2, 0.5, 0.0, 2.0],
    ])
    np.savetxt(tmp_path / "ks_orbital_info.out", info)
    write_orbital_weights(str(tmp_path), str(tmp_path / "ks_orbital_info.out"), (2, 3))
    assert np.array_equal(np.loadtxt(tmp_path / ORBITAL_WEIGHTS), [0, 0.5, 0, 0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="none in the requested window 7..8"):
        write_orbital_weights(str(tmp_path), str(tmp_path / "ks_orbital_info.out"), (7, 8))
    with pytest.raises(FileNotFoundError, match="ri_fit_write_orbital_info"):
        write_orbital_weights(str(tmp_path), str(tmp_path / "missing.out"), (1, 1))
