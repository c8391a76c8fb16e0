"""rhocalc's PySCF backend as rholearn finds it: through the entry point, named by a
dataset's settings.json, inferred for older datasets, picked from a basis."""

import json
import os

import ase.build
import numpy as np
import pytest

from rholearn import backends, layout
from rholearn.basis import BasisSet, Shell
from rholearn.dataset import SETTINGS_FILE
from rhocalc.pyscf import PySCFOptions, basis_set, compute_targets
from rhocalc.pyscf.backend import PySCFBackend

OPTIONS = PySCFOptions(xc="HF", basis="sto-3g", auxbasis="def2-universal-jfit", grid_level=0)
NUMERIC = BasisSet("aims-prodbas", {"H": [Shell(0), Shell(1)]})


@pytest.fixture(scope="module")
def basis():
    return basis_set(OPTIONS.auxbasis, ["H", "O"])


def _dataset(root, settings=None, options=None):
    """A dataset folder holding what backend selection reads: settings.json and/or
    one structure's info.json."""
    os.makedirs(os.path.join(root, "0"))
    if settings is not None:
        with open(os.path.join(root, SETTINGS_FILE), "w") as f:
            json.dump(settings, f)
    if options is not None:
        with open(os.path.join(root, "0", layout.INFO_FILE), "w") as f:
            json.dump({"options": options}, f)
    return str(root)


def test_entry_point_gives_the_pyscf_backend():
    assert "pyscf" in backends.installed_backends()
    backend = backends.load_backend("pyscf")
    assert isinstance(backend, PySCFBackend) and backend.name == "pyscf"


def test_settings_name_the_backend(tmp_path, basis):
    assert OPTIONS.dataset_settings()["backend"] == "pyscf"
    root = _dataset(tmp_path / "new", settings=OPTIONS.dataset_settings())
    assert isinstance(backends.dataset_backend(root, basis), PySCFBackend)


def test_old_datasets_without_backend_are_recognised(tmp_path, basis):
    settings = {k: v for k, v in OPTIONS.dataset_settings().items() if k != "backend"}
    root = _dataset(tmp_path / "settings", settings=settings)
    assert isinstance(backends.dataset_backend(root, basis), PySCFBackend)
    root = _dataset(tmp_path / "info-only", options=OPTIONS.to_dict())  # no settings.json
    assert isinstance(backends.dataset_backend(root, basis), PySCFBackend)


def test_unknown_or_unrecognised_backends_are_clear_errors(tmp_path, basis):
    root = _dataset(tmp_path / "aims", settings={"backend": "aims"})
    with pytest.raises(ValueError, match="no rholearn backend 'aims' is installed.*entry-point"):
        backends.dataset_backend(root, basis)
    root = _dataset(tmp_path / "numeric", options={"xc": "pbe", "species_dir": "x"})
    with pytest.raises(ValueError, match="does not name its backend.*'species_dir', 'xc'"):
        backends.dataset_backend(root, NUMERIC)
    # PySCF-like options with a numeric basis are not PySCF's
    root = _dataset(tmp_path / "numeric-pyscf-like", settings={"xc": "HF", "basis": "sto-3g",
                                                               "auxbasis": "aux"})
    with pytest.raises(ValueError, match="no installed backend"):
        backends.dataset_backend(root, NUMERIC)


def test_backend_is_picked_from_the_basis(basis):
    assert isinstance(backends.basis_backend(basis), PySCFBackend)
    with pytest.raises(ValueError, match="basis 'aims-prodbas' in real space.*install"):
        backends.basis_backend(NUMERIC)


def test_reference_density_and_fit_on_the_backend_grid(basis):
    """The SCF density integrates to the electron count, the fitted density is
    close to it, and the L1 error is 0 for equal and 100 for a zero density."""
    water = ase.build.molecule("H2O")
    backend = backends.load_backend("pyscf")
    points, weights = backend.integration_grid(water, 3)
    assert points.shape == (len(weights), 3) and (weights >= 0).all()
    rho_scf, n_electrons = backend.reference_density(water, OPTIONS.to_dict(), points, "water")
    assert n_electrons == 10
    targets = compute_targets(water, OPTIONS)
    rho_fit = backend.density_at_points(targets.coefficients, water, basis, points)
    assert backend.real_space_l1_percent(rho_scf, rho_scf, weights, n_electrons) == 0.0
    zero = np.zeros_like(rho_scf)
    assert backend.real_space_l1_percent(zero, rho_scf, weights, n_electrons) == pytest.approx(
        100, abs=1e-3
    )
    fit_error = backend.real_space_l1_percent(rho_fit, rho_scf, weights, n_electrons)
    assert 0 < fit_error < 5
    assert fit_error == pytest.approx(targets.info["fit_l1_error_percent"], rel=0.05)
