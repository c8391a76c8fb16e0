"""Per-structure and per-atom errors as an interactive chemiscope map (https://chemiscope.org)."""

from __future__ import annotations

from typing import Dict, List, Sequence

import ase
import chemiscope
import numpy as np

ERROR_UNITS = "%"
ATOM_PREFIX = "atom_"
"""Row entries starting with this (lists, one value per atom) become atom properties."""

DESCRIPTIONS = {
    "relative_l2_percent": "the model's L2 error relative to the density's norm, "
                           "100 sqrt(dc^T S dc / c^T S c), against the fitted (RI) coefficients",
    "rmse_percent": "the error relative to the spread around the baseline, "
                    "100 sqrt(dc^T S dc / (c - c_base)^T S (c - c_base))",
    "l1_vs_ri_percent": "real-space L1 error of the predicted density against the RI "
                        "(fitted) density, 100 int |rho_ML - rho_RI| / N_electrons",
    "l1_vs_scf_percent": "real-space L1 error of the predicted density against the SCF "
                         "density, 100 int |rho_ML - rho_SCF| / N_electrons",
    "ri_l1_vs_scf_percent": "the basis's own error: real-space L1 error of the RI density "
                            "against the SCF density, 100 int |rho_RI - rho_SCF| / N_electrons",
    "atom_error_share_percent": "each atom's share of its structure's squared L2 error "
                                "dc^T S dc (Loewdin split: |S^(1/2) dc|^2 over the atom's "
                                "functions); non-negative, summing to 100 % per structure",
    "index": "index of the structure in the dataset",
    "name": "atoms.info['name'], else 'index: formula'",
}
"""What each property of the map means (shown by chemiscope beside its values)."""


def write_chemiscope(
    path: str,
    frames: Sequence[ase.Atoms],
    rows: List[Dict[str, object]],
    name: str = "rholearn",
    description: str = "",
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
        One dict per structure, e.g. ``workflow.evaluate(...)["structures"]``:
        every numeric entry ending in ``_percent`` becomes a structure property
        (in %, described by :data:`DESCRIPTIONS`), ``index`` too, and every list-valued entry
        starting with ``atom_`` (one value per atom, e.g. each atom's share of
        the structure's error) an atom property. Structures are named by
        ``atoms.info["name"]`` where set.
    name : str
        Title of the map.
    description : str
        Free text shown with the title (e.g. the model and dataset).

    Notes
    -----
    The map opens with the first two errors on its axes (the relative L2 error
    and, when present, the real-space L1 error against the RI density) and the
    atoms coloured by their first atom property.
    """
    if len(frames) != len(rows):
        raise ValueError(f"{len(frames)} structures but {len(rows)} rows of errors")
    errors = [key for key, value in rows[0].items() if key.endswith("_percent")
              and not key.startswith(ATOM_PREFIX)] if rows else []
    atom_keys = [key for key in rows[0] if key.startswith(ATOM_PREFIX)] if rows else []
    properties: Dict[str, dict] = {
        key: {"target": "structure", "values": [float(row[key]) for row in rows],
              "units": ERROR_UNITS, "description": _description(key)}
        for key in errors
    }
    properties["index"] = {"target": "structure", "values": [int(row["index"]) for row in rows],
                           "description": DESCRIPTIONS["index"]}
    properties["name"] = {
        "target": "structure",
        "description": DESCRIPTIONS["name"],
        "values": [str(atoms.info.get("name", f"{row['index']}: {atoms.get_chemical_formula()}"))
                   for atoms, row in zip(frames, rows)],
    }
    for key in atom_keys:
        for atoms, row in zip(frames, rows):
            if len(row[key]) != len(atoms):
                raise ValueError(
                    f"structure {row['index']}: '{key}' has {len(row[key])} values for "
                    f"{len(atoms)} atoms"
                )
        properties[key] = {
            "target": "atom",
            "values": np.concatenate([np.asarray(row[key], dtype=float) for row in rows]),
            "units": ERROR_UNITS if key.endswith("_percent") else "",
            "description": _description(key),
        }
    axes = (errors + ["index"])[:2] if errors else ["index", "index"]
    settings: Dict[str, object] = {
        "map": {"x": {"property": axes[0]}, "y": {"property": axes[1]},
                "color": {"property": axes[0]}},
    }
    if atom_keys:
        settings["structure"] = [{"color": {"property": atom_keys[0]}}]
    chemiscope.write_input(
        path,
        structures=list(frames),
        metadata={"name": name, "description": description},
        properties=properties,
        environments=chemiscope.all_atomic_environments(list(frames)) if atom_keys else None,
        settings=settings,
    )


def _description(key: str) -> str:
    """The description of a row entry: :data:`DESCRIPTIONS`, else its name in words."""
    return DESCRIPTIONS.get(key, key.replace("_percent", " (%)").replace("_", " "))
