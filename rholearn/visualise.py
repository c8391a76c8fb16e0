"""Per-structure errors as an interactive chemiscope map (https://chemiscope.org)."""

from __future__ import annotations

from typing import Dict, List, Sequence

import ase
import chemiscope

ERROR_UNITS = "%"


def write_chemiscope(
    path: str, frames: Sequence[ase.Atoms], rows: List[Dict[str, object]], name: str = "rholearn"
) -> None:
    """Write a chemiscope input file of structures and their errors.

    Parameters
    ----------
    path : str
        Output file (``.json`` or ``.json.gz``), opened at https://chemiscope.org
        or with ``chemiscope.show_input`` in a notebook.
    frames : sequence of ase.Atoms
        The structures, in the order of ``rows``.
    rows : list of dict
        One dict per structure, e.g. ``workflow.evaluate(...)["structures"]``;
        every numeric entry ending in ``_percent`` becomes a property (in %).
    name : str
        Title of the dataset.
    """
    if len(frames) != len(rows):
        raise ValueError(f"{len(frames)} structures but {len(rows)} rows of errors")
    names = [key for key, value in rows[0].items() if key.endswith("_percent")] if rows else []
    properties = {
        key: {
            "target": "structure",
            "values": [float(row[key]) for row in rows],
            "units": ERROR_UNITS,
        }
        for key in names
    }
    properties["index"] = {"target": "structure", "values": [int(row["index"]) for row in rows]}
    chemiscope.write_input(
        path, structures=list(frames), metadata={"name": name}, properties=properties
    )
