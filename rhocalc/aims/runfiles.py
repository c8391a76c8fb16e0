"""Which files of an FHI-aims RI run hold what, and whether they need converting.

The conventions of aims' RI files depend on the aims version, which is read
from ``aims.out`` (``FHI-aims version : 240925``), not guessed from file names:
the same names were written by builds with different conventions (see
:mod:`rhocalc.aims.order`).

=====================  =================================================================
coefficients           ``ri_restart_coeffs.out`` (221103, 2024), ``ri_restart_coeffs_df.out``
                       (read by SALTED), ``ri_coeffs.out`` (2023 development builds)
projections            ``ri_projections.out``, ``ri_projs.out`` (2023 development builds)
overlap                ``ri_ovlp.out``: N*N values, or N(N+1)/2 (upper triangle, row
                       by row, with ``ri_ovlp_write_triu``)
basis definition       ``basis_info.out``, ``product_basis_definition.out`` (same format)
aims' order            aims < 240403 only: ``idx_prodbas_details.out`` (221103),
                       ``product_basis_idxs.out`` (2023 development builds), or
                       ``idx_prodbas.out`` with ``prodbas_condon_shotley_list.out``
density on the grid    ``rho_scf.out`` / ``rho_ref.out``; ``rho_rebuilt_ri.out`` /
                       ``rho_ri.out`` / ``rho_rebuilt.out``
integration weights    ``partition_tab.out``
=====================  =================================================================

A folder holding two names of one quantity is read only if both hold the same
values. Fits of single Kohn-Sham orbitals write the orbital-resolved vectors
and densities with a suffix, ``ri_restart_coeffs_0001.out`` (``orbital=1``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Dict, Optional, Tuple

from . import aimsout
from .order import CANONICAL_FROM_VERSION, converts

COEFFICIENTS = ("ri_restart_coeffs.out", "ri_restart_coeffs_df.out", "ri_coeffs.out")
PROJECTIONS = ("ri_projections.out", "ri_projs.out")
OVERLAP = "ri_ovlp.out"
BASIS = ("basis_info.out", "product_basis_definition.out")
LABELS = ("idx_prodbas_details.out", "product_basis_idxs.out")
"""Files labelling each function (position, atom, l, radial index, m); aims < 240403."""
INDEX = "idx_prodbas.out"
FLIPPED = "prodbas_condon_shotley_list.out"
RHO_SCF = ("rho_scf.out", "rho_ref.out")
RHO_RI = ("rho_rebuilt_ri.out", "rho_ri.out", "rho_rebuilt.out")
PARTITION = "partition_tab.out"
AIMS_OUT = "aims.out"

_VERSION = re.compile(r"^(\d{6})(?:\D|$)")


class AimsOutputError(ValueError):
    """An aims output file is missing, truncated, or inconsistent; the message names it."""


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """The files of one finished RI run and the conventions they follow.

    Attributes
    ----------
    directory : str
    version : str
        The aims version, as ``aims.out`` prints it (e.g. ``"240925"``).
    version_from : str
        ``"aims.out"``, or ``"aims_version argument"`` when given by the caller.
    summary : dict
        :func:`rhocalc.aims.aimsout.parse_aims_out` of ``aims.out`` (empty without it).
    coefficients, projections : tuple of str
        The file name(s) holding the vector (two names must agree).
    order : tuple of str
        The files giving aims' internal order, ``()`` when the files are canonical.
    rho_scf, rho_ri : str or None
        The grid files of the SCF and the RI density, when aims wrote them.
    """

    directory: str
    version: str
    version_from: str
    summary: Dict[str, Any]
    coefficients: Tuple[str, ...]
    projections: Tuple[str, ...]
    order: Tuple[str, ...]
    rho_scf: Optional[str]
    rho_ri: Optional[str]

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)


def orbital_file(name: str, orbital: Optional[int]) -> str:
    """File name of an orbital-resolved output: ``ri_coeffs.out`` -> ``ri_coeffs_0001.out``."""
    if orbital is None:
        return name
    stem, extension = os.path.splitext(name)
    return f"{stem}_{orbital:04d}{extension}"


def version_number(version: str, where: str) -> int:
    """The date stamp of an aims version (``"240925"`` -> 240925; ``"221103.1"`` too).

    Raises
    ------
    AimsOutputError
        Naming ``where`` if the version does not start with six digits.
    """
    match = _VERSION.match(str(version).strip())
    if match is None:
        raise AimsOutputError(
            f"{where}: cannot read the aims version '{version}' (expected a date stamp "
            "such as 240925); pass aims_version='YYMMDD' to read_ri_run"
        )
    return int(match.group(1))


def run_files(
    directory: str, orbital: Optional[int] = None, aims_version: Optional[str] = None
) -> RunFiles:
    """The files of a finished RI run in ``directory`` and their conventions.

    Parameters
    ----------
    directory : str
    orbital : int, optional
        Orbital-resolved vectors and densities of this Kohn-Sham orbital.
    aims_version : str, optional
        The aims version, for a folder whose ``aims.out`` is missing or prints
        none (e.g. ``"221103"``); if ``aims.out`` prints one, they must agree.

    Raises
    ------
    AimsOutputError
        If the version is unknown, the folder lacks a file the version needs
        (naming it), or holds two names of one quantity.
    """
    summary = {}
    aims_out = os.path.join(directory, AIMS_OUT)
    if os.path.isfile(aims_out):
        try:
            summary = aimsout.parse_aims_out(aims_out)
        except ValueError as error:
            raise AimsOutputError(str(error)) from error
    printed = summary.get("version")
    if printed is None and aims_version is None:
        state = "prints no 'FHI-aims version'" if summary else "is missing"
        raise AimsOutputError(
            f"'{aims_out}' {state}, so the conventions of the RI files in '{directory}' "
            f"are unknown (aims before {CANONICAL_FROM_VERSION} writes them in its internal "
            "order): keep aims.out with the run, or pass aims_version='YYMMDD'"
        )
    if printed is not None and aims_version is not None and (
        version_number(printed, f"'{aims_out}'") != version_number(aims_version, "aims_version")
    ):
        raise AimsOutputError(
            f"aims_version='{aims_version}' given, but '{aims_out}' reports version {printed}"
        )
    version = printed if printed is not None else str(aims_version)
    where = f"'{aims_out}'" if printed is not None else "aims_version"
    number = version_number(version, where)
    return RunFiles(
        directory=directory,
        version=version,
        version_from=AIMS_OUT if printed is not None else "aims_version argument",
        summary=summary,
        coefficients=_present(directory, [orbital_file(n, orbital) for n in COEFFICIENTS],
                              "RI coefficients"),
        projections=_present(directory, [orbital_file(n, orbital) for n in PROJECTIONS],
                             "RI projections"),
        order=order_files(directory, number) if converts(number) else (),
        rho_scf=_first(directory, [orbital_file(n, orbital) for n in RHO_SCF]),
        rho_ri=_first(directory, [orbital_file(n, orbital) for n in RHO_RI]),
    )


def order_files(directory: str, version: int) -> Tuple[str, ...]:
    """The file(s) giving aims' internal order in a run of aims ``version`` < 240403.

    One labelling file (``idx_prodbas_details.out`` or ``product_basis_idxs.out``,
    with ``prodbas_condon_shotley_list.out`` when present, to be checked
    against it), or ``idx_prodbas.out`` with ``prodbas_condon_shotley_list.out``.

    Raises
    ------
    AimsOutputError
        Naming the missing file(s).
    """
    present = set(os.listdir(directory))
    flipped = (FLIPPED,) if FLIPPED in present else ()
    for name in LABELS:
        if name in present:
            return (name,) + flipped
    if INDEX in present:
        if not flipped:
            raise AimsOutputError(
                f"'{directory}' (aims {version}) has '{INDEX}' but no '{FLIPPED}': the "
                "signs of aims' internal harmonics cannot be converted"
            )
        return (INDEX, FLIPPED)
    raise AimsOutputError(
        f"'{directory}' (aims {version}, before {CANONICAL_FROM_VERSION}) holds its RI files "
        f"in aims' internal order, but none of '{LABELS[0]}', '{LABELS[1]}' or "
        f"'{INDEX}' + '{FLIPPED}' that give it; is this a finished RI run with ri_full_output?"
    )


def _present(directory: str, names, what: str) -> Tuple[str, ...]:
    found = tuple(n for n in names if os.path.isfile(os.path.join(directory, n)))
    if not found:
        raise AimsOutputError(
            f"missing aims output file: '{directory}' holds no {what} "
            f"({' or '.join(repr(n) for n in names)}); is this a finished RI run "
            "with ri_full_output?"
        )
    return found


def _first(directory: str, names) -> Optional[str]:
    return next((n for n in names if os.path.isfile(os.path.join(directory, n))), None)
