"""Fault injection: target generation and training killed with SIGKILL at random
points, then rerun, end with the results of an uninterrupted run, bit for bit.

Every run is a real ``rhocalc`` / ``rholearn`` process with one OpenMP thread, so
the uninterrupted and the resumed runs compute with the same arithmetic.
"""

import csv
import os
import random
import signal
import subprocess
import sys
import time

import ase.io
import metatensor
import pytest
import torch

from rholearn import layout
from rholearn.models import DensityModel
from rholearn.dataset import Targets
from rhocalc.structures import distorted_waters

pytestmark = pytest.mark.slow

TARGETS = ["--xc", "HF", "--basis", "sto-3g", "--auxbasis", "def2-universal-jfit", "--quiet"]
TRAIN = ["--n-train", "3", "--n-val", "1", "--solver", "gradient", "--train.optimizer", "adam",
         "--train.batch-size", "1", "--train.epochs", "20", "--train.learning-rate", "0.05"]
ENVIRONMENT = dict(os.environ, OMP_NUM_THREADS="1")
N_WATERS = 4


def command(tool, *arguments):
    return [sys.executable, "-m", f"{tool}.cli", *arguments]


def run(arguments):
    result = subprocess.run(arguments, capture_output=True, text=True, env=ENVIRONMENT,
                            timeout=300)
    assert result.returncode == 0, result.stderr


def kill_when(arguments, ready, delay):
    """Start ``arguments``; SIGKILL it ``delay`` seconds after ``ready()`` is true
    (or let it finish)."""
    process = subprocess.Popen(arguments, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=ENVIRONMENT)
    deadline = time.monotonic() + 120
    while not ready() and process.poll() is None:
        assert time.monotonic() < deadline, "the run made no progress within 120 s"
        time.sleep(0.005)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()


def n_complete(out):
    return sum(os.path.isdir(layout.structure_dir(out, i)) for i in range(N_WATERS))


def n_epochs_logged(run_dir):
    try:
        with open(os.path.join(run_dir, "log.csv")) as f:
            return len(f.readlines()) - 1
    except OSError:
        return 0


def visible_files(folder):
    """Relative paths of all files and folders under ``folder``, lock file aside."""
    paths = set()
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            paths.add(os.path.relpath(os.path.join(root, name), folder))
    paths.discard(".lock")
    return paths


def without_timings(info):
    return {k: v for k, v in info.items() if not k.endswith("_seconds")}


def assert_same_dataset(a, b):
    assert visible_files(a) == visible_files(b)  # no .tmp-* left, nothing missing
    for name in ("structures.xyz", "basis.json", "settings.json"):
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name
    for index in range(N_WATERS):
        ta = Targets.read(layout.structure_dir(a, index))
        tb = Targets.read(layout.structure_dir(b, index))
        for name in ("coefficients", "projections", "overlap"):
            assert metatensor.equal(getattr(ta, name), getattr(tb, name)), (index, name)
        assert without_timings(ta.info) == without_timings(tb.info)


def assert_identical(a, b, where="model.pt"):
    """Nested dicts/lists of tensors and plain data are equal, tensors bitwise."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def log_rows(run_dir):
    with open(os.path.join(run_dir, "log.csv")) as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_killed_target_generation_and_training_resume_bit_for_bit(tmp_path):
    rng = random.Random(8)
    structures = str(tmp_path / "waters.xyz")
    ase.io.write(structures, distorted_waters(N_WATERS, seed=3))

    # targets: uninterrupted, and killed twice at random points before a rerun
    clean, killed = str(tmp_path / "clean"), str(tmp_path / "killed")
    run(command("rhocalc", "pyscf", structures, "--out", clean, *TARGETS))
    for _ in range(2):
        done = n_complete(killed) if os.path.isdir(killed) else 0
        kill_when(command("rhocalc", "pyscf", structures, "--out", killed, *TARGETS),
                  lambda: n_complete(killed) > done, rng.uniform(0.0, 0.05))
    assert n_complete(killed) < N_WATERS, "both kills came too late to test resuming"
    run(command("rhocalc", "pyscf", structures, "--out", killed, *TARGETS))
    assert_same_dataset(killed, clean)

    # training: uninterrupted, and killed twice at random epochs before a resume
    clean_run, killed_run = str(tmp_path / "clean-run"), str(tmp_path / "killed-run")
    run(command("rholearn", "train", clean, "--run", clean_run, *TRAIN))
    kill_points = sorted(rng.sample(range(2, 19), 2))
    for number, epoch in enumerate(kill_points):
        resume = ["--resume"] if number else []
        kill_when(command("rholearn", "train", clean, "--run", killed_run, *TRAIN, *resume),
                  lambda: n_epochs_logged(killed_run) >= epoch, rng.uniform(0.0, 0.01))
    assert not os.path.exists(os.path.join(killed_run, "model.pt")), "killed too late"
    run(command("rholearn", "train", clean, "--run", killed_run, *TRAIN, "--resume"))

    reference = torch.load(os.path.join(clean_run, "model.pt"), weights_only=True)
    resumed = torch.load(os.path.join(killed_run, "model.pt"), weights_only=True)
    assert_identical(resumed, reference)
    assert log_rows(killed_run) == log_rows(clean_run)
    assert not [path for path in visible_files(killed_run) if ".tmp-" in path]


def test_ctrl_c_leaves_a_usable_model_and_says_how_to_resume(tmp_path):
    structures = str(tmp_path / "waters.xyz")
    ase.io.write(structures, distorted_waters(N_WATERS, seed=4))
    dataset, run_dir = str(tmp_path / "dataset"), str(tmp_path / "run")
    run(command("rhocalc", "pyscf", structures, "--out", dataset, *TARGETS))
    long = [*TRAIN[:-4], "--train.epochs", "500", "--train.learning-rate", "0.05"]
    process = subprocess.Popen(command("rholearn", "train", dataset, "--run", run_dir, *long),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=ENVIRONMENT)
    deadline = time.monotonic() + 120
    while n_epochs_logged(run_dir) < 3:
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.01)
    # a second process on the same run folder is refused while the first trains
    second = subprocess.run(command("rholearn", "train", dataset, "--run", run_dir, *long,
                                    "--resume"), capture_output=True, text=True, timeout=300,
                            env=ENVIRONMENT)
    assert second.returncode == 2, second.stderr
    assert f"another process is using the run folder '{run_dir}'" in second.stderr
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert f"rholearn train {run_dir}/options.yaml --resume" in stdout and "interrupted" in stderr
    epochs = [int(row["epoch"]) for row in log_rows(run_dir)]
    assert epochs == list(range(1, len(epochs) + 1))  # one writer: no epoch twice
    model = DensityModel.load(os.path.join(run_dir, "model.pt"))  # the best weights so far
    prediction = model.predict(distorted_waters(1, seed=9))
    assert all(torch.isfinite(block.values).all() for block in prediction.blocks())
    with open(os.path.join(run_dir, "train.log")) as f:
        assert "resume" in f.read()
