"""What rhocalc reads from FHI-aims' main output, ``aims.out``.

Lines are matched by the text aims prints (the same strings as in the
Fortran ``write`` statements); when a quantity is printed several times (one
per SCF cycle, or per geometry), the last value is kept. Energies stay in eV,
as aims prints them, with the total energy also in Hartree; radii in Angstrom.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Dict, List, Tuple

from ase.units import Hartree

_NUMBER = r"([-+]?[0-9.]+(?:[EeDd][-+]?\d+)?)"


def _float(text: str) -> float:
    """A Fortran real, possibly with a ``D`` exponent."""
    return float(text.replace("D", "E").replace("d", "e"))


# (key, pattern, converter): the first group of the last matching line
_SCALARS: List[Tuple[str, "re.Pattern", Callable[[str], Any]]] = [
    ("version", re.compile(r"FHI-aims version\s*:\s*(\S+)"), str),
    ("commit", re.compile(r"Commit number\s*:\s*(\S+)"), str),
    ("n_atoms", re.compile(r"\| Number of atoms\s*:\s*(\d+)"), int),
    ("n_electrons", re.compile(r"and a total of\s+" + _NUMBER + r"\s+electrons"), _float),
    ("n_spin_channels", re.compile(r"\| Number of spin channels\s*:\s*(\d+)"), int),
    ("n_k_points", re.compile(r"\| Number of k-points\s*:\s*(\d+)"), int),
    ("n_scf_cycles", re.compile(r"\| Number of self-consistency cycles\s*:\s*(\d+)"), int),
    (
        "total_energy_ev",
        re.compile(r"\| Total energy of the DFT / Hartree-Fock s\.c\.f\. calculation\s*:\s*"
                   + _NUMBER + r" eV"),
        _float,
    ),
    ("homo_ev", re.compile(r"Highest occupied state \(VBM\) at\s+" + _NUMBER + " eV"), _float),
    ("lumo_ev", re.compile(r"Lowest unoccupied state \(CBM\) at\s+" + _NUMBER + " eV"), _float),
    ("homo_lumo_gap_ev", re.compile(r"Overall HOMO-LUMO gap:\s+" + _NUMBER + " eV"), _float),
    (
        "fermi_level_ev",
        re.compile(r"\| Chemical potential \(Fermi level\):\s+" + _NUMBER + " eV"),
        _float,
    ),
    (
        "n_aux_functions",
        re.compile(r"there are totally\s+(\d+)\s+partial auxiliary wave functions"),
        int,
    ),
    (
        "ovlp_cutoff_radius",
        re.compile(r"Found cutoff radius for calculating ovlp matrix:\s*" + _NUMBER),
        _float,
    ),
]
_TOTAL_TIME = re.compile(r"\| Total time\s*:\s*" + _NUMBER + r" s\s+" + _NUMBER + " s")
_PRODBAS_ACC = re.compile(
    r"Species\s+(\S+?):\s+Using default value for prodbas_acc =\s*" + _NUMBER
)
_PRODBAS_RADIUS = re.compile(
    r"^\s*\|\s+([A-Z][a-z]?)\s+(\d+)\s+" + _NUMBER + r"\s+A\s+" + _NUMBER + r"\s+A\s+"
    + _NUMBER + r"\s+a\.u\."
)
SCF_CONVERGED = "Self-consistency cycle converged."
_FINISHED = "Have a nice day."


def aims_finished(path: str) -> bool:
    """Whether the ``aims.out`` at ``path`` exists and reports a normal end."""
    if not os.path.isfile(path):
        return False
    with open(path, errors="replace") as f:
        return _FINISHED in f.read()


def parse_aims_out(path: str) -> Dict[str, Any]:
    """The run summary of one ``aims.out`` as a JSON-serialisable dict.

    Keys (absent when aims did not print them): ``version``, ``commit``,
    ``n_atoms``, ``n_electrons``, ``n_spin_channels``, ``n_k_points``,
    ``n_scf_cycles``, ``total_energy_ev``, ``total_energy_hartree``,
    ``homo_ev``, ``lumo_ev``, ``homo_lumo_gap_ev``, ``fermi_level_ev``,
    ``n_aux_functions`` ("there are totally N partial auxiliary wave
    functions"), ``ovlp_cutoff_radius``, ``time_total_s`` (``{"cpu", "wall"}``),
    ``prodbas_acc`` (element -> accuracy), ``prodbas_radii`` (element -> list
    of ``{"l", "charge_radius", "field_radius", "multipole_moment"}``, radii in
    Angstrom, from the "Product basis:" table; they bound the overlap of two
    atoms' functions), ``lattice_vectors`` (3 x 3, Angstrom, rows; periodic
    runs only). Always: ``finished`` and ``scf_converged`` (bool).

    Raises
    ------
    FileNotFoundError
        Naming ``path`` if it does not exist.
    ValueError
        Naming ``path`` and the line, if the unit cell is not three vectors.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no aims output '{path}'")
    with open(path, errors="replace") as f:
        lines = f.read().splitlines()
    summary: Dict[str, Any] = {
        "finished": any(_FINISHED in line for line in lines),
        "scf_converged": any(SCF_CONVERGED in line for line in lines),
    }
    for line in lines:
        for key, pattern, convert in _SCALARS:
            match = pattern.search(line)
            if match:
                summary[key] = convert(match.group(1))
        match = _TOTAL_TIME.search(line)
        if match:
            cpu, wall = match.groups()
            summary["time_total_s"] = {"cpu": _float(cpu), "wall": _float(wall)}
        match = _PRODBAS_ACC.search(line)
        if match:
            summary.setdefault("prodbas_acc", {})[match.group(1)] = _float(match.group(2))
    if "total_energy_ev" in summary:
        summary["total_energy_hartree"] = summary["total_energy_ev"] / Hartree
    radii = _prodbas_radii(lines)
    if radii:
        summary["prodbas_radii"] = radii
    lattice = _unit_cell(lines, path)
    if lattice is not None:
        summary["lattice_vectors"] = lattice
    return summary


def _unit_cell(lines: List[str], path: str):
    """The three lattice vectors (Angstrom) after the last ``| Unit cell:`` line, or ``None``
    (aims prints ``| No unit cell requested.`` for molecules)."""
    starts = [i for i, line in enumerate(lines) if line.strip() == "| Unit cell:"]
    if not starts:
        return None
    rows = lines[starts[-1] + 1:starts[-1] + 4]
    try:
        vectors = [[_float(x) for x in row.split()[-3:]] for row in rows]
    except ValueError:
        vectors = []
    if len(vectors) != 3 or any(len(v) != 3 for v in vectors):
        raise ValueError(
            f"'{path}', line {starts[-1] + 2}: expected three lattice vectors after "
            f"'| Unit cell:', got {[row.strip() for row in rows]}"
        )
    return vectors


def _prodbas_radii(lines: List[str]) -> Dict[str, List[Dict[str, float]]]:
    """The rows of the last "Product basis:" table (one per element and l)."""
    radii: Dict[str, List[Dict[str, float]]] = {}
    in_table = False
    for line in lines:
        if "Product basis:" in line:
            radii, in_table = {}, True
            continue
        if not in_table:
            continue
        match = _PRODBAS_RADIUS.match(line)
        if match:
            symbol, l, charge, field, moment = match.groups()
            radii.setdefault(symbol, []).append(
                {"l": int(l), "charge_radius": _float(charge), "field_radius": _float(field),
                 "multipole_moment": _float(moment)}
            )
        elif radii:  # the first line after the table's rows
            in_table = False
    return radii
