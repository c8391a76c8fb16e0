"""`rholearn defaults`, `rholearn train options.yaml -r key=value`, `rholearn export`:
options defined once, expanded into the run folder, bad options named before any work."""

import os

import ase.io
import pytest
import yaml
from metatomic.torch import load_atomistic_model

from rhocalc import cli as rhocalc_cli
from rhocalc.structures import distorted_waters
from rholearn import __version__, cli, workflow
from rholearn.descriptors import DEFAULT_HYPERS
from rholearn.export import OUTPUT_NAME
from rholearn.options import from_dict, to_dict

FAST = ["--xc", "HF", "--basis", "sto-3g", "--auxbasis", "def2-universal-jfit", "--quiet"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-options")
    structures = str(root / "waters.xyz")
    ase.io.write(structures, distorted_waters(6, seed=3))
    out = str(root / "dataset")
    assert rhocalc_cli.main(["pyscf", structures, "--out", out, *FAST]) == 0
    return out


def test_defaults_are_the_python_defaults(capsys):
    assert cli.main(["defaults"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data.pop("dataset") == "dataset" and data.pop("run") is None  # runs/DATE/TIME
    assert to_dict(from_dict(workflow.FitOptions, data)) == to_dict(workflow.FitOptions())


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_train_from_an_options_file(dataset, tmp_path, capsys):
    run = str(tmp_path / "run")
    options = tmp_path / "options.yaml"
    options.write_text(
        f"dataset: {dataset}\nrun: {run}\nn_train: 4\nn_val: 1\n"
        "hypers:\n  cutoff:\n    radius: 3.0\n"
    )
    assert cli.main(["train", str(options), "-r", "split_seed=2", "--solve.regularisation", "1e-6"]) == 0
    with open(os.path.join(run, workflow.OPTIONS_FILE)) as f:
        expanded = yaml.safe_load(f)
    assert expanded["dataset"] == dataset and expanded["split_seed"] == 2
    assert expanded["solve"]["regularisation"] == 1e-6
    # partial hypers are merged into the defaults, and the run records all of them
    assert expanded["hypers"]["cutoff"]["radius"] == 3.0
    assert expanded["hypers"]["basis"] == DEFAULT_HYPERS["basis"]
    # the model's and descriptor's own options are written out with their defaults
    assert expanded["model_options"]["n_references"] == 100 and expanded["model_options"]["zeta"] == 2.0
    assert "n_channels" in expanded["descriptor_options"]
    assert os.path.exists(os.path.join(run, workflow.MODEL_FILE))

    # the run folder's options reproduce it: a copy with another run folder trains the same
    again = str(tmp_path / "again")
    assert cli.main(["train", os.path.join(run, workflow.OPTIONS_FILE), "--run", again]) == 0
    with open(os.path.join(again, workflow.OPTIONS_FILE)) as f:
        assert {**yaml.safe_load(f), "run": run} == expanded

    exported = str(tmp_path / "exported.pt")
    assert cli.main(["export", run, "--out", exported]) == 0
    loaded = load_atomistic_model(exported)
    assert OUTPUT_NAME in loaded.capabilities().outputs
    assert loaded.capabilities().atomic_types == [1, 8]


@pytest.mark.parametrize(
    "extra, culprit",
    [
        (["-r", "train.epoch=3"], "train.epoch"),
        (["-r", "n_train=many"], "n_train"),
        (["--model", "forest"], "forest"),
        (["-r", "notakey"], "key=value"),
        (["--solve.regularisation", "[1, x]"], "regularisation"),
        (["-r", "model_options.zetta=3"], "model_options.zetta"),
        (["--model", "linear", "-r", "model_options.zeta=3"], "model_options.zeta"),
    ],
)
def test_bad_options_are_named_before_any_work(dataset, tmp_path, capsys, extra, culprit):
    run = tmp_path / "run"
    assert cli.main(["train", dataset, "--run", str(run), *extra]) == 2
    error = capsys.readouterr().err
    assert culprit in error and len(error.strip().splitlines()) == 1
    assert not run.exists()


def test_a_run_folder_given_as_the_source_resumes(dataset, tmp_path, capsys):
    """`rholearn train RUN --resume` resumes RUN with its recorded options (also once the
    folder moved); without --resume or --overwrite, one line says what to type."""
    run = str(tmp_path / "run")
    assert cli.main(["train", dataset, "--run", run, "--n-train", "4", "--n-val", "1"]) == 0
    capsys.readouterr()
    assert cli.main(["train", run]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"'{run}' is a run folder, not a dataset" in error
    assert f"rholearn train {run} --resume" in error
    moved = str(tmp_path / "moved")
    os.rename(run, moved)
    assert cli.main(["train", moved, "--resume"]) == 0
    assert f"model: {os.path.join(moved, workflow.MODEL_FILE)}" in capsys.readouterr().out
    with open(os.path.join(moved, workflow.OPTIONS_FILE)) as f:
        resumed = yaml.safe_load(f)
    assert resumed["run"] == moved and resumed["n_train"] == 4 and resumed["dataset"] == dataset
    assert cli.main(["train", moved, "--overwrite", "--n-train", "3"]) == 0
    with open(os.path.join(moved, workflow.SPLIT_FILE)) as f:
        assert len(yaml.safe_load(f)["train"]) == 3
    assert cli.main(["train", dataset, "--resume"]) == 2
    assert "rholearn train RUN --resume" in capsys.readouterr().err


def test_bad_options_file_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [unclosed\n")
    assert cli.main(["train", str(bad)]) == 2
    assert "bad.yaml" in capsys.readouterr().err
    assert cli.main(["train", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml" in capsys.readouterr().err


def test_split_as_fractions_or_a_file(dataset, tmp_path):
    run = str(tmp_path / "fractions")
    assert cli.main(["train", dataset, "--run", run, "--n-train", "0.5", "--n-val", "0.2"]) == 0
    with open(os.path.join(run, workflow.SPLIT_FILE)) as f:
        split = yaml.safe_load(f)
    assert [len(split[name]) for name in ("train", "val", "test")] == [3, 1, 2]

    chosen = {"train": [5, 0, 2], "val": [1], "test": [3, 4]}
    split_file = tmp_path / "split.yaml"
    split_file.write_text(yaml.safe_dump(chosen))
    run = str(tmp_path / "from-file")
    assert cli.main(["train", dataset, "--run", run, "--split-file", str(split_file)]) == 0
    with open(os.path.join(run, workflow.SPLIT_FILE)) as f:
        assert yaml.safe_load(f) == {name: sorted(v) for name, v in chosen.items()}


def test_bad_split_options_are_named(dataset, tmp_path, capsys):
    assert cli.main(["train", dataset, "--run", str(tmp_path / "r"), "--n-train", "1.5"]) == 2
    assert "n_train" in capsys.readouterr().err
    assert cli.main(["train", dataset, "--run", str(tmp_path / "r"),
                     "--split-file", str(tmp_path / "nowhere.json")]) == 2
    assert "nowhere.json" in capsys.readouterr().err


def test_written_defaults_switch_model_with_one_override(capsys):
    """`rholearn defaults` writes the kernel's model_options; `-r model=linear` on that
    file drops them (they are the kernel's defaults), a changed one is refused."""
    assert cli.main(["defaults"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    for name in ("dataset", "run"):
        data.pop(name)
    for model, solver, options in (("linear", "direct", {"seed": 0}),
                                   ("nonlinear", "gradient", {"hidden_sizes": [64], "width": 32,
                                                              "seed": 0})):
        switched = from_dict(workflow.FitOptions, {**data, "model": model, "solver": solver})
        assert switched.model_options == options
    data["model_options"]["n_references"] = 7
    with pytest.raises(ValueError, match="model_options.n_references"):
        from_dict(workflow.FitOptions, {**data, "model": "linear"})


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "export", "defaults"])
def test_help_is_plain_text_with_choices_and_one_default(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    assert not any(role in text for role in (":class:", ":func:", ":data:", ":meth:", "``"))
    for empty in ("(default: None)", "(default: [])", "(default: False)"):
        assert empty not in text
    entries = []  # one per argument: its first line and the indented lines below
    for line in text.splitlines():
        if line.startswith("  ") and not line.startswith("   ") or not entries:
            entries.append(line)
        else:
            entries[-1] += " " + line.strip()
    for entry in entries:
        assert entry.replace("defaults", "").count("default") <= 1, entry
    if command == "train":
        assert "--model {kernel,linear,nonlinear}" in text
        assert "--solver {direct,gradient}" in text
