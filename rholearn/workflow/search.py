"""Choosing the few hypers that matter most by the direct solve's cross-validation loss,
within a time budget.

Every direct solve already scores its regularisation grid by cross-validation over the
training structures (or on the validation structures,
:func:`rholearn.solve.solve_linear`); its best held-out loss per structure is a score
of the hypers it was given, on the same folds and targets whatever the hypers. The
search is a coordinate search from the requested options: each alternative value of
:attr:`SearchOptions.space` (a dotted path into :class:`~rholearn.workflow.FitOptions`,
``hypers.cutoff.radius`` or ``model_options.zeta``) is tried in turn on top of the best
options so far, and kept if its score is lower. A candidate starts only while the time
spent plus the slowest candidate so far fits in :attr:`SearchOptions.seconds`, so the
first (the requested options) always runs and a training set whose one fit takes
more than half the budget is not searched at all. ``solve.json`` records every candidate tried
(``search``), and ``train.log`` has one line each.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Tuple

from .. import distributed
from ..runlog import LOGGER

if TYPE_CHECKING:  # the options are defined with fit, which uses the search
    from .fitting import FitOptions

SEARCHED_FIELDS = ("hypers", "model_options", "descriptor_options")
"""The :class:`~rholearn.workflow.FitOptions` fields a search path may start with."""

DEFAULT_SPACE = {"model_options.zeta": [1.0]}
"""Alternatives tried by default: the kernel exponent, the one hyper whose cross-validated
choice changed the test error on the benchmark chemistries (README, "How the hypers are
chosen"); it reuses the descriptors, so a candidate costs one solve."""


@dataclasses.dataclass
class SearchOptions:
    """Which hypers the direct solve's cross-validation chooses, and how long it may take.

    Parameters
    ----------
    space : dict
        Dotted option path -> alternative values, each tried in turn on top of the
        best options so far and kept when its cross-validation (or validation) loss is
        lower. A path starts with ``hypers``, ``model_options`` or
        ``descriptor_options``. Of the default space, a path whose value was set by
        hand (it differs from the model's default), or that the model does not take,
        is left out; a space given by hand is searched as it is.
    seconds : float
        Time budget of the whole search: a candidate starts only while the time spent
        plus the slowest candidate so far fits (``0``: no search, the requested options
        as they are). The default, 30, searches where one fit takes under 15 s; on
        the benchmark chemistries only such fits (N = 10) kept another zeta.
    """

    space: Dict[str, List[Any]] = dataclasses.field(default_factory=lambda: copy.deepcopy(DEFAULT_SPACE))
    seconds: float = 30.0

    def __post_init__(self):
        if not self.seconds >= 0:
            raise ValueError(f"search.seconds must be >= 0, got {self.seconds}")
        for path, values in self.space.items():
            if path.split(".")[0] not in SEARCHED_FIELDS or "." not in path:
                raise ValueError(f"search.space: '{path}' is not a path into one of {SEARCHED_FIELDS} "
                                 "(e.g. 'hypers.cutoff.radius')")
            if not isinstance(values, (list, tuple)) or not values:
                raise ValueError(f"search.space['{path}'] must be a non-empty list of values, got {values!r}")


def with_value(options: "FitOptions", path: str, value: Any) -> "FitOptions":
    """A copy of ``options`` with the dotted ``path`` set to ``value`` (checked as any
    options are: an unknown hyper or model option raises, naming it)."""
    field, *keys = path.split(".")
    nested = copy.deepcopy(getattr(options, field))
    node = nested
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"search.space: '{path}' goes through '{key}', which is not a mapping")
    node[keys[-1]] = value
    try:
        return dataclasses.replace(options, **{field: nested})
    except (TypeError, ValueError) as error:
        raise ValueError(f"search.space: '{path}' = {value!r}: {error}") from None


def value_at(options: "FitOptions", path: str) -> Any:
    """The value of ``options`` at the dotted ``path`` (``KeyError`` where there is none)."""
    field, *keys = path.split(".")
    node = getattr(options, field)
    for key in keys:
        node = node[key]
    return node


def applicable_space(options: "FitOptions") -> Dict[str, List[Any]]:
    """The paths of ``options.search.space`` to try: all of a space the user gave (each
    value checked now, before any work); of the default space, those where ``options``
    hold the default value of the model (a hyper set by hand stays as it is; a model
    without the option, e.g. zeta, is not searched)."""
    space = options.search.space
    if space != DEFAULT_SPACE:
        for path, values in space.items():
            for value in values:
                try:
                    taken = value_at(with_value(options, path, value), path) == value
                except KeyError:
                    taken = False
                if not taken:
                    raise ValueError(f"search.space: '{path}' is not an option of the "
                                     f"{options.model} model with the {options.descriptor} descriptor")
        return {path: list(values) for path, values in space.items()}
    defaults = type(options)(model=options.model, descriptor=options.descriptor)
    kept = {}
    for path, values in space.items():
        try:
            if value_at(options, path) == value_at(defaults, path):
                kept[path] = list(values)
        except KeyError:
            pass
    return kept


def descriptor_name(options: "FitOptions") -> str:
    """A short name of the descriptor settings of ``options`` (a candidate's descriptor cache)."""
    settings = json.dumps([options.descriptor, options.hypers, options.descriptor_options], sort_keys=True)
    return hashlib.sha1(settings.encode()).hexdigest()[:12]


@dataclasses.dataclass
class Trial:
    """One candidate of the search: what differs from the requested options, and how it scored."""

    changes: Dict[str, Any]
    score: float  # the best held-out (or validation) loss per structure
    rmse_percent: float
    regularisation: float
    seconds: float


def score(record: Dict[str, Any]) -> Tuple[float, float]:
    """``(loss per structure, % RMSE)`` of a solve's chosen strength: held-out
    (cross-validation) or validation; NaN when it chose without either."""
    row = next(r for r in record["grid"] if r["regularisation"] == record["regularisation"])
    kind = "val" if record["selection"] == "validation" else "cv"
    return row[f"{kind}_loss"], row[f"{kind}_rmse_percent"]


def search(options: "FitOptions", space: Dict[str, List[Any]],
           solve: Callable[["FitOptions"], Tuple[Any, Dict[str, Any]]]):
    """Run the coordinate search (module docstring) and return the best candidate's
    ``(model, record)``, the record with ``search`` added (``search.chosen``: what
    differs from ``options``).

    Parameters
    ----------
    options : FitOptions
        The requested options (the first candidate).
    space : dict
        The alternatives to try (:func:`applicable_space` of ``options``).
    solve : callable
        ``solve(candidate_options) -> (model, solve record)``: prepares and solves
        one candidate (:func:`rholearn.solve.solve_linear`'s record).
    """
    budget = options.search.seconds
    start = time.perf_counter()
    best_options, best_changes = options, {}
    best_model, best_record, best_score = None, None, float("nan")
    trials: List[Trial] = []
    skipped: List[Dict[str, Any]] = []
    slowest = 0.0
    candidates = [(None, None)] + [(path, value) for path, values in space.items() for value in values]
    for path, value in candidates:
        changes = dict(best_changes) if path is None else {**best_changes, path: value}
        if path is not None:
            fits = time.perf_counter() - start + slowest <= budget
            if not distributed.broadcast_object(fits):  # process 0's clock decides for all
                skipped.append({path: value})
                continue
        candidate = options if path is None else with_value(best_options, path, value)
        began = time.perf_counter()
        model, record = solve(candidate)
        loss, rmse = score(record)
        trial = Trial(changes, loss, rmse, record["regularisation"], time.perf_counter() - began)
        trials.append(trial)
        slowest = max(slowest, trial.seconds)
        LOGGER.info(f"search: {_describe(changes)}: {'CV' if record['selection'] != 'validation' else 'validation'}"
                    f" RMSE {rmse:.4g} % at regularisation {trial.regularisation:g} ({trial.seconds:.1f} s)")
        if best_record is None or loss < best_score:
            best_options, best_changes = candidate, changes
            best_model, best_record, best_score = model, record, loss
        if best_record["selection"] not in ("cross-validation", "validation"):
            break  # nothing to compare candidates by
    best_record["search"] = {
        "space": space, "seconds": budget, "spent_seconds": time.perf_counter() - start,
        "trials": [dataclasses.asdict(trial) for trial in trials], "chosen": best_changes,
        "skipped": skipped,
    }
    if len(trials) > 1 or skipped:
        LOGGER.info(f"search: kept {_describe(best_changes)} ({len(trials)} "
                    f"candidate{'s' if len(trials) > 1 else ''} in "
                    f"{best_record['search']['spent_seconds']:.1f} s"
                    + (f"; {len(skipped)} left out for search.seconds = {budget:g}" if skipped else "") + ")")
    return best_model, best_record


def _describe(changes: Dict[str, Any]) -> str:
    return ", ".join(f"{path} = {value}" for path, value in changes.items()) or "the requested options"
