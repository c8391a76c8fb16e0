"""Options defined once, as dataclasses, and read from YAML files, ``key=value``
overrides and command-line flags.

A dataclass of options (for instance :class:`rholearn.workflow.FitOptions`, which
nests :class:`rholearn.train.TrainOptions`) is the only definition of each
option: its name, type, default and help (the ``help`` entry of the field's
metadata, or the numpydoc ``Parameters`` of the class). This module turns it
into and out of plain data:

- :func:`to_dict` / :func:`from_dict`: dataclass <-> nested dict, with every
  unknown key and wrong type reported by its dotted path (``train.epochs``);
- :func:`read_yaml` / :func:`write_yaml`: YAML files, errors naming the file;
- :func:`apply_override`: ``"train.epochs=20"`` (the value read as YAML);
- :func:`add_flags` / :func:`flag_overrides`: one ``--dotted.name`` flag per
  option of an :mod:`argparse` parser, its default shown in ``--help``;
- :func:`add_options_arguments` / :func:`options_from_arguments`: all of these
  for one dataclass (``--options FILE``, ``-r KEY=VALUE``, flags).
"""

from __future__ import annotations

import argparse
import collections.abc
import copy
import dataclasses
import inspect
import json
import re
import types
import typing
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Type, TypeVar

import yaml

from .files import atomic_path

T = TypeVar("T")


class OptionsError(ValueError):
    """An option that is unknown, of the wrong type or out of range; the message names it."""


# ---------------------------------------------------------------- plain data ---
def to_dict(options: Any) -> Dict[str, Any]:
    """The options as nested plain data (dicts, lists, numbers, strings, None;
    tuples become lists, as YAML and JSON read them back)."""
    return json.loads(json.dumps(dataclasses.asdict(options)))


def from_dict(cls: Type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build the dataclass ``cls`` from nested plain data.

    Keys absent from ``data`` keep their defaults. Nested dataclass fields
    take nested mappings. Errors (:class:`OptionsError`) name the option by
    its dotted path, prefixed with ``where``.
    """
    if not isinstance(data, Mapping):
        raise OptionsError(f"{_name(where) or 'options'} must be a mapping, got {_describe(data)}")
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise OptionsError(
            f"unknown option '{_join(where, unknown[0])}'; known options here: "
            f"{', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    values = {name: _convert(hints[name], value, _join(where, name)) for name, value in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        if isinstance(error, OptionsError):
            raise
        raise OptionsError(f"{_name(where) or 'options'}: {error}") from None


def _convert(hint: Any, value: Any, path: str) -> Any:
    """``value`` checked against the type ``hint`` (nested dataclasses built)."""
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if dataclasses.is_dataclass(value):
            return value
        return from_dict(hint, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        errors = []
        for argument in (a for a in arguments if a is not type(None)):
            try:
                return _convert(argument, value, path)
            except OptionsError as error:
                errors.append(str(error))
        raise OptionsError(errors[0] if len(errors) == 1 else f"option '{path}': {_describe(value)} fits none of {hint}")
    if origin is typing.Literal:
        if value in arguments:
            return value
        raise OptionsError(f"option '{path}' must be one of {list(arguments)}, got {value!r}")
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            raise OptionsError(f"option '{path}' must be a number, got {_describe(value)}") from None
    if hint in (int, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise OptionsError(f"option '{path}' must be {hint.__name__}, got {_describe(value)}")
    container = origin or hint
    if container in (dict, Mapping, collections.abc.Mapping):
        if isinstance(value, Mapping):
            return dict(value)
        raise OptionsError(f"option '{path}' must be a mapping, got {_describe(value)}")
    if container is tuple and arguments and arguments[-1] is not Ellipsis:  # Tuple[int, int]
        if isinstance(value, (list, tuple)) and len(value) == len(arguments):
            return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(arguments, value)))
        raise OptionsError(f"option '{path}' must be a list of {len(arguments)}, got {_describe(value)}")
    if container in (list, tuple, Sequence, collections.abc.Sequence):
        if isinstance(value, (list, tuple)):
            item = arguments[0] if arguments else Any
            items = [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if container is tuple else items
        raise OptionsError(f"option '{path}' must be a list, got {_describe(value)}")
    if hint is float:
        raise OptionsError(f"option '{path}' must be a number, got {_describe(value)}")
    return value


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _name(where: str) -> str:
    return f"option '{where}'" if where else ""


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def keyword_options(
    target: Any,
    given: Mapping[str, Any],
    where: str,
    exclude: Sequence[str] = ("dtype", "device"),
    others: Sequence[Any] = (),
) -> Dict[str, Any]:
    """``given`` completed with the defaults of ``target``'s keyword arguments.

    For free-form options passed on to a constructor (e.g. a model's
    ``n_references``): the result lists every keyword the constructor takes
    with a default (except ``exclude``), as plain data, so that written-out
    options show them all. A key the constructor does not take is dropped if it
    holds the default of one of ``others`` (the alternatives to ``target``: a
    written-out file whose choice was switched, e.g. ``-r model=linear`` on the
    kernel's options), and raises an :class:`OptionsError` naming ``where.key``
    otherwise.
    """
    defaults = _keyword_defaults(target, exclude)
    left_behind = {}
    for other in others:
        left_behind.update(json.loads(json.dumps(_keyword_defaults(other, exclude))))
    given = {k: v for k, v in json.loads(json.dumps(dict(given))).items()
             if k in defaults or k not in left_behind or left_behind[k] != v}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        name = getattr(target, "__name__", str(target))
        raise OptionsError(
            f"unknown option '{where}.{unknown[0]}' for {name}, which takes: "
            f"{', '.join(sorted(defaults)) or 'none'} (an option of another choice "
            "left behind? remove it)"
        )
    return json.loads(json.dumps({**defaults, **given}))


def _keyword_defaults(target: Any, exclude: Sequence[str]) -> Dict[str, Any]:
    return {
        p.name: p.default for p in inspect.signature(target).parameters.values()
        if p.default is not inspect.Parameter.empty and p.name not in exclude
    }


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> Dict[str, Any]:
    """``base`` with ``update`` merged in, recursively for nested mappings.

    Used for partial settings (e.g. descriptor hypers): keys of ``update``
    replace those of ``base``; nested mappings merge key by key.
    """
    merged = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# --------------------------------------------------------------------- files ---
class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases (``*name``): options are plain
    values, and nested aliases expand exponentially (a few lines can hold more
    values than memory)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias '*{event.anchor}': rholearn options take no YAML aliases "
                "(write the value out)", event.start_mark,
            )
        return super().compose_node(parent, index)


def load_yaml(stream: Any) -> Any:
    """Plain data from YAML text or a file object, aliases refused (:class:`yaml.YAMLError`)."""
    return yaml.load(stream, Loader=_NoAliasLoader)


def read_yaml(path: str) -> Dict[str, Any]:
    """A YAML file of options as nested plain data; errors name the file (aliases,
    ``*name``, are refused: see :func:`load_yaml`)."""
    try:
        with open(path) as f:
            data = load_yaml(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such options file: '{path}'") from None
    except yaml.YAMLError as error:
        raise OptionsError(f"options file '{path}' is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OptionsError(f"options file '{path}' must hold a mapping, got {_describe(data)}")
    return data


class _NoAliasDumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that writes a value used twice out twice: what it writes,
    :func:`load_yaml` reads back (it refuses aliases)."""

    def ignore_aliases(self, data):
        return True


def write_yaml(path: str, data: Mapping[str, Any]) -> None:
    """Write plain data as YAML, atomically (keys in definition order, no aliases)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(dump_yaml(data))


def dump_yaml(data: Mapping[str, Any]) -> str:
    """Plain data as a YAML string (keys in definition order, no aliases)."""
    return yaml.dump(dict(data), Dumper=_NoAliasDumper, sort_keys=False)


# ----------------------------------------------------------------- overrides ---
def parse_override(text: str) -> Tuple[List[str], Any]:
    """``"train.epochs=20"`` -> ``(["train", "epochs"], 20)``; the value is read as YAML."""
    key, separator, raw = text.partition("=")
    if not separator or not key.strip():
        raise OptionsError(f"override '{text}' must look like key=value, e.g. train.epochs=20")
    try:
        value = load_yaml(raw)
    except yaml.YAMLError as error:
        raise OptionsError(f"override '{text}': the value is not valid YAML: {error}") from None
    return key.strip().split("."), value


def apply_override(data: Dict[str, Any], path: Sequence[str], value: Any) -> Dict[str, Any]:
    """Set ``data[path[0]][path[1]]... = value`` in place (creating nested mappings)."""
    node = data
    for depth, name in enumerate(path[:-1]):
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise OptionsError(
                f"override of '{'.'.join(path)}': '{'.'.join(path[: depth + 1])}' is not a mapping"
            )
        node = child
    node[path[-1]] = value
    return data


# --------------------------------------------------------------------- flags ---
def leaf_options(cls: type, where: str = "") -> List[Tuple[str, Any, Any, str, List[str]]]:
    """``(dotted name, type hint, default, help, choices)`` of every option of ``cls``,
    nested dataclasses expanded, in definition order (choices: see
    :func:`parameter_choices`; empty if not a fixed set)."""
    hints = typing.get_type_hints(cls)
    documented = parameter_docs(cls)
    choices = parameter_choices(cls)
    leaves = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        name, hint = _join(where, field.name), hints[field.name]
        if dataclasses.is_dataclass(hint):
            leaves.extend(leaf_options(hint, name))
            continue
        default = (
            field.default_factory() if field.default_factory is not dataclasses.MISSING
            else field.default
        )
        leaves.append((name, hint, default, field.metadata.get("help", documented.get(field.name, "")),
                       choices.get(field.name, [])))
    return leaves


def parameter_choices(cls: type) -> Dict[str, List[str]]:
    """The values of each parameter whose numpydoc type is a set of strings
    (``model : {"kernel", "linear"}``), in the order written."""
    choices = {}
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        match = re.fullmatch(r"(\w+(?:, \w+)*) : \{(.*)\}", line.strip())
        if match and not line.startswith(" "):
            values = [v.strip() for v in match.group(2).split(",")]
            if all(len(v) > 1 and v[0] == v[-1] == '"' for v in values):
                for name in match.group(1).split(", "):
                    choices[name] = [v[1:-1] for v in values]
    return choices


def plain_text(text: str) -> str:
    """Docstring text as a terminal shows it: Sphinx roles (``:class:`~a.B```)
    become their target (``B``), double backquotes are dropped."""
    text = re.sub(r":[a-z]+:`~[\w.]*?(\w+)`", r"\1", text)
    text = re.sub(r":[a-z]+:`([^`]+)`", r"\1", text)
    return text.replace("``", "")


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` with each argument's default, unless the help text already
    states it or there is none to show (``None``, ``False``, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is argparse.SUPPRESS or default is None
                or default is False or default == []):
            return text
        return f"{text} (default: %(default)s)".strip()


def parameter_docs(cls: type) -> Dict[str, str]:
    """First sentence of each parameter's description in the class's numpydoc
    ``Parameters`` section (``name : type`` lines, descriptions indented below)."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    if "Parameters" not in lines:
        return {}
    descriptions: Dict[str, str] = {}
    names: List[str] = []
    for line in lines[lines.index("Parameters") + 2 :]:
        if line and not line.startswith(" "):
            if not line.rstrip("-").strip() or line.strip() in SECTION_NAMES:
                break
            names = [name.strip() for name in line.split(":")[0].split(",")]
        elif line.strip():
            for name in names:
                descriptions[name] = (descriptions.get(name, "") + " " + line.strip()).strip()
    return {name: _first_sentence(text) for name, text in descriptions.items()}


def _first_sentence(text: str) -> str:
    match = re.search(r"(?<!e\.g)(?<!i\.e)\.\s", text)
    return text if match is None else text[: match.start() + 1]


SECTION_NAMES = ("Returns", "Notes", "Attributes", "Examples", "Raises", "See Also")


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--dotted.name VALUE`` flag per option of ``cls``; values are read as YAML.

    The flags default to "not given", so that only what a user typed
    overrides the options file; ``--help`` shows each option's default.
    """
    group = parser.add_argument_group(f"options ({cls.__name__}; also settable in the options file)")
    for name, hint, default, help_text, choices in leaf_options(cls):
        shown = "null" if default is None else json.dumps(default) if isinstance(default, dict) \
            else default
        metavar = "{" + ",".join(choices) + "}" if choices else "VALUE"
        kind = {"action": argparse.BooleanOptionalAction} if hint is bool else {"metavar": metavar}
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest="option:" + name,
            default=argparse.SUPPRESS,
            help=(plain_text(help_text) if "default" in help_text  # said in its own words
                  else f"{plain_text(help_text)} (default: {shown})").replace("%", "%%"),
            **kind,
        )



def flag_overrides(args: argparse.Namespace) -> List[Tuple[List[str], Any]]:
    """The options given as flags (see :func:`add_flags`), as ``(path, value)`` overrides."""
    overrides = []
    for dest, raw in vars(args).items():
        if dest.startswith("option:"):
            value = load_yaml(raw) if isinstance(raw, str) else raw
            overrides.append((dest[len("option:"):].split("."), value))
    return overrides


def add_options_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """``--options FILE``, ``-r KEY=VALUE`` and one flag per option of ``cls``
    (:func:`add_flags`); read them back with :func:`options_from_arguments`."""
    parser.add_argument("--options", metavar="FILE", help="options file (YAML)")
    parser.add_argument("-r", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="set any option of the options file (repeatable)")
    add_flags(parser, cls)


def options_from_arguments(cls: Type[T], args: argparse.Namespace) -> T:
    """The options of ``cls`` from the defaults, ``--options FILE``, ``-r`` overrides and
    flags, later ones winning (see :func:`add_options_arguments`)."""
    data = read_yaml(args.options) if args.options else {}
    for path, value in [parse_override(text) for text in args.override] + flag_overrides(args):
        apply_override(data, path, value)
    return from_dict(cls, data)
