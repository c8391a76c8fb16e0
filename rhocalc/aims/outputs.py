"""Read the files of an FHI-aims RI-fitting run into rholearn targets.

FHI-aims has written two generations of file names; the generation is
detected from the basis-definition file present in the run folder:

=====================  ===============================  ==============================
                       2024 (aims >= 240926)            2022 (aims 221103)
=====================  ===============================  ==============================
coefficients           ``ri_restart_coeffs.out``        ``ri_coeffs.out``
projections            ``ri_projections.out``           ``ri_projs.out``
overlap                ``ri_ovlp.out``: N(N+1)/2        ``ri_ovlp.out``: N*N
                       values (upper triangle, row by
                       row, with ``ri_ovlp_write_triu``)
                       or N*N
basis definition       ``basis_info.out``               ``product_basis_definition.out``
function labels        (none: canonical order)          ``product_basis_idxs.out``
density on the grid    ``rho_scf.out``,                 ``rho_ref.out``, ``rho_ri.out``
                       ``rho_rebuilt_ri.out``
integration weights    ``partition_tab.out``            ``partition_tab.out``
=====================  ===============================  ==============================

Vectors and the overlap hold one value per line; the grid files four columns
``x y z value`` (the weights file ``x y z weight``). Fits of single Kohn-Sham
orbitals write the orbital-resolved files with a suffix, ``ri_coeffs_0001.out``
(``orbital=1``). Order and signs are converted in :mod:`rhocalc.aims.order`.

Every error names the file at fault, and the line where there is one.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import ase
import numpy as np

from rholearn import layout
from rholearn.basis import BasisSet, Shell
from rhocalc.targets import Targets

from . import aimsout
from .inputs import ORBITAL_WEIGHTS
from .order import AimsOrder, aims_order, from_aims

BASIS_NAME = "aims-prodbas"
"""Name of the product basis; the settings of ``control.in`` are appended."""


class AimsOutputError(ValueError):
    """An aims output file is missing, truncated, or inconsistent; the message names it."""


@dataclasses.dataclass(frozen=True)
class FileGeneration:
    """The file names of one generation of aims' RI output."""

    name: str
    aims_versions: str
    coefficients: str
    projections: str
    basis: str
    labels: Optional[str]
    rho_scf: str
    rho_ri: str
    overlap: str = "ri_ovlp.out"
    partition: str = "partition_tab.out"


AIMS_2024 = FileGeneration(
    name="2024", aims_versions=">= 240926", coefficients="ri_restart_coeffs.out",
    projections="ri_projections.out", basis="basis_info.out", labels=None,
    rho_scf="rho_scf.out", rho_ri="rho_rebuilt_ri.out",
)
AIMS_2022 = FileGeneration(
    name="2022", aims_versions="221103", coefficients="ri_coeffs.out",
    projections="ri_projs.out", basis="product_basis_definition.out",
    labels="product_basis_idxs.out", rho_scf="rho_ref.out", rho_ri="rho_ri.out",
)
GENERATIONS = (AIMS_2024, AIMS_2022)


def detect_generation(directory: str) -> FileGeneration:
    """The file generation of a finished RI run, from its basis-definition file."""
    found = [g for g in GENERATIONS if os.path.isfile(os.path.join(directory, g.basis))]
    if len(found) != 1:
        expected = " or ".join(f"'{g.basis}' (aims {g.aims_versions})" for g in GENERATIONS)
        state = "both" if found else "neither"
        raise AimsOutputError(
            f"'{directory}': cannot tell the aims output generation: {state} of {expected} "
            "found; is this a finished RI-fitting run with ri_full_output?"
        )
    return found[0]


def orbital_file(name: str, orbital: Optional[int]) -> str:
    """File name of an orbital-resolved output: ``ri_coeffs.out`` -> ``ri_coeffs_0001.out``."""
    if orbital is None:
        return name
    stem, extension = os.path.splitext(name)
    return f"{stem}_{orbital:04d}{extension}"


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
    """aims' internal order from ``product_basis_idxs.out`` (2022 files).

    Five integer columns per function, 1-based where they are indices: file
    position, atom, ``l``, radial index counted over all ``l`` of the atom
    (``l = 0`` first), ``m``.
    """
    table = read_table(path, 5)
    if not np.array_equal(table, np.round(table)):
        row = int(np.flatnonzero((table != np.round(table)).any(axis=1))[0])
        line, text = _data_line(path, row)
        raise AimsOutputError(f"'{path}', line {line}: non-integer label in '{text}'")
    table = table.astype(np.int64)
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


def read_grid_field(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """Points (shape (P, 3)) and values (shape (P,)) of an ``x y z value`` grid file."""
    table = read_table(path, 4)
    return table[:, :3], table[:, 3]


def fit_error(
    directory: str,
    generation: FileGeneration,
    orbital: Optional[int] = None,
    n_electrons: Optional[float] = None,
) -> Dict:
    """Real-space error of the RI fit on aims' integration grid.

    ``100 * sum_p w_p |rho_RI(p) - rho_SCF(p)| / N``: the absolute error
    integrated over space, in % of the electron count ``N``.

    Parameters
    ----------
    directory, generation, orbital
        As in :func:`read_ri_run`.
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
    names = [orbital_file(generation.rho_scf, orbital), orbital_file(generation.rho_ri, orbital),
             generation.partition]
    paths = [os.path.join(directory, name) for name in names]
    if not all(os.path.isfile(path) for path in paths):
        return {}
    (points, scf), (points_ri, ri), (points_w, weights) = (read_grid_field(p) for p in paths)
    for other, path in ((points_ri, paths[1]), (points_w, paths[2])):
        if other.shape != points.shape or not np.allclose(other, points, rtol=0, atol=1e-8):
            raise AimsOutputError(
                f"'{path}' is on other grid points than '{paths[0]}' "
                f"({len(other)} and {len(points)} points)"
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
    """The product basis of a finished RI run, named after its ``control.in`` settings."""
    generation = detect_generation(directory)
    return read_basis_definition(
        os.path.join(directory, generation.basis), atoms.get_chemical_symbols(),
        name=basis_name(os.path.join(directory, "control.in")),
    )


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

    Returns
    -------
    (Targets, BasisSet)
        Coefficients, projections and overlap in the shared layout, with
        ``info`` holding the ``aims.out`` summary (``ri_fit``, see
        :func:`rhocalc.aims.aimsout.parse_aims_out`), the file generation
        (``aims_files``), the real-space fit error (see :func:`fit_error`) and
        the cube files aims wrote; and the product basis. The fit error is
        relative to the electron count in ``aims.out`` when the total density
        is fitted, else to the grid integral of the fitted field.
    """
    generation = detect_generation(directory)
    symbols = atoms.get_chemical_symbols()
    basis = read_basis(directory, atoms)
    n = basis.n_functions(symbols)
    if generation.labels is None:
        order = AimsOrder.identity(n)
    else:
        order = read_function_labels(os.path.join(directory, generation.labels), basis, symbols)

    def path(name):
        return os.path.join(directory, name)

    coefficients = from_aims(read_vector(path(orbital_file(generation.coefficients, orbital)), n),
                             order)
    projections = from_aims(read_vector(path(orbital_file(generation.projections, orbital)), n),
                            order)
    overlap = from_aims(read_overlap(path(generation.overlap), n), order)
    ri_fit = aimsout.parse_aims_out(path("aims.out")) if os.path.isfile(path("aims.out")) else {}
    total_density = orbital is None and not os.path.isfile(path(ORBITAL_WEIGHTS))
    numbers = atoms.numbers
    info = {
        "backend": "aims",
        "aims_files": generation.name,
        "ri_run_dir": os.path.abspath(directory),
        "n_aux_functions": n,
        **fit_error(directory, generation, orbital,
                    n_electrons=ri_fit.get("n_electrons") if total_density else None),
        "cube_files": sorted(os.path.basename(p) for p in glob.glob(path("*.cube"))),
    }
    if ri_fit:
        info["ri_fit"] = ri_fit
    if orbital is not None:
        info["orbital"] = orbital
    targets = Targets(
        coefficients=layout.vector_to_tensormap(coefficients, numbers, basis, system),
        projections=layout.vector_to_tensormap(projections, numbers, basis, system),
        overlap=layout.matrix_to_pair_tensormap(overlap, numbers, basis, system,
                                                threshold=overlap_threshold),
        info=info,
    )
    return targets, basis


# ------------------------------------------------------------- helpers ---
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

