"""Settings of an FHI-aims target calculation."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Tuple

from rholearn.layout import OVERLAP_THRESHOLD

COMMAND_VARIABLE = "ASE_AIMS_COMMAND"
SPECIES_VARIABLE = "AIMS_SPECIES_DIR"


@dataclasses.dataclass(frozen=True)
class AimsOptions:
    """How to run FHI-aims (SCF, RI fit, rebuild) and read its RI output.

    Plain data, picklable, so it can be sent to worker processes.

    Parameters
    ----------
    species_dir : str, optional
        Folder of aims species defaults (``01_H_default``, ...), for instance
        ``.../species_defaults/defaults_2020/light``. Default: ``$AIMS_SPECIES_DIR``.
    command : str, optional
        Command running aims in a run folder, e.g. ``"mpirun -np 4 aims.x"``;
        its standard output becomes ``aims.out`` (no redirection in the
        command). Default: ``$ASE_AIMS_COMMAND``. Without either, runs are only
        written (and SLURM scripts if asked), never run.
    xc : str
        aims ``xc`` keyword (``"pbe"``, ``"pbe0"``, ...).
    relativistic : str
        aims ``relativistic`` keyword.
    k_grid : tuple of 3 int, optional
        aims ``k_grid``; required for periodic structures.
    prodbas_acc : float
        ``default_prodbas_acc`` of the RI fit: accuracy of the product basis
        (smaller keeps more auxiliary functions).
    max_l_prodbas : int, optional
        ``default_max_l_prodbas``: largest ``l`` of the product basis (aims'
        default if not set).
    orbitals : tuple of 2 int, optional
        Fit the sum of the orbital densities ``|psi|^2`` of Kohn-Sham states
        ``first..last`` (1-based, inclusive, aims' state index; each k-point
        weighted by its weight) instead of the total density. ``(i, i)`` fits
        a single orbital.
    cube : bool
        Also write the SCF and rebuilt densities as cube files
        (``output cube total_density``).
    keywords : dict
        Further aims keywords for every step (override the ones above).
    overlap_threshold : float
        Atom pairs whose auxiliary overlap block has no element above this are
        not stored (see :func:`rholearn.layout.matrix_to_pair_tensormap`).
    """

    species_dir: Optional[str] = None
    command: Optional[str] = None
    xc: str = "pbe"
    relativistic: str = "atomic_zora scalar"
    k_grid: Optional[Tuple[int, int, int]] = None
    prodbas_acc: float = 1e-5
    max_l_prodbas: Optional[int] = None
    orbitals: Optional[Tuple[int, int]] = None
    cube: bool = False
    keywords: Dict[str, Any] = dataclasses.field(default_factory=dict)
    overlap_threshold: float = OVERLAP_THRESHOLD

    def __post_init__(self):
        if self.k_grid is not None and (
            len(self.k_grid) != 3 or any(int(k) < 1 for k in self.k_grid)
        ):
            raise ValueError(f"AimsOptions.k_grid must be 3 integers >= 1, got {self.k_grid!r}")
        if not self.prodbas_acc > 0:
            raise ValueError(f"AimsOptions.prodbas_acc must be > 0, got {self.prodbas_acc}")
        if self.max_l_prodbas is not None and self.max_l_prodbas < 0:
            raise ValueError(
                f"AimsOptions.max_l_prodbas must be >= 0, got {self.max_l_prodbas}"
            )
        if self.orbitals is not None and not (
            len(self.orbitals) == 2 and 1 <= self.orbitals[0] <= self.orbitals[1]
        ):
            raise ValueError(
                f"AimsOptions.orbitals must be (first, last) with 1 <= first <= last, "
                f"got {self.orbitals!r}"
            )
        if self.command is not None and ">" in self.command:
            raise ValueError(
                f"AimsOptions.command {self.command!r}: drop the redirection, rhocalc "
                "writes aims' output to aims.out itself"
            )
        if not self.overlap_threshold >= 0:
            raise ValueError(
                f"AimsOptions.overlap_threshold must be >= 0, got {self.overlap_threshold}"
            )

    def resolved_command(self) -> Optional[str]:
        """``command``, else ``$ASE_AIMS_COMMAND``, else ``None`` (aims not configured)."""
        command = self.command or os.environ.get(COMMAND_VARIABLE) or None
        if command is not None and ">" in command:
            raise ValueError(
                f"${COMMAND_VARIABLE} = {command!r}: drop the redirection, rhocalc "
                "writes aims' output to aims.out itself"
            )
        return command

    def resolved_species_dir(self) -> str:
        """``species_dir``, else ``$AIMS_SPECIES_DIR``; raises if neither is a folder."""
        species_dir = self.species_dir or os.environ.get(SPECIES_VARIABLE)
        if not species_dir:
            raise ValueError(
                f"no FHI-aims species defaults: give AimsOptions.species_dir "
                f"(--species-dir) or set ${SPECIES_VARIABLE}"
            )
        if not os.path.isdir(species_dir):
            raise ValueError(f"FHI-aims species directory '{species_dir}' does not exist")
        return species_dir

    def to_dict(self) -> dict:
        """The options as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AimsOptions":
        for key in ("k_grid", "orbitals"):
            if data.get(key) is not None:
                data = {**data, key: tuple(data[key])}
        return cls(**data)
