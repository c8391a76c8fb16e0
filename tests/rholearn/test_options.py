"""Options defined once: dataclass <-> YAML, overrides, flags; errors name the option."""

import argparse
import dataclasses
from typing import List, Optional

import pytest

from rholearn import options
from rholearn.options import (
    OptionsError,
    add_flags,
    apply_override,
    flag_overrides,
    from_dict,
    leaf_options,
    merge,
    parse_override,
    read_yaml,
    to_dict,
    write_yaml,
)


@dataclasses.dataclass
class Inner:
    """Inner options.

    Parameters
    ----------
    epochs : int
        Number of epochs.
    rate : float
        Learning rate.
    """

    epochs: int = 10
    rate: float = 0.1


@dataclasses.dataclass
class Outer:
    """Outer options.

    Parameters
    ----------
    name : str
        A name.
    count : int, optional
        How many.
    sizes : list of int
        Sizes.
    hypers : dict
        Free-form settings.
    inner : Inner
        Nested options.
    """

    name: str = "a"
    count: Optional[int] = None
    sizes: List[int] = dataclasses.field(default_factory=lambda: [1, 2])
    hypers: dict = dataclasses.field(default_factory=dict)
    inner: Inner = dataclasses.field(default_factory=Inner)

    def __post_init__(self):
        if self.count is not None and self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")


def test_round_trip_through_yaml(tmp_path):
    options = Outer(name="b", count=3, sizes=[4], hypers={"x": {"y": 1}}, inner=Inner(5, 0.5))
    path = str(tmp_path / "options.yaml")
    write_yaml(path, to_dict(options))
    assert from_dict(Outer, read_yaml(path)) == options


def test_partial_data_keeps_defaults():
    options = from_dict(Outer, {"inner": {"epochs": 3}})
    assert options == Outer(inner=Inner(epochs=3))
    assert from_dict(Outer, {"inner": {"rate": 1}}).inner.rate == 1.0  # int accepted as float


@pytest.mark.parametrize(
    "data, message",
    [
        ({"nmae": "x"}, "unknown option 'nmae'"),
        ({"inner": {"epoch": 3}}, "unknown option 'inner.epoch'"),
        ({"inner": {"epochs": "ten"}}, "option 'inner.epochs' must be int"),
        ({"inner": {"epochs": True}}, "option 'inner.epochs' must be int"),
        ({"count": 1.5}, "option 'count' must be int"),
        ({"sizes": [1, "x"]}, r"option 'sizes\[1\]' must be int"),
        ({"hypers": [1]}, "option 'hypers' must be a mapping"),
        ({"inner": 3}, "option 'inner' must be a mapping"),
        ({"count": -1}, "count must be >= 0"),
    ],
)
def test_bad_options_are_named(data, message):
    with pytest.raises(OptionsError, match=message):
        from_dict(Outer, data)


def test_overrides():
    data = {"inner": {"epochs": 3}}
    apply_override(data, *parse_override("inner.rate=1e-3"))
    apply_override(data, *parse_override("hypers.cutoff.radius=3.5"))
    assert from_dict(Outer, data) == Outer(hypers={"cutoff": {"radius": 3.5}}, inner=Inner(3, 1e-3))
    with pytest.raises(OptionsError, match="key=value"):
        parse_override("inner.rate")
    with pytest.raises(OptionsError, match="'name' is not a mapping"):
        apply_override({"name": "a"}, ["name", "x"], 1)


def test_merge_is_recursive():
    base = {"cutoff": {"radius": 4.0, "smoothing": {"width": 0.5}}, "density": {"width": 0.3}}
    merged = merge(base, {"cutoff": {"radius": 3.0}})
    assert merged == {"cutoff": {"radius": 3.0, "smoothing": {"width": 0.5}}, "density": {"width": 0.3}}
    assert base["cutoff"]["radius"] == 4.0


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: [1,\n")
    with pytest.raises(OptionsError, match="bad.yaml"):
        read_yaml(str(path))
    path.write_text("- 1\n- 2\n")
    with pytest.raises(OptionsError, match="must hold a mapping"):
        read_yaml(str(path))
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        read_yaml(str(tmp_path / "missing.yaml"))


def test_aliases_are_refused_and_never_written(tmp_path):
    path = tmp_path / "aliases.yaml"
    path.write_text("a: &x [1, 2]\nb: *x\n")
    with pytest.raises(OptionsError, match=r"aliases.yaml' .*alias '\*x'"):
        read_yaml(str(path))
    with pytest.raises(OptionsError, match="alias"):
        parse_override("train.epochs=*x")
    shared = [1, 2]  # the same object twice: written out twice, no anchor
    write_yaml(str(path), {"a": shared, "b": shared})
    assert "&" not in path.read_text() and read_yaml(str(path)) == {"a": [1, 2], "b": [1, 2]}


def test_flags_come_from_the_definition():
    names = [name for name, *_ in leaf_options(Outer)]
    assert names == ["name", "count", "sizes", "hypers", "inner.epochs", "inner.rate"]
    parser = argparse.ArgumentParser()
    add_flags(parser, Outer)
    assert "Number of epochs. (default: 10)" in " ".join(parser.format_help().split())
    args = parser.parse_args(["--inner.epochs", "7", "--count", "2"])
    data = {}
    for path, value in flag_overrides(args):
        apply_override(data, path, value)
    assert from_dict(Outer, data) == Outer(count=2, inner=Inner(epochs=7))
    assert flag_overrides(parser.parse_args([])) == []


def test_docstrings_become_plain_help_with_choices():
    assert options.plain_text("See :class:`~rholearn.models.DensityModel` and "
                              ":func:`rholearn.solve.solve_linear`, ``x``.") == \
        "See DensityModel and rholearn.solve.solve_linear, x."

    @dataclasses.dataclass
    class Choices:
        """Options.

        Parameters
        ----------
        kind : {"a", "b"}
            Which one.
        size : {1, 2}
            Not strings: no choices.
        """

        kind: str = "a"
        size: int = 1

    assert options.parameter_choices(Choices) == {"kind": ["a", "b"]}
    assert [leaf[-1] for leaf in leaf_options(Choices)] == [["a", "b"], []]
