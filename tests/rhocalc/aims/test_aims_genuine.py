"""Genuine FHI-aims output (``<repo>/../shared/aims/``): parsed numbers against aims' own.

The folder holds files written by real aims runs, with ``reference.json``
(values of the run) and a README naming their origin. The tests skip, saying
why, where the folder is absent. Nothing is written into it.
"""

import json
import os

import ase
import ase.io
import numpy as np
import pytest

from rholearn import layout
from rholearn.basis import BasisSet, Shell
from rhocalc.aims.outputs import AimsOutputError, read_ri_run
from rhocalc.pyscf import order
from rhocalc.pyscf.molecule import aux_molecule

REPOSITORY = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
METHANE = os.path.join(REPOSITORY, "..", "shared", "aims", "methane-240925")
"""A real aims 240925 RI fit of methane: no aims.out, the version is in reference.json."""

pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(METHANE, "reference.json")),
    reason=f"genuine aims output not found at {os.path.normpath(METHANE)} "
           "(the project's shared/ folder beside the repository)",
)


@pytest.fixture(scope="module")
def reference():
    with open(os.path.join(METHANE, "reference.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def methane():
    return ase.io.read(os.path.join(METHANE, "geometry.xyz"))


@pytest.fixture(scope="module")
def parsed(methane, reference):
    """Dense canonical coefficients, projections, overlap and the basis, as parsed."""
    targets, basis = read_ri_run(METHANE, methane, aims_version=reference["aims_version"],
                                 overlap_threshold=0)
    numbers = methane.numbers
    return (
        layout.tensormap_to_vector(targets.coefficients, numbers, basis),
        layout.tensormap_to_vector(targets.projections, numbers, basis),
        layout.pair_tensormap_to_matrix(targets.overlap, numbers, basis),
        basis,
        targets.info,
    )


def test_parsed_run_has_aims_numbers(parsed, reference):
    coefficients, projections, overlap, basis, info = parsed
    assert info["n_aux_functions"] == reference["n_aux_functions"] == len(coefficients)
    assert info["aims_version"] == "240925" and info["aims_order"] == []
    for symbol, counts in reference["radial_functions_per_l"].items():
        assert basis.n_radial(symbol) == dict(enumerate(counts))
    assert coefficients.sum() == pytest.approx(reference["coefficients_sum"], rel=1e-12)
    assert np.linalg.norm(coefficients) == pytest.approx(reference["coefficients_norm"], rel=1e-12)
    assert projections.sum() == pytest.approx(reference["projections_sum"], rel=1e-12)
    assert np.trace(overlap) == pytest.approx(reference["overlap_trace"], rel=1e-12)
    assert coefficients @ overlap @ coefficients == pytest.approx(reference["c_S_c"], rel=1e-12)
    assert coefficients @ projections == pytest.approx(reference["c_dot_w"], rel=1e-12)
    eigenvalues = np.linalg.eigvalsh(overlap)
    # the smallest of 798 eigenvalues, 1e-11 of the largest: a few digits only
    assert eigenvalues[0] == pytest.approx(reference["overlap_min_eigenvalue"], rel=1e-4)
    assert eigenvalues[-1] == pytest.approx(reference["overlap_max_eigenvalue"], rel=1e-12)


def test_overlap_metric_fit_is_reproduced(parsed, reference):
    """aims fitted in the overlap metric: S c is the projection vector, so the triangle
    was read row by row and both vectors are in the overlap's order and signs."""
    coefficients, projections, overlap, _, _ = parsed
    residual = np.abs(overlap @ coefficients - projections).max()
    assert residual <= 2 * reference["max_abs_S_c_minus_w"]


def real_harmonics(direction, max_l):
    """Real spherical harmonics of ``direction`` in the canonical (featomic) convention,
    per l (up to a factor per l), from PySCF's in canonical order."""
    basis = BasisSet("harmonics", {"H": [Shell(l, (0.5,), (1.0,)) for l in range(max_l + 1)]})
    aux = aux_molecule(ase.Atoms("H"), basis)
    values = aux.eval_gto("GTOval_sph", np.asarray(direction)[None, :])[0]
    values = values[order.pyscf_to_canonical(aux)]
    starts = np.cumsum([0] + [2 * l + 1 for l in range(max_l + 1)])
    return [values[starts[l]:starts[l + 1]] for l in range(max_l + 1)]


def harmonic_residuals(overlap, basis, methane, flip_odd_positive_m=False):
    """Per l: the relative residuals of each H s / C (l, n) overlap vector (over m) from
    the best multiple of the real harmonics of the C-H direction."""
    symbols = methane.get_chemical_symbols()
    functions = basis.functions(symbols)
    carbon = symbols.index("C")
    max_l = max(basis.n_radial("C"))
    residuals = {l: [] for l in range(1, max_l + 1)}
    for hydrogen in (i for i, s in enumerate(symbols) if s == "H"):
        direction = methane.positions[hydrogen] - methane.positions[carbon]
        harmonics = real_harmonics(direction / np.linalg.norm(direction), max_l)
        rows = [i for i, (a, l, _, _) in enumerate(functions) if a == hydrogen and l == 0]
        for l in residuals:
            y = harmonics[l].copy()
            if flip_odd_positive_m:
                y[l + 1::2] *= -1  # m = 1, 3, ... sit at l + m
            for n in range(basis.n_radial("C")[l]):
                columns = [functions.index((carbon, l, n, m)) for m in range(-l, l + 1)]
                for row in rows:
                    v = overlap[row, columns]
                    residuals[l].append(np.linalg.norm(v - (v @ y) / (y @ y) * y)
                                        / np.linalg.norm(v))
    return {l: np.median(r) for l, r in residuals.items()}


def test_h_s_c_overlaps_follow_the_real_harmonics_of_the_c_h_direction(parsed, methane):
    """An s function on H overlaps the C (l, m) functions as Y_lm of the C-H direction, in
    featomic's convention: the files are canonical in order and sign, for every l to 8.
    With aims' internal sign (an extra -1 on odd m > 0) they would not be."""
    _, _, overlap, basis, _ = parsed
    canonical = harmonic_residuals(overlap, basis, methane)
    assert sorted(canonical) == list(range(1, 9))
    for l, residual in canonical.items():
        assert residual < 1e-3, (l, residual)
    internal = harmonic_residuals(overlap, basis, methane, flip_odd_positive_m=True)
    for l, residual in internal.items():
        assert residual > 0.1, (l, residual)


def test_genuine_folder_needs_its_version(methane):
    """Without aims.out the version is not guessed; a version before 240403 asks for the
    files giving aims' internal order, which a 240925 run does not write."""
    with pytest.raises(AimsOutputError, match=r"aims.out' is missing, .* aims_version="):
        read_ri_run(METHANE, methane)
    with pytest.raises(AimsOutputError, match=r"\(aims 221103, before 240403\) .* none of "
                                              r"'idx_prodbas_details.out'"):
        read_ri_run(METHANE, methane, aims_version="221103")
