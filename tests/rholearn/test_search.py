"""The hyper search: it keeps the candidate with the lowest cross-validation loss, the
kept model is the one a fit with those options gives, it keeps to its time budget, leaves
hand-set hypers alone and refuses paths that are not options."""

import json
import os

import pytest
import torch

from rholearn import workflow
from rholearn.dataset import read_dataset
from rholearn.models import DensityModel
from rholearn.workflow.search import SearchOptions, applicable_space, descriptor_name

from small_setup import HYPERS, water_dataset


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return read_dataset(water_dataset(str(tmp_path_factory.mktemp("waters")), 10, seed=5))


def solve_record(run_dir):
    with open(os.path.join(run_dir, workflow.SOLVE_FILE)) as f:
        return json.load(f)


def test_the_search_keeps_the_candidate_with_the_lowest_cross_validation_loss(folder, tmp_path):
    split = {"train": folder.indices[:7], "val": [], "test": folder.indices[7:]}
    space = {"model_options.zeta": [1.0, 3.0]}
    options = workflow.FitOptions(hypers=HYPERS, search=SearchOptions(space=space, seconds=1e6))
    result = workflow.fit(folder.root, str(tmp_path / "search"), options, split=split)
    record = solve_record(result.run_dir)
    trials = record["search"]["trials"]
    assert [t["changes"] for t in trials][:2] == [{}, {"model_options.zeta": 1.0}]
    assert len(trials) == 3 and record["search"]["skipped"] == []
    best = min(trials, key=lambda t: t["score"])
    assert record["search"]["chosen"] == best["changes"]
    assert record["regularisation"] == best["regularisation"]
    kept = {"model_options.zeta": 2.0, **best["changes"]}["model_options.zeta"]
    assert result.model.net.features.zeta == kept
    # the row of the chosen strength is the kept candidate's score
    row = next(r for r in record["grid"] if r["regularisation"] == record["regularisation"])
    assert row["cv_loss"] == pytest.approx(best["score"], rel=1e-12)
    with open(os.path.join(result.run_dir, "train.log")) as f:
        log = f.read()
    assert log.count("search: ") == len(trials) + 1  # one line per candidate, one for the choice
    # the kept model is the one a fit with the chosen options gives, and the one saved
    chosen = workflow.FitOptions(hypers=HYPERS, model_options={"zeta": kept},
                                 search=SearchOptions(seconds=0))
    again = workflow.fit(folder.root, str(tmp_path / "again"), chosen, split=split)
    assert "search" not in solve_record(again.run_dir)
    frames = [folder.frames[i] for i in split["test"]]
    reloaded = DensityModel.load(os.path.join(result.run_dir, workflow.MODEL_FILE))
    for key, block in again.model.predict(frames).items():
        torch.testing.assert_close(reloaded.predict(frames).block(key).values, block.values,
                                   rtol=1e-9, atol=1e-12)


def test_a_candidate_with_other_descriptors_has_its_own_cache(folder, tmp_path):
    split = {"train": folder.indices[:4], "val": [], "test": folder.indices[4:6]}
    space = {"hypers.cutoff.radius": [3.5]}
    options = workflow.FitOptions(hypers=HYPERS, search=SearchOptions(space=space, seconds=1e6))
    result = workflow.fit(folder.root, str(tmp_path / "run"), options, split=split)
    assert len(solve_record(result.run_dir)["search"]["trials"]) == 2
    candidate = workflow.FitOptions(hypers={**HYPERS, "cutoff": {**HYPERS["cutoff"], "radius": 3.5}})
    cache = os.path.join(result.run_dir, "descriptors_search", descriptor_name(candidate))
    assert len([name for name in os.listdir(cache) if name.endswith(".mts")]) == 4
    assert len([n for n in os.listdir(os.path.join(result.run_dir, "descriptors")) if n.endswith(".mts")]) == 4


def test_the_search_keeps_to_its_time_budget(folder, tmp_path):
    split = {"train": folder.indices[:4], "val": [], "test": folder.indices[4:6]}
    space = {"model_options.zeta": [1.0, 3.0]}
    options = workflow.FitOptions(hypers=HYPERS, search=SearchOptions(space=space, seconds=1e-9))
    result = workflow.fit(folder.root, str(tmp_path / "run"), options, split=split)
    search = solve_record(result.run_dir)["search"]
    assert [t["changes"] for t in search["trials"]] == [{}]  # the requested options always run
    assert search["skipped"] == [{"model_options.zeta": 1.0}, {"model_options.zeta": 3.0}]
    assert result.model.net.features.zeta == 2.0


def test_the_default_search_leaves_hand_set_hypers_alone():
    assert applicable_space(workflow.FitOptions()) == {"model_options.zeta": [1.0]}
    assert applicable_space(workflow.FitOptions(model_options={"zeta": 3.0})) == {}
    assert applicable_space(workflow.FitOptions(model="linear")) == {}  # it has no zeta


def test_search_paths_that_are_not_options_are_refused():
    with pytest.raises(ValueError, match="'cutoff.radius' is not a path into one of"):
        SearchOptions(space={"cutoff.radius": [5.0]})
    with pytest.raises(ValueError, match="non-empty list"):
        SearchOptions(space={"hypers.cutoff.radius": []})
    with pytest.raises(ValueError, match="seconds must be >= 0"):
        SearchOptions(seconds=-1.0)
    typo = workflow.FitOptions(search=SearchOptions(space={"hypers.cutof.radius": [5.0]}))
    with pytest.raises(ValueError, match="'hypers.cutof.radius' = 5.0: unknown option 'hypers.cutof'"):
        applicable_space(typo)
    linear = workflow.FitOptions(model="linear", search=SearchOptions(space={"model_options.zeta": [3.0]}))
    with pytest.raises(ValueError, match="'model_options.zeta' = 3.0: unknown option"):
        applicable_space(linear)
