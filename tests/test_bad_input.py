"""Bad input to the command-line tools: exit code 2 and one line on stderr naming
the culprit (file, structure, atoms, setting), never a traceback. Each case
calls the tool's ``main(argv)`` in this process, on real files."""

import csv
import fcntl
import json
import os
import shutil

import ase
import ase.build
import ase.io
import ase.io.cube
import ase.units
import metatensor
import numpy as np
import pytest
import torch
import yaml

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


def visible(folder):
    """The entries of a folder a user sees (not its lock file)."""
    return sorted(name for name in os.listdir(folder) if not name.startswith("."))


def snapshot(folder):
    """Every file under ``folder`` (lock file aside) and its bytes."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if name != ".lock":
                with open(path, "rb") as f:
                    files[os.path.relpath(path, folder)] = f.read()
    return files


def copied_run(tmp, trained):
    """A copy of the trained run (its options.yaml names the copy's folder, as a
    run trained there would)."""
    run = str(tmp / "run")
    shutil.copytree(trained["run"], run)
    options = os.path.join(run, "options.yaml")
    with open(options) as f:
        text = f.read()
    with open(options, "w") as f:
        f.write(text.replace(f"run: {trained['run']}", f"run: {run}"))
    return run


def unchanged(folder):
    """A check that nothing under ``folder`` changed (nothing written, nothing lost)."""
    before = snapshot(folder)

    def check():
        assert snapshot(folder) == before, f"'{folder}' changed"
    return check


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


def resume_with_another_optimizer(tmp, trained):
    run = copied_run(tmp, trained)
    arguments = ["train", os.path.join(run, "options.yaml"), "--resume",
                 "--train.optimizer", "lbfgs"]
    return (rholearn_cli.main, arguments, "train.optimizer: 'adam' there, 'lbfgs' now",
            unchanged(run))


def resume_with_another_dtype(tmp, trained):
    run = copied_run(tmp, trained)
    arguments = ["train", os.path.join(run, "options.yaml"), "--resume", "-r",
                 "train.dtype=float32"]
    return (rholearn_cli.main, arguments, "train.dtype: 'float64' there, 'float32' now",
            unchanged(run))


def resume_without_a_run_folder(tmp, trained):
    return rholearn_cli.main, ["train", trained["dataset"], "--resume"], "--resume needs the run"


def resume_and_overwrite(tmp, trained):
    run = copied_run(tmp, trained)
    arguments = ["train", os.path.join(run, "options.yaml"), "--resume", "--overwrite"]
    return rholearn_cli.main, arguments, "--resume and --overwrite exclude", unchanged(run)


def train_into_an_existing_run(tmp, trained):
    """Refused before any work: no descriptors computed, no banner in train.log."""
    run = copied_run(tmp, trained)
    shutil.rmtree(os.path.join(run, "descriptors"))
    arguments = ["train", trained["dataset"], "--run", run, "--solver", "gradient"]
    return rholearn_cli.main, arguments, f"'{run}' already holds a run", unchanged(run)


def train_into_a_run_in_use(tmp, trained):
    """Another process holds the run (as a second ``rholearn train`` would)."""
    run = copied_run(tmp, trained)
    lock = open(os.path.join(run, ".lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    check = unchanged(run)
    arguments = ["train", os.path.join(run, "options.yaml"), "--resume", "--train.epochs", "2"]
    return (rholearn_cli.main, arguments, f"another process is using the run folder '{run}'",
            lambda: (check(), lock.close()))


def train_into_the_dataset(tmp, trained):
    dataset = str(tmp / "dataset")
    shutil.copytree(trained["dataset"], dataset)
    arguments = ["train", dataset, "--run", dataset]
    return (rholearn_cli.main, arguments, f"run folder '{dataset}' is inside the dataset",
            unchanged(dataset))


def train_inside_the_dataset(tmp, trained):
    dataset = str(tmp / "dataset")
    shutil.copytree(trained["dataset"], dataset)
    arguments = ["train", dataset, "--run", os.path.join(dataset, "0", "run")]
    return rholearn_cli.main, arguments, "is inside the dataset folder", unchanged(dataset)


def train_into_another_dataset(tmp, trained):
    arguments = ["train", trained["dataset"], "--run", str(tmp)]
    shutil.copytree(trained["dataset"], str(tmp), dirs_exist_ok=True)
    return rholearn_cli.main, arguments, f"run folder '{tmp}' holds a dataset", unchanged(tmp)


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


def evaluate_a_run_in_use(tmp, trained):
    """A training run (or another evaluation) holds the run folder."""
    run = copied_run(tmp, trained)
    lock = open(os.path.join(run, ".lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    check = unchanged(run)
    return (rholearn_cli.main, ["evaluate", run, "--no-real-space"],
            f"another process is using the run folder '{run}'", lambda: (check(), lock.close()))


CASES = [
    missing_structures, out_is_a_file, out_not_writable, overlapping_atoms,
    odd_electrons_without_spin, other_method_after_settings_deleted, unknown_functional,
    train_missing_dataset, train_run_is_a_file, train_on_cuda_without_gpu,
    resume_from_a_truncated_checkpoint, resume_with_another_optimizer, resume_with_another_dtype,
    resume_without_a_run_folder, resume_and_overwrite, train_into_an_existing_run,
    train_into_a_run_in_use, train_into_the_dataset, train_inside_the_dataset,
    train_into_another_dataset, predict_out_is_a_file, predict_into_a_dataset,
    predict_with_a_missing_model, predict_with_a_model_of_another_format,
    evaluate_a_missing_run, evaluate_a_run_in_use,
]


# ---------------------------------- prediction folders, inputs taken silently ---
def prediction(tmp, trained, index=":"):
    """``tmp/predictions`` holding a prediction of the trained model."""
    out = str(tmp / "predictions")
    assert rholearn_cli.main(["predict", trained["model"], trained["structures"], "--out", out,
                              "--index", index]) == 0
    return out


def nothing_at(path):
    def check():
        assert not os.path.exists(path), f"'{path}' was written"
    return check


def predict_over_a_folder_it_did_not_write(tmp, trained):
    out = str(tmp / "work")
    os.makedirs(os.path.join(out, "water-0"))
    a_file(tmp / "work" / "water-0" / "notes.txt")
    arguments = ["predict", trained["model"], trained["structures"], "--out", out]
    culprit = f"'{os.path.join(out, 'water-0')}' is a folder not written by rholearn predict"
    return rholearn_cli.main, arguments, culprit, unchanged(out)


def predict_over_a_symlink(tmp, trained):
    """A symlink where a structure's folder goes: refused before anything is
    replaced, the earlier prediction and the link's target kept."""
    out = prediction(tmp, trained, "0:3")
    elsewhere = str(tmp / "elsewhere")
    os.rename(os.path.join(out, "water-1"), elsewhere)
    os.symlink(elsewhere, os.path.join(out, "water-1"))
    check_out, check_elsewhere = unchanged(out), unchanged(elsewhere)
    arguments = ["predict", trained["model"], trained["structures"], "--out", out]
    return (rholearn_cli.main, arguments, f"'{os.path.join(out, 'water-1')}' is a symlink",
            check_out, check_elsewhere)


def predict_while_another_prediction_writes(tmp, trained):
    out = prediction(tmp, trained, "0")
    lock = open(os.path.join(out, ".lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    check = unchanged(out)
    arguments = ["predict", trained["model"], trained["structures"], "--out", out]
    return (rholearn_cli.main, arguments, f"another prediction is writing into '{out}'",
            lambda: (check(), lock.close()))


def predict_non_finite_positions(tmp, trained):
    frames = distorted_waters(2)
    frames[1].positions[2, 1] = np.nan
    out = str(tmp / "p")
    arguments = ["predict", trained["model"], write(tmp / "nan.xyz", frames), "--out", out]
    return (rholearn_cli.main, arguments,
            "structure 1 ('water-1'): atom 2 (H) has a non-finite position", nothing_at(out))


def predict_overlapping_atoms(tmp, trained):
    frames = distorted_waters(2)
    frames[0].positions[1] = frames[0].positions[0] + [0.05, 0, 0]
    out = str(tmp / "p")
    arguments = ["predict", trained["model"], write(tmp / "close.xyz", frames), "--out", out]
    return (rholearn_cli.main, arguments, "structure 0 ('water-0'): atoms 0 (O) and 1 (H) are "
            "0.050 Angstrom apart, closer than 0.3", nothing_at(out))


def predict_a_cube_with_a_negative_spacing(tmp, trained):
    out = str(tmp / "p")
    arguments = ["predict", trained["model"], trained["structures"], "--out", out, "--cube",
                 "--spacing", "-0.1"]
    return (rholearn_cli.main, arguments, "cube spacing must be a length > 0 (Angstrom), got -0.1",
            nothing_at(out))


def predict_a_cube_too_large(tmp, trained):
    out = str(tmp / "p")
    arguments = ["predict", trained["model"], trained["structures"], "--out", out, "--cube",
                 "--spacing", "0.001"]
    return (rholearn_cli.main, arguments, "structure 0 ('water-0'): a cube of spacing 0.001 "
            "Angstrom would have", nothing_at(out))


def fractional_charge(tmp, trained):
    water = distorted_waters(1)[0]
    water.info["charge"] = 0.5
    out = str(tmp / "o")
    arguments = ["pyscf", write(tmp / "half.xyz", [water]), "--out", out, *FAST]
    return (rhocalc_cli.main, arguments, "structure 0 (water-0): atoms.info['charge'] = 0.5 is "
            "not an integer", nothing_at(out))


def no_electrons(tmp, trained):
    proton = ase.Atoms("H", info={"charge": 1})
    out = str(tmp / "o")
    arguments = ["pyscf", write(tmp / "proton.xyz", [distorted_waters(1)[0], proton]), "--out",
                 out, *FAST]
    return rhocalc_cli.main, arguments, "structure 1 (H): 0 electrons", nothing_at(out)


def non_finite_positions(tmp, trained):
    frames = distorted_waters(2)
    frames[1].positions[0, 0] = np.inf
    out = str(tmp / "o")
    arguments = ["pyscf", write(tmp / "inf.xyz", frames), "--out", out, *FAST]
    return (rhocalc_cli.main, arguments, "structure 1 (water-1): atom 0 (O) has a non-finite "
            "position", nothing_at(out))


def copied_dataset(tmp, trained):
    dataset = str(tmp / "dataset")
    shutil.copytree(trained["dataset"], dataset)
    return dataset


def train_on_overlaps_lacking_a_block(tmp, trained):
    """Without the O s-s block the overlap is not a metric (the loss can go negative)."""
    dataset = copied_dataset(tmp, trained)
    for index in range(N_WATERS):
        path = os.path.join(dataset, str(index), layout.OVERLAP_FILE)
        overlap = metatensor.load(path)
        kept = [i for i, key in enumerate(overlap.keys) if list(key.values) != [0, 0, 8, 8]]
        keys = metatensor.Labels(overlap.keys.names, overlap.keys.values[kept])
        metatensor.save(path, metatensor.TensorMap(keys, [overlap.block(i).copy() for i in kept]))
    arguments = ["train", dataset, "--run", str(tmp / "r"), "--n-train", "4", "--n-val", "1"]
    return (rholearn_cli.main, arguments, "/overlap.mts': atom pair (0, 0) is in 24 blocks, its "
            "elements' l pairs make 25: an incomplete overlap", unchanged(dataset))


def train_with_an_element_only_in_validation(tmp, trained):
    methane = ase.build.molecule("CH4")
    structures = write(tmp / "mixed.xyz", [*distorted_waters(3), methane])
    dataset = str(tmp / "mixed")
    assert rhocalc_cli.main(["pyscf", structures, "--out", dataset, *FAST]) == 0
    split = tmp / "split.json"
    split.write_text(json.dumps({"train": [0, 1], "val": [3], "test": [2]}))
    arguments = ["train", dataset, "--run", str(tmp / "r"), "--split-file", str(split)]
    return (rholearn_cli.main, arguments, "element(s) ['C'] of "
            f"'{dataset}' are only in validation or test structures (C in structures [3])",
            nothing_at(str(tmp / "r")))


def train_on_a_shortened_structures_file(tmp, trained):
    dataset = copied_dataset(tmp, trained)
    path = os.path.join(dataset, layout.STRUCTURES_FILE)
    ase.io.write(path, ase.io.read(path, ":4"))
    arguments = ["train", dataset, "--run", str(tmp / "r")]
    return (rholearn_cli.main, arguments, f"'{path}' holds 4 structures, but '{dataset}' has "
            "structure folders [4, 5] beyond them", nothing_at(str(tmp / "r")))


def split_file(tmp, trained, split):
    path = tmp / "split.json"
    path.write_text(json.dumps(split))
    arguments = ["train", trained["dataset"], "--run", str(tmp / "r"), "--split-file", str(path)]
    return rholearn_cli.main, arguments


def split_with_a_duplicate_index(tmp, trained):
    return (*split_file(tmp, trained, {"train": [0, 1, 1], "val": [2]}),
            f"split '{tmp / 'split.json'}': structure 1 is twice in 'train'",
            nothing_at(str(tmp / "r")))


def split_with_overlapping_subsets(tmp, trained):
    return (*split_file(tmp, trained, {"train": [0, 1, 2], "val": [3], "test": [2, 4]}),
            f"split '{tmp / 'split.json'}': structure 2 is in 'train' and in 'test'",
            nothing_at(str(tmp / "r")))


def split_with_a_non_integer_index(tmp, trained):
    return (*split_file(tmp, trained, {"train": [0, 1.5], "val": [2]}),
            f"split '{tmp / 'split.json'}': 'train' holds 1.5, not a structure index",
            nothing_at(str(tmp / "r")))


def options_with_nested_aliases(tmp, trained):
    """A 'billion laughs' file: refused at its first alias, not expanded."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for name, previous in zip("bcdefghi", "abcdefgh"):
        lines.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]")
    options = tmp / "options.yaml"
    options.write_text("\n".join([f"dataset: {trained['dataset']}", *lines]) + "\n")
    return (rholearn_cli.main, ["train", str(options), "--run", str(tmp / "r")],
            "alias '*a': rholearn options take no YAML aliases", nothing_at(str(tmp / "r")))


def hypers_with_a_zero_cutoff(tmp, trained):
    """featomic hangs on a zero cutoff: refused before it is called."""
    arguments = ["train", trained["dataset"], "--run", str(tmp / "r"),
                 "-r", "hypers.cutoff.radius=0"]
    return (rholearn_cli.main, arguments, "option 'hypers.cutoff.radius' must be a length > 0",
            nothing_at(str(tmp / "r")))


def hypers_that_featomic_refuses(tmp, trained):
    arguments = ["train", trained["dataset"], "--run", str(tmp / "r"),
                 "-r", "hypers.density.type=Bogus"]
    return (rholearn_cli.main, arguments, "option 'hypers.density.type': featomic's "
            "SphericalExpansion refuses these hypers: json error: unknown variant `Bogus`",
            nothing_at(str(tmp / "r")))


def evaluate_on_a_grid_level_too_fine(tmp, trained):
    run = copied_run(tmp, trained)
    return (rholearn_cli.main, ["evaluate", run, "--grid-level", "10"],
            "grid level 10 is not one of the pyscf backend's levels, 0 (coarse) to 9 (fine)",
            nothing_at(os.path.join(run, "evaluation_test")))


def evaluate_on_a_negative_grid_level(tmp, trained):
    run = copied_run(tmp, trained)
    return (rholearn_cli.main, ["evaluate", run, "--grid-level", "-1"],
            "grid level -1 is not one of the pyscf backend's levels",
            nothing_at(os.path.join(run, "evaluation_test")))


def train_that_diverges(tmp, trained):
    arguments = ["train", trained["dataset"], "--run", str(tmp / "r"), "--solver", "gradient",
                 "--n-train", "4", "--n-val", "1", "--train.epochs", "5",
                 "--train.learning-rate", "1e8"]
    return rholearn_cli.main, arguments, "training diverged: the training loss"


CASES += [
    predict_over_a_folder_it_did_not_write, predict_over_a_symlink,
    predict_while_another_prediction_writes, predict_non_finite_positions,
    predict_overlapping_atoms, predict_a_cube_with_a_negative_spacing, predict_a_cube_too_large,
    fractional_charge, no_electrons, non_finite_positions, train_on_overlaps_lacking_a_block,
    train_with_an_element_only_in_validation, train_on_a_shortened_structures_file,
    split_with_a_duplicate_index, split_with_overlapping_subsets, split_with_a_non_integer_index,
    options_with_nested_aliases, hypers_with_a_zero_cutoff, hypers_that_featomic_refuses,
    evaluate_on_a_grid_level_too_fine, evaluate_on_a_negative_grid_level, train_that_diverges,
]


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_bad_input_exits_2_with_one_line_naming_the_culprit(case, trained, tmp_path, capsys):
    main, arguments, culprit, *checks = case(tmp_path, trained)
    capsys.readouterr()
    assert main(arguments) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    (error,) = [line for line in stderr.splitlines() if "error:" in line]  # one line
    assert culprit in error
    for check in checks:  # nothing written, nothing lost
        check()


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
    assert visible(out) == ["water-0", "water-1", "water-2"]  # atoms.info["name"]
    assert os.path.exists(os.path.join(out, "water-0", "density.cube"))
    capsys.readouterr()
    # what the predictions did not write stays, even a link to a prediction folder
    a_file(tmp_path / "predictions" / "notes.txt")
    os.makedirs(os.path.join(out, "mine"))
    shutil.copytree(os.path.join(out, "water-2"), str(tmp_path / "kept"))
    os.symlink(str(tmp_path / "kept"), os.path.join(out, "link"))

    assert rholearn_cli.main([*arguments, "--index", "4"]) == 0
    assert "replaced the 3 earlier prediction folder(s)" in capsys.readouterr().out
    assert visible(out) == ["link", "mine", "notes.txt", "water-4"]  # no stale folder or file
    assert os.path.isfile(os.path.join(tmp_path, "kept", layout.COEFFICIENTS_FILE))
    assert sorted(os.listdir(os.path.join(out, "water-4"))) == [
        workflow.PREDICTION_MARKER, layout.COEFFICIENTS_FILE, workflow.PREDICTION_INFO_FILE]
    predicted = layout.load(os.path.join(out, "water-4", layout.COEFFICIENTS_FILE))
    model = DensityModel.load(trained["model"])
    expected = model.predict([ase.io.read(trained["structures"], 4)], [0])
    for key, block in expected.items():
        selection = {name: int(value) for name, value in zip(key.names, key.values)}
        assert np.array_equal(predicted.block(selection).values, block.values.detach().numpy())


def test_train_removes_what_a_killed_run_left_and_nothing_outside(trained, tmp_path):
    run = copied_run(tmp_path, trained)
    stale = [os.path.join(run, ".tmp-4242-model.pt"),
             os.path.join(run, "descriptors", ".tmp-4242-0.mts")]
    for path in stale:
        with open(path, "w") as f:
            f.write("partial")
    outside = tmp_path / "mine"  # a user's folder, linked into the run
    outside.mkdir()
    (outside / ".tmp-keep").write_text("mine")
    os.symlink(outside, os.path.join(run, "linked"))
    assert rholearn_cli.main(["train", os.path.join(run, "options.yaml"), "--resume"]) == 0
    assert not any(os.path.exists(path) for path in stale)
    assert (outside / ".tmp-keep").read_text() == "mine"


def test_resume_with_a_new_learning_rate_applies_and_logs_it(trained, tmp_path):
    run = copied_run(tmp_path, trained)
    assert rholearn_cli.main(["train", os.path.join(run, "options.yaml"), "--resume",
                              "--train.epochs", "2", "--train.learning-rate", "0.001"]) == 0
    with open(os.path.join(run, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [(row["epoch"], float(row["learning_rate"])) for row in rows] == [
        ("1", 0.01), ("2", 0.001)]
    with open(os.path.join(run, "train.log")) as f:
        assert "learning rate 0.01 -> 0.001 from epoch 2" in f.read()
    with open(os.path.join(run, "options.yaml")) as f:  # the options it now runs with
        recorded = yaml.safe_load(f)["train"]
    assert (recorded["learning_rate"], recorded["epochs"]) == (0.001, 2)


def test_overwrite_starts_again_and_keeps_what_is_not_the_runs(trained, tmp_path, capsys):
    run = copied_run(tmp_path, trained)
    with open(os.path.join(run, "notes.txt"), "w") as f:
        f.write("mine")
    os.makedirs(os.path.join(run, "evaluation_test"))
    assert rholearn_cli.main(["train", trained["dataset"], "--run", run, "--n-train", "3",
                              "--n-val", "1", "--overwrite"]) == 0  # now the direct solve
    names = set(os.listdir(run))
    assert {"notes.txt", "model.pt", "solve.json", "options.yaml"} <= names
    assert not names & {"log.csv", "checkpoint_last.pt", "evaluation_test"}
    with open(os.path.join(run, "train.log")) as f:
        log = f.read()
    assert log.count("rholearn ") == 1  # one session: the old log is gone too
    assert "removed the earlier run" in log and "checkpoint_last.pt" in log
    with open(os.path.join(run, workflow.SPLIT_FILE)) as f:
        assert len(json.load(f)["train"]) == 3


def test_train_without_a_run_folder_makes_a_new_one(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    arguments = ["train", trained["dataset"], "--n-train", "3", "--n-val", "1"]
    assert rholearn_cli.main(arguments) == 0
    assert rholearn_cli.main(arguments) == 0  # within the same second, most likely
    (day,) = os.listdir("runs")
    runs = sorted(os.path.join("runs", day, name) for name in os.listdir(os.path.join("runs", day)))
    assert len(runs) == 2
    output = capsys.readouterr().out
    for run in runs:
        assert os.path.exists(os.path.join(run, workflow.MODEL_FILE))
        assert f"model: {os.path.join(run, workflow.MODEL_FILE)}" in output


def test_predict_writes_beside_the_model_by_default(trained, tmp_path, capsys):
    run = copied_run(tmp_path, trained)
    assert rholearn_cli.main(["predict", run, trained["structures"], "--index", "0"]) == 0
    out = os.path.join(run, "predictions")
    assert f"into {out}" in capsys.readouterr().out
    assert visible(out) == ["water-0"]


def test_a_cube_of_far_apart_atoms_reads_back(trained, tmp_path):
    """Two waters 1200 Angstrom apart: coordinates below -1000 Bohr and values
    below 1e-99 would run into their neighbours in fixed-width fields."""
    left, right = distorted_waters(2)
    left.positions -= [600, 0, 0]
    right.positions += [600, 0, 0]
    pair = left + right
    pair.info["name"] = "pair"
    out = str(tmp_path / "p")
    structures = write(tmp_path / "pair.xyz", [pair])
    assert rholearn_cli.main(["predict", trained["model"], structures, "--out", out, "--cube",
                              "--spacing", "0.4"]) == 0
    path = os.path.join(out, "pair", "density.cube")
    values, atoms = ase.io.cube.read_cube_data(path)
    np.testing.assert_allclose(atoms.positions, pair.positions, atol=1e-5)
    with open(os.path.join(out, "pair", workflow.PREDICTION_INFO_FILE)) as f:
        info = json.load(f)
    assert list(values.shape) == info["cube_shape"] and values.shape[0] > 3000
    voxel = np.prod(info["cube_voxel_angstrom"]) / ase.units.Bohr**3
    assert values.sum() * voxel == pytest.approx(info["cube_n_electrons"], rel=1e-5)
    with open(path) as f:
        lines = f.read().splitlines()
    fields = [len(line.split()) for line in lines[2:6 + len(pair)]]
    assert fields == [4] * 4 + [5] * len(pair)  # count + 3 numbers; Z, charge, x, y, z
    assert min(abs(float(x)) for x in lines[2].split()[1:2]) > 1000  # the origin, in Bohr

