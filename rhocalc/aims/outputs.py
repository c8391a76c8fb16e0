"""Read the files of a finished FHI-aims RI-fitting run into rholearn targets.

Which files hold what, and whether their order and signs need converting, is
decided from the aims version in ``aims.out`` (:mod:`rhocalc.aims.runfiles`;
the conversion itself is :mod:`rhocalc.aims.order`). Vectors and the overlap
hold one value per line; the grid files four columns ``x y z value`` (the
weights file ``x y z weight``), matched point by point by their coordinates.

Spin-polarised runs are refused (one density per structure is stored), and so
is a periodic run whose overlap does not reproduce its projections (``S c = w``
holds for aims' overlap-metric fit only with the lattice-summed overlap, the
one the shared layout stores for the atoms of the cell).

Every error names the file at fault, and the line where there is one.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import ase
import numpy as np
from scipy.spatial import cKDTree

from rholearn import layout
from rholearn.basis import BasisSet, Shell
from rholearn.dataset import Targets

from .inputs import ORBITAL_WEIGHTS
from .order import AimsOrder, aims_order, check_flipped, from_aims, indexed_order
from .runfiles import BASIS, FLIPPED, INDEX, OVERLAP, PARTITION, AimsOutputError, RunFiles, run_files

BASIS_NAME = "aims-prodbas"
"""Name of the product basis; the settings of ``control.in`` are appended."""

GRID_TOLERANCE = 1e-6
"""Bohr: grid points of two grid files closer than this are the same point."""

PERIODIC_FIT_TOLERANCE = 1e-6
"""Largest ``max|S c - w| / max|w|`` accepted for a periodic run (see the module docstring)."""

# ------------------------------------------------------------ plain files ---
def read_table(path: str, n_columns: int) -> np.ndarray:
    """A whitespace-separated numeric file of ``n_columns`` finite values per line.

    Returns
    -------
    numpy.ndarray, shape (n_lines, n_columns)

    Raises
    ------
    AimsOutputError
        Naming the file, and the line holding a value that is not a finite
        number or the wrong number of columns; or if the file is missing or empty.
    """
    if not os.path.isfile(path):
        raise AimsOutputError(f"missing aims output file '{path}'")
    if next(_data_lines(path), None) is None:
        raise AimsOutputError(f"aims output file '{path}' is empty")
    try:
        table = np.loadtxt(path, ndmin=2, dtype=np.float64)
    except ValueError:
        try:  # Fortran drops the "E" of 3-digit exponents: 1.234567-100
            table = np.loadtxt(path, ndmin=2, dtype=np.float64, converters=_fortran_float)
        except ValueError:
            table = None  # find the line at fault below
    if table is None or table.shape[1] != n_columns:
        line, text = _first_bad_line(path, lambda tokens: len(tokens) == n_columns
                                     and all(_is_number(t) for t in tokens))
        raise AimsOutputError(
            f"'{path}', line {line}: expected {n_columns} number(s), got '{text}'"
        )
    bad_rows = np.flatnonzero(~np.isfinite(table).all(axis=1))
    if len(bad_rows):
        line, text = _data_line(path, bad_rows[0])
        raise AimsOutputError(f"'{path}', line {line}: non-finite value in '{text}'")
    return table


def read_vector(path: str, n_functions: int) -> np.ndarray:
    """A one-column file of ``n_functions`` values (coefficients, projections)."""
    vector = read_table(path, 1)[:, 0]
    if len(vector) != n_functions:
        raise AimsOutputError(
            f"'{path}' holds {len(vector)} values, but the basis definition has "
            f"{n_functions} functions (truncated file, or from another run?)"
        )
    return vector


def read_overlap(path: str, n_functions: int) -> np.ndarray:
    """The overlap matrix, from its upper triangle (row by row) or all ``N*N`` values.

    Returns
    -------
    numpy.ndarray, shape (n_functions, n_functions), symmetric

    Raises
    ------
    AimsOutputError
        If the number of values is neither ``N(N+1)/2`` nor ``N*N``, or a full
        matrix is not symmetric (naming the largest asymmetric element).
    """
    values = read_table(path, 1)[:, 0]
    n = n_functions
    if len(values) == n * (n + 1) // 2:
        matrix = np.zeros((n, n))
        rows, columns = np.triu_indices(n)
        matrix[rows, columns] = values
        matrix[columns, rows] = values
        return matrix
    if len(values) != n * n:
        raise AimsOutputError(
            f"'{path}' holds {len(values)} values; the {n} functions of the basis "
            f"definition need {n * (n + 1) // 2} (upper triangle) or {n * n} (full matrix)"
        )
    matrix = values.reshape(n, n)
    asymmetry = np.abs(matrix - matrix.T)
    scale = max(np.abs(matrix).max(), np.finfo(float).tiny)
    if asymmetry.max() > 1e-8 * scale:
        i, j = np.unravel_index(np.argmax(asymmetry), asymmetry.shape)
        raise AimsOutputError(
            f"'{path}': overlap matrix is not symmetric: S[{i},{j}] = {matrix[i, j]:.10g} "
            f"but S[{j},{i}] = {matrix[j, i]:.10g} (lines {i * n + j + 1} and {j * n + i + 1})"
        )
    return (matrix + matrix.T) / 2


def read_basis_definition(path: str, symbols: Sequence[str], name: str = BASIS_NAME) -> BasisSet:
    """The product basis from ``basis_info.out`` / ``product_basis_definition.out``.

    The file has one block per atom::

         atom           1
         For L =            0 there are           9 radial functions
         For L =            1 there are          10 radial functions
         For atom            1 max L =            1

    Parameters
    ----------
    path : str
    symbols : sequence of str
        Element symbols of the structure's atoms, in order.
    name : str
        Name of the returned basis.

    Returns
    -------
    BasisSet
        Numeric shells (no exponents) per element; atoms of one element must agree.
    """
    counts: Dict[int, Dict[int, int]] = {}  # atom (0-based) -> l -> n_radial
    atom = None  # the atom whose block is open
    with open(_existing(path)) as f:
        for number, line in enumerate(f, start=1):
            tokens = line.split()
            if not tokens:
                continue
            try:
                if tokens[0] == "atom":
                    atom = int(tokens[1]) - 1
                    counts[atom] = {}
                elif tokens[:3] == ["For", "L", "="] and atom is not None:
                    counts[atom][int(tokens[3])] = int(tokens[6])
                elif tokens[:2] == ["For", "atom"] and atom is not None:
                    max_l = int(tokens[6])
                else:
                    raise ValueError
            except (ValueError, IndexError):
                raise AimsOutputError(f"'{path}', line {number}: cannot read '{line.strip()}'")
            if tokens[0] == "For" and tokens[1] == "atom":  # the block's last line
                if sorted(counts[atom]) != list(range(max_l + 1)):
                    raise AimsOutputError(
                        f"'{path}', line {number}: atom {atom + 1} has max L = {max_l} "
                        f"but lists L = {sorted(counts[atom])}"
                    )
                atom = None
    if atom is not None:
        raise AimsOutputError(f"'{path}': block of atom {atom + 1} is not closed (truncated?)")
    if sorted(counts) != list(range(len(symbols))):
        raise AimsOutputError(
            f"'{path}' defines the basis of atoms {[a + 1 for a in sorted(counts)]}, "
            f"but the structure has {len(symbols)} atoms"
        )
    shells: Dict[str, List[Shell]] = {}
    for atom, symbol in enumerate(symbols):
        atom_shells = [Shell(l) for l, n in sorted(counts[atom].items()) for _ in range(n)]
        if shells.setdefault(symbol, atom_shells) != atom_shells:
            raise AimsOutputError(
                f"'{path}': atom {atom + 1} ({symbol}) has another basis than the first "
                f"{symbol} atom ({counts[atom]})"
            )
    return BasisSet(name=name, shells=shells)


def read_function_labels(path: str, basis: BasisSet, symbols: Sequence[str]) -> AimsOrder:
    """aims' internal order from ``idx_prodbas_details.out`` or ``product_basis_idxs.out``.

    Five integer columns per function, 1-based where they are indices: file
    position, atom, ``l``, radial index counted over all ``l`` of the atom
    (``l = 0`` first), ``m``. Written by aims before 240403 only.
    """
    table = read_integers(path, 5)
    functions = []
    for row, (_, atom, l, radial, m) in enumerate(table):
        try:
            if not 1 <= atom <= len(symbols):
                raise IndexError
            n_radial = basis.n_radial(symbols[atom - 1])
            first = sum(n_radial[k] for k in n_radial if k < l)  # radial index is cumulative
            if l not in n_radial or not 0 <= radial - 1 - first < n_radial[l]:
                raise IndexError
        except IndexError:
            line, text = _data_line(path, row)
            raise AimsOutputError(
                f"'{path}', line {line}: function '{text}' is not in the basis definition "
                f"(atom 1..{len(symbols)}, l and radial index of that atom's element)"
            )
        functions.append((atom - 1, l, radial - 1 - first, m))
    try:
        return aims_order(table[:, 0] - 1, functions, basis, symbols)
    except ValueError as error:
        raise AimsOutputError(f"'{path}': {error}") from error


def read_integers(path: str, n_columns: int) -> np.ndarray:
    """A file of integers, ``n_columns`` per line; shape (n_lines, n_columns)."""
    table = read_table(path, n_columns)
    if not np.array_equal(table, np.round(table)):
        row = int(np.flatnonzero((table != np.round(table)).any(axis=1))[0])
        line, text = _data_line(path, row)
        raise AimsOutputError(f"'{path}', line {line}: non-integer value in '{text}'")
    return table.astype(np.int64)


def read_index_order(
    index_path: str, flipped_path: str, basis: BasisSet, symbols: Sequence[str]
) -> AimsOrder:
    """aims' internal order from ``idx_prodbas.out`` and ``prodbas_condon_shotley_list.out``.

    ``idx_prodbas.out`` holds, for each function in canonical order, its
    1-based position in the RI files; the second file the 1-based positions
    whose sign differs (possibly none). Written by aims before 240403 only.
    """
    positions = read_integers(index_path, 1)[:, 0] - 1
    flipped = _read_optional_integers(flipped_path) - 1
    try:
        return indexed_order(positions, flipped, basis, symbols)
    except ValueError as error:
        raise AimsOutputError(f"'{index_path}' with '{flipped_path}': {error}") from error


def read_order(files: RunFiles, basis: BasisSet, symbols: Sequence[str]) -> AimsOrder:
    """How the RI files of a run map to canonical ones: the identity from aims 240403 on,
    else the order aims wrote (:func:`rhocalc.aims.runfiles.order_files`)."""
    if not files.order:
        return AimsOrder.identity(basis.n_functions(symbols))
    if files.order[0] == INDEX:
        return read_index_order(*(files.path(n) for n in files.order), basis, symbols)
    order = read_function_labels(files.path(files.order[0]), basis, symbols)
    if FLIPPED in files.order:  # aims' own list of sign changes must agree with the labels
        try:
            check_flipped(order, _read_optional_integers(files.path(FLIPPED)) - 1)
        except ValueError as error:
            raise AimsOutputError(
                f"'{files.path(FLIPPED)}' against '{files.path(files.order[0])}': {error}"
            ) from error
    return order


def read_grid_field(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """Points (shape (P, 3), Bohr) and values (shape (P,)) of an ``x y z value`` grid file."""
    table = read_table(path, 4)
    return table[:, :3], table[:, 3]


def matched_grid_values(paths: Sequence[str]) -> List[np.ndarray]:
    """The values of several grid files on the points of the first, matched by coordinates.

    aims need not write the points of its grid files in the same order; each
    point of a file is matched to the point of the first file within
    :data:`GRID_TOLERANCE` (as SALTED and lab-cosmo/rholearn sort the points
    by their coordinates instead of trusting the order).

    Returns
    -------
    list of numpy.ndarray, each of shape (P,)
        The values of each file, in the point order of ``paths[0]``.

    Raises
    ------
    AimsOutputError
        Naming the file whose points are not those of the first file.
    """
    points, values = read_grid_field(paths[0])
    if len(np.unique(points, axis=0)) != len(points):
        raise AimsOutputError(f"'{paths[0]}' lists a grid point twice")
    tree = cKDTree(points)
    matched = [values]
    for path in paths[1:]:
        other, other_values = read_grid_field(path)
        distance, index = tree.query(other, distance_upper_bound=GRID_TOLERANCE)
        unmatched = np.flatnonzero(~np.isfinite(distance))
        if len(other) != len(points) or len(unmatched) or len(np.unique(index)) != len(points):
            detail = (f"its point {other[unmatched[0]].tolist()} (Bohr) is not on it"
                      if len(unmatched) else f"{len(other)} and {len(points)} points")
            raise AimsOutputError(
                f"'{path}' is on other grid points than '{paths[0]}' ({detail})"
            )
        result = np.empty_like(values)
        result[index] = other_values
        matched.append(result)
    return matched


def fit_error(files: RunFiles, n_electrons: Optional[float] = None) -> Dict:
    """Real-space error of the RI fit on aims' integration grid.

    ``100 * sum_p w_p |rho_RI(p) - rho_SCF(p)| / N``: the absolute error
    integrated over space, in % of the electron count ``N``.

    Parameters
    ----------
    files : RunFiles
        The run's files (:func:`rhocalc.aims.runfiles.run_files`), naming its grid files.
    n_electrons : float, optional
        The exact electron count ``N`` of the fitted density (as the PySCF
        backend uses). Default: the grid integral ``sum_p w_p rho_SCF(p)``,
        for fields whose electron count aims does not print (orbital fits).

    Returns
    -------
    dict
        ``fit_l1_error_percent``, ``n_electrons_scf_grid`` and
        ``n_electrons_fitted_grid`` (both densities integrated on the grid), or
        an empty dict when aims did not write the grid files.
    """
    if files.rho_scf is None or files.rho_ri is None or not os.path.isfile(files.path(PARTITION)):
        return {}
    scf, ri, weights = matched_grid_values(
        [files.path(name) for name in (files.rho_scf, files.rho_ri, PARTITION)]
    )
    n_electrons_grid = float(weights @ scf)
    if n_electrons is None:
        n_electrons = n_electrons_grid
    return {
        "fit_l1_error_percent": float(100 * (weights @ np.abs(ri - scf)) / n_electrons),
        "n_electrons_scf_grid": n_electrons_grid,
        "n_electrons_fitted_grid": float(weights @ ri),
    }


# ---------------------------------------------------------- a whole run ---
def read_basis(directory: str, atoms: ase.Atoms) -> BasisSet:
    """The product basis of a finished RI run, named after its ``control.in`` settings.

    Read from ``basis_info.out`` or ``product_basis_definition.out`` (the same
    format, and no convention depends on the aims version); where both are
    present they must agree.
    """
    symbols = atoms.get_chemical_symbols()
    name = basis_name(os.path.join(directory, "control.in"))
    paths = [os.path.join(directory, n) for n in BASIS]
    present = [p for p in paths if os.path.isfile(p)]
    if not present:
        raise AimsOutputError(
            f"missing aims output file: '{directory}' holds neither of "
            f"{' or '.join(repr(n) for n in BASIS)}; is this a finished RI run?"
        )
    bases = [read_basis_definition(p, symbols, name=name) for p in present]
    if any(b.to_dict() != bases[0].to_dict() for b in bases[1:]):
        raise AimsOutputError(f"'{present[0]}' and '{present[1]}' define different bases")
    return bases[0]


def basis_name(control_path: str) -> str:
    """``aims-prodbas`` plus the product-basis keywords set in ``control.in`` (if readable)."""
    settings = []
    if os.path.isfile(control_path):
        with open(control_path) as f:
            for line in f:
                tokens = line.split("#")[0].split()
                if tokens and tokens[0] in ("default_prodbas_acc", "default_max_l_prodbas"):
                    settings.append(f"{tokens[0]}={' '.join(tokens[1:])}")
    return f"{BASIS_NAME}({','.join(settings)})" if settings else BASIS_NAME


def read_ri_run(
    directory: str,
    atoms: ase.Atoms,
    system: int = 0,
    orbital: Optional[int] = None,
    overlap_threshold: float = layout.OVERLAP_THRESHOLD,
    aims_version: Optional[str] = None,
) -> Tuple[Targets, BasisSet]:
    """Targets of one structure from a finished aims RI-fitting run.

    Parameters
    ----------
    directory : str
        The run folder (``aims.out``, ``control.in``, the RI output files).
    atoms : ase.Atoms
        The structure of the run (positions in Angstrom), atoms in aims' order.
    system : int
        ``system`` sample value of the TensorMaps (dataset index).
    orbital : int, optional
        Read the orbital-resolved files of this Kohn-Sham orbital (``_0001``)
        instead of the total-density files.
    overlap_threshold : float
        Atom pairs whose overlap block has no element above this are dropped.
    aims_version : str, optional
        The aims version (``"221103"``) of a folder without ``aims.out``; it
        decides the conventions (:mod:`rhocalc.aims.order`). Without it and
        without ``aims.out`` the folder is refused.

    Returns
    -------
    (Targets, BasisSet)
        Coefficients, projections and overlap in the shared layout, with
        ``info`` holding the ``aims.out`` summary (``ri_fit``, see
        :func:`rhocalc.aims.aimsout.parse_aims_out`), the aims version
        (``aims_version``), the files the order was read from (``aims_order``,
        empty from aims 240403 on), the real-space fit error (see
        :func:`fit_error`) and the cube files aims wrote; and the product basis.
        The fit error is relative to the electron count in ``aims.out`` when
        the total density is fitted, else to the grid integral of the fitted field.

    Raises
    ------
    AimsOutputError
        Naming the file at fault: unknown version, missing or inconsistent
        files, a spin-polarised run, a lattice other than ``atoms``', or a
        periodic overlap that does not reproduce the projections.
    """
    files = run_files(directory, orbital, aims_version)
    check_representable(files, atoms)
    symbols = atoms.get_chemical_symbols()
    basis = read_basis(directory, atoms)
    n = basis.n_functions(symbols)
    order = read_order(files, basis, symbols)
    coefficients = from_aims(_read_vector_files(files, files.coefficients, n), order)
    projections = from_aims(_read_vector_files(files, files.projections, n), order)
    overlap = from_aims(read_overlap(files.path(OVERLAP), n), order)
    if files.summary.get("lattice_vectors") is not None or atoms.pbc.any():
        check_lattice_summed(files, overlap, coefficients, projections)
    ri_fit = files.summary
    total_density = orbital is None and not os.path.isfile(files.path(ORBITAL_WEIGHTS))
    info = {
        "backend": "aims",
        "aims_version": files.version,
        "aims_version_from": files.version_from,
        "aims_order": list(files.order),
        "ri_run_dir": os.path.abspath(directory),
        "n_aux_functions": n,
        **fit_error(files, n_electrons=ri_fit.get("n_electrons") if total_density else None),
        "cube_files": sorted(os.path.basename(p) for p in glob.glob(files.path("*.cube"))),
    }
    if ri_fit:
        info["ri_fit"] = ri_fit
    if orbital is not None:
        info["orbital"] = orbital
    numbers = atoms.numbers
    targets = Targets(
        coefficients=layout.vector_to_tensormap(coefficients, numbers, basis, system),
        projections=layout.vector_to_tensormap(projections, numbers, basis, system),
        overlap=layout.matrix_to_pair_tensormap(overlap, numbers, basis, system,
                                                threshold=overlap_threshold),
        info=info,
    )
    return targets, basis


def check_representable(files: RunFiles, atoms: ase.Atoms) -> None:
    """Refuse runs the shared layout cannot hold: spin-polarised runs (one density
    per structure), and runs on another lattice or periodicity than ``atoms``.

    Raises
    ------
    AimsOutputError
        Naming ``aims.out`` and what it reports.
    """
    aims_out = files.path("aims.out")
    n_spin = files.summary.get("n_spin_channels", 1)
    if n_spin != 1:
        raise AimsOutputError(
            f"'{aims_out}' reports {n_spin} spin channels: spin-polarised RI files are not "
            "read (the targets hold one density per structure); run aims with spin none"
        )
    lattice = files.summary.get("lattice_vectors")
    if lattice is None:
        if files.summary and atoms.pbc.any():
            raise AimsOutputError(
                f"'{aims_out}' is a run without a unit cell, but the structure is periodic "
                f"(pbc={atoms.pbc.tolist()}): is it the structure of this run?"
            )
        return
    cell = np.asarray(atoms.cell[:])
    if not atoms.pbc.all() or not np.allclose(cell, lattice, rtol=0, atol=1e-5):
        raise AimsOutputError(
            f"'{aims_out}' is a periodic run with lattice vectors {lattice} (Angstrom), but "
            f"the structure has pbc={atoms.pbc.tolist()} and cell {cell.tolist()}"
        )


def check_lattice_summed(
    files: RunFiles, overlap: np.ndarray, coefficients: np.ndarray, projections: np.ndarray
) -> None:
    """Refuse a periodic run whose overlap does not reproduce its projections.

    aims fits in the overlap metric, so ``S c = w`` holds when ``S`` is the
    overlap summed over lattice translations of the second function, the
    matrix the shared layout stores for the cell's atoms; the overlap of the
    functions of one cell only, or a fit in another metric, does not, and
    cannot be represented or checked.

    Raises
    ------
    AimsOutputError
        Naming the overlap file and the relative residual.
    """
    scale = max(np.abs(projections).max(), np.finfo(float).tiny)
    residual = float(np.abs(overlap @ coefficients - projections).max() / scale)
    if residual > PERIODIC_FIT_TOLERANCE:
        raise AimsOutputError(
            f"'{files.path(OVERLAP)}' of a periodic run does not reproduce the "
            f"projections (max|S c - w| / max|w| = {residual:.2e} > "
            f"{PERIODIC_FIT_TOLERANCE:.0e}): it is not the lattice-summed overlap of an "
            "overlap-metric fit, which is what the targets store for periodic structures"
        )


# ------------------------------------------------------------- helpers ---
def _read_vector_files(files: RunFiles, names: Sequence[str], n_functions: int) -> np.ndarray:
    """The vector in ``names`` (one file, or several names that must hold the same values)."""
    vectors = [read_vector(files.path(name), n_functions) for name in names]
    for name, vector in zip(names[1:], vectors[1:]):
        if not np.allclose(vector, vectors[0], rtol=1e-12, atol=0):
            raise AimsOutputError(
                f"'{files.directory}' holds both '{names[0]}' and '{name}' with different "
                "values: which one the fit wrote is ambiguous; remove the other"
            )
    return vectors[0]


def _read_optional_integers(path: str) -> np.ndarray:
    """The integers of a one-column file that may hold none (shape (n,))."""
    if next(_data_lines(_existing(path)), None) is None:
        return np.zeros(0, dtype=np.int64)
    return read_integers(path, 1)[:, 0]


def _existing(path: str) -> str:
    if not os.path.isfile(path):
        raise AimsOutputError(f"missing aims output file '{path}'")
    return path


_EXPONENT_WITHOUT_E = re.compile(r"(?<=[0-9.])([-+]\d+)$")


def _fortran_float(text) -> float:
    """A number as Fortran writes it, also ``1.234567-100`` (an exponent without ``E``)."""
    text = text.decode() if isinstance(text, bytes) else text
    try:
        return float(text)
    except ValueError:
        return float(_EXPONENT_WITHOUT_E.sub(r"E\1", text.replace("D", "E")))


def _is_number(text: str) -> bool:
    try:
        _fortran_float(text)
    except ValueError:
        return False
    return True


def _data_lines(path: str):
    """``(line number, text)`` of the lines ``numpy.loadtxt`` reads (not blank, not ``#``)."""
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            text = line.split("#")[0].strip()
            if text:
                yield number, text


def _data_line(path: str, row: int) -> Tuple[int, str]:
    """Line number and text of data row ``row`` (0-based) of a file."""
    for index, (number, text) in enumerate(_data_lines(path)):
        if index == row:
            return number, text
    raise IndexError(row)


def _first_bad_line(path: str, is_good) -> Tuple[int, str]:
    for number, text in _data_lines(path):
        if not is_good(text.split()):
            return number, text
    return 0, ""

