"""The chemiscope map: names, title, axes, per-structure and per-atom errors."""

import gzip
import json

import ase
import pytest

from rholearn.visualise import write_chemiscope


def _frames():
    water = ase.Atoms("OH2", positions=[[0, 0, 0], [0.76, 0.59, 0], [-0.76, 0.59, 0]])
    named = ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], info={"name": "hydrogen"})
    return [water, named]


def _rows():
    return [
        {"index": 3, "formula": "H2O", "relative_l2_percent": 1.5, "l1_vs_ri_percent": 0.4,
         "atom_error_share_percent": [80.0, 10.0, 10.0]},
        {"index": 7, "formula": "H2", "relative_l2_percent": 0.5, "l1_vs_ri_percent": 0.1,
         "atom_error_share_percent": [50.0, 50.0]},
    ]


def test_map_has_names_axes_and_atom_errors(tmp_path):
    path = tmp_path / "map.json.gz"
    write_chemiscope(str(path), _frames(), _rows(), name="test run", description="a model")
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    assert data["meta"]["name"] == "test run"
    properties = data["properties"]
    assert properties["name"]["values"] == ["3: H2O", "hydrogen"]
    assert properties["relative_l2_percent"]["values"] == [1.5, 0.5]
    assert properties["atom_error_share_percent"]["target"] == "atom"
    assert properties["atom_error_share_percent"]["values"] == [80.0, 10.0, 10.0, 50.0, 50.0]
    assert data["settings"]["map"]["x"]["property"] == "relative_l2_percent"
    assert data["settings"]["map"]["y"]["property"] == "l1_vs_ri_percent"
    assert len(data["environments"]) == 5
    for name, entry in properties.items():  # every property says what it is
        assert len(entry.get("description", "")) > 10, name
    assert "non-negative" in properties["atom_error_share_percent"]["description"]


def test_atom_values_must_match_atoms(tmp_path):
    rows = _rows()
    rows[1]["atom_error_share_percent"] = [100.0]
    with pytest.raises(ValueError, match="structure 7"):
        write_chemiscope(str(tmp_path / "map.json"), _frames(), rows)
