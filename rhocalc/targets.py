"""One structure's learning targets, as every backend returns them and writes them."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Dict

from metatensor import TensorMap

from rholearn import layout


@dataclasses.dataclass
class Targets:
    """Density-fitting targets of one structure, in the shared layout.

    Attributes
    ----------
    coefficients : TensorMap
        Expansion coefficients ``c`` of the fitted density (layout of
        :mod:`rholearn.layout`).
    projections : TensorMap
        Projections ``w = S c`` of the density onto the auxiliary functions.
    overlap : TensorMap
        Auxiliary-basis overlap ``S`` as sparse atom-pair blocks.
    info : dict
        JSON-serialisable diagnostics: SCF energy (Hartree), electron counts,
        fit errors, timings (s), options used.
    """

    coefficients: TensorMap
    projections: TensorMap
    overlap: TensorMap
    info: Dict[str, Any]

    def write(self, folder: str) -> None:
        """Write the four files into ``folder`` atomically.

        Everything goes into a temporary sibling folder first, which is then
        renamed to ``folder``: a folder that exists is complete.
        """
        parent = os.path.dirname(os.path.abspath(folder))
        tmp = os.path.join(parent, f".tmp-{os.path.basename(folder)}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        layout.save(os.path.join(tmp, layout.COEFFICIENTS_FILE), self.coefficients)
        layout.save(os.path.join(tmp, layout.PROJECTIONS_FILE), self.projections)
        layout.save(os.path.join(tmp, layout.OVERLAP_FILE), self.overlap)
        with open(os.path.join(tmp, layout.INFO_FILE), "w") as f:
            json.dump(self.info, f, indent=1)
        if os.path.exists(folder):  # an explicit overwrite
            shutil.rmtree(folder)
        os.rename(tmp, folder)

    @classmethod
    def read(cls, folder: str) -> "Targets":
        """Read targets written by :meth:`write`; errors name the file at fault."""
        info_path = os.path.join(folder, layout.INFO_FILE)
        try:
            with open(info_path) as f:
                info = json.load(f)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read '{info_path}': {error}") from error
        return cls(
            coefficients=layout.load(os.path.join(folder, layout.COEFFICIENTS_FILE)),
            projections=layout.load(os.path.join(folder, layout.PROJECTIONS_FILE)),
            overlap=layout.load(os.path.join(folder, layout.OVERLAP_FILE)),
            info=info,
        )
