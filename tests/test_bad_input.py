"""Bad input to the command-line tools: exit code 2 and one line on stderr naming
the culprit (file, structure, atoms, setting), never a traceback. Each case
calls the tool's ``main(argv)`` in this process, on real files."""

import json
import os
import shutil

import ase
import ase.io
import numpy as np
import pytest
import torch

from rholearn import cli as rholearn_cli
from rholearn import layout, workflow
from rholearn.workflow.fitting import _split
from rholearn.models import DensityModel
from rholearn.train import LAST_CHECKPOINT
from rhocalc import cli as rhocalc_cli
from rhocalc.structures import distorted_waters

FAST = ["--xc", "HF", "--basis", "sto-3g", "--auxbasis", "def2-universal-jfit", "--quiet"]
N_WATERS = 6


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A dataset of distorted waters and a run trained on it (one epoch)."""
    root = tmp_path_factory.mktemp("trained")
    structures = str(root / "waters.xyz")
    ase.io.write(structures, distorted_waters(N_WATERS, seed=2))
    dataset, run = str(root / "dataset"), str(root / "run")
    assert rhocalc_cli.main(["pyscf", structures, "--out", dataset, *FAST]) == 0
    assert rholearn_cli.main(["train", dataset, "--run", run, "--n-train", "4", "--n-val", "1",
                              "--solver", "gradient", "--train.epochs", "1"]) == 0
    return {"structures": structures, "dataset": dataset, "run": run,
            "model": os.path.join(run, workflow.MODEL_FILE)}


def write(path, frames):
    ase.io.write(str(path), frames)
    return str(path)


def a_file(path):
    path.write_text("not a folder\n")
    return str(path)


# ------------------------------------------------------------------ cases ---
# each: (tmp_path, trained) -> (tool's main, argv, text that stderr must contain)
def missing_structures(tmp, trained):
    return rhocalc_cli.main, ["pyscf", str(tmp / "nowhere.xyz"), "--out", str(tmp / "o"),
                              *FAST], "nowhere.xyz"


def out_is_a_file(tmp, trained):
    out = a_file(tmp / "taken")
    return rhocalc_cli.main, ["pyscf", trained["structures"], "--out", out, *FAST], out


def out_not_writable(tmp, trained):
    out = "/sys/rholearn-test-out"  # refused even to root
    return rhocalc_cli.main, ["pyscf", trained["structures"], "--out", out, *FAST], out


def overlapping_atoms(tmp, trained):
    atoms = ase.Atoms("OHH", positions=[[0, 0, 0], [0.96, 0, 0], [0.96, 0.1, 0]])
    structures = write(tmp / "overlap.xyz", [distorted_waters(1)[0], atoms])
    return (rhocalc_cli.main, ["pyscf", structures, "--out", str(tmp / "o"), *FAST],
            "structure 1 (H2O): atoms 1 (H) and 2 (H) are 0.100 Angstrom apart, closer than 0.3")


def odd_electrons_without_spin(tmp, trained):
    structures = write(tmp / "oh.xyz", [ase.Atoms("OH", positions=[[0, 0, 0], [0.97, 0, 0]])])
    return (rhocalc_cli.main, ["pyscf", structures, "--out", str(tmp / "o"), *FAST],
            "structure 0 (HO): 9 electrons (charge 0) cannot have spin 0")


def other_method_after_settings_deleted(tmp, trained):
    dataset = str(tmp / "dataset")
    shutil.copytree(trained["dataset"], dataset)
    os.remove(os.path.join(dataset, "settings.json"))
    arguments = ["pyscf", trained["structures"], "--out", dataset, *FAST, "--xc", "PBE"]
    return rhocalc_cli.main, arguments, "info.json' was made with other settings (xc: 'HF'"


def unknown_functional(tmp, trained):
    arguments = ["pyscf", trained["structures"], "--out", str(tmp / "o"), *FAST, "--xc", "NOPE"]
    return rhocalc_cli.main, arguments, "NOPE"


def train_missing_dataset(tmp, trained):
    return rholearn_cli.main, ["train", str(tmp / "nowhere"), "--run", str(tmp / "r")], "nowhere"


def train_run_is_a_file(tmp, trained):
    run = a_file(tmp / "run")
    return rholearn_cli.main, ["train", trained["dataset"], "--run", run, "--train.epochs", "1"], run


def train_on_cuda_without_gpu(tmp, trained):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    arguments = ["train", trained["dataset"], "--run", str(tmp / "r"), "--train.device", "cuda"]
    return rholearn_cli.main, arguments, "torch sees no GPU"


def resume_from_a_truncated_checkpoint(tmp, trained):
    run = str(tmp / "run")
    shutil.copytree(trained["run"], run)
    checkpoint = os.path.join(run, LAST_CHECKPOINT)
    with open(checkpoint, "r+b") as f:
        f.truncate(os.path.getsize(checkpoint) // 2)
    arguments = ["train", trained["dataset"], "--run", run, "--n-train", "4", "--n-val", "1",
                 "--solver", "gradient", "--train.epochs", "2", "--resume"]
    return rholearn_cli.main, arguments, f"cannot read checkpoint '{checkpoint}'"


def predict_out_is_a_file(tmp, trained):
    out = a_file(tmp / "predictions")
    return rholearn_cli.main, ["predict", trained["model"], trained["structures"], "--out",
                               out], out


def predict_into_a_dataset(tmp, trained):
    arguments = ["predict", trained["model"], trained["structures"], "--out", trained["dataset"]]
    return rholearn_cli.main, arguments, f"'{trained['dataset']}' holds a dataset"


def predict_with_a_missing_model(tmp, trained):
    model = str(tmp / "nowhere.pt")
    return rholearn_cli.main, ["predict", model, trained["structures"], "--out",
                               str(tmp / "p")], model


def predict_with_a_model_of_another_format(tmp, trained):
    model = str(tmp / "model.pt")
    state = torch.load(trained["model"], weights_only=True)
    torch.save({**state, "format": "rholearn.DensityModel/99"}, model)
    return (rholearn_cli.main, ["predict", model, trained["structures"], "--out", str(tmp / "p")],
            "rholearn.DensityModel/99")


def evaluate_a_missing_run(tmp, trained):
    return rholearn_cli.main, ["evaluate", str(tmp / "nowhere")], "nowhere"


CASES = [
    missing_structures, out_is_a_file, out_not_writable, overlapping_atoms,
    odd_electrons_without_spin, other_method_after_settings_deleted, unknown_functional,
    train_missing_dataset, train_run_is_a_file, train_on_cuda_without_gpu,
    resume_from_a_truncated_checkpoint, predict_out_is_a_file, predict_into_a_dataset,
    predict_with_a_missing_model, predict_with_a_model_of_another_format,
    evaluate_a_missing_run,
]


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_bad_input_exits_2_with_one_line_naming_the_culprit(case, trained, tmp_path, capsys):
    main, arguments, culprit = case(tmp_path, trained)
    capsys.readouterr()
    assert main(arguments) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    (error,) = [line for line in stderr.splitlines() if "error:" in line]  # one line
    assert culprit in error


# ------------------------------------------------------------ what works ---
def test_train_with_only_n_train_defaults_the_other_sizes(trained, tmp_path):
    run = str(tmp_path / "run")
    assert rholearn_cli.main(["train", trained["dataset"], "--run", run, "--n-train", "3",
                              "--train.epochs", "1"]) == 0
    with open(os.path.join(run, workflow.SPLIT_FILE)) as f:
        split = json.load(f)
    # 10 % of 6 rounds to 0 validation structures; the rest is the test set
    assert [len(split[name]) for name in workflow.SUBSETS] == [3, 0, N_WATERS - 3]
    sizes = _split(range(100), workflow.FitOptions(n_train=10))
    assert [len(subset) for subset in sizes] == [10, 10, 80]
    sizes = _split(range(100), workflow.FitOptions(n_val=30))
    assert [len(subset) for subset in sizes] == [70, 30, 0]


def test_predict_replaces_earlier_predictions_as_a_whole(trained, tmp_path, capsys):
    out = str(tmp_path / "predictions")
    arguments = ["predict", trained["model"], trained["structures"], "--out", out]
    assert rholearn_cli.main([*arguments, "--index", "0:3", "--cube", "--spacing", "0.5"]) == 0
    assert sorted(os.listdir(out)) == ["water-0", "water-1", "water-2"]  # atoms.info["name"]
    assert os.path.exists(os.path.join(out, "water-0", "density.cube"))
    capsys.readouterr()

    assert rholearn_cli.main([*arguments, "--index", "4"]) == 0
    assert "replaced the 3 earlier prediction folder(s)" in capsys.readouterr().out
    assert os.listdir(out) == ["water-4"]  # no stale folder, cube or temporary file
    assert sorted(os.listdir(os.path.join(out, "water-4"))) == [
        layout.COEFFICIENTS_FILE, workflow.PREDICTION_INFO_FILE]
    predicted = layout.load(os.path.join(out, "water-4", layout.COEFFICIENTS_FILE))
    model = DensityModel.load(trained["model"])
    expected = model.predict([ase.io.read(trained["structures"], 4)], [0])
    for key, block in expected.items():
        selection = {name: int(value) for name, value in zip(key.names, key.values)}
        assert np.array_equal(predicted.block(selection).values, block.values.detach().numpy())


def test_train_removes_what_a_killed_run_left(trained, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)
    stale = [os.path.join(run, ".tmp-4242-model.pt"),
             os.path.join(run, "descriptors", ".tmp-4242-0.mts")]
    for path in stale:
        with open(path, "w") as f:
            f.write("partial")
    assert rholearn_cli.main(["train", trained["dataset"], "--run", run, "--n-train", "4",
                              "--n-val", "1", "--solver", "gradient", "--train.epochs", "1",
                              "--resume"]) == 0
    assert not any(os.path.exists(path) for path in stale)
