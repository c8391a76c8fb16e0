"""The training loop: it learns, stops early, logs, and resumes exactly after an interruption."""

import csv
import dataclasses
import functools
import math
import os
import pickle
import shutil
import signal
import time

import ase.build
import pytest
import torch

from rholearn import data, run, train
from rholearn.dataset import read_dataset
from rholearn.loss import CoefficientLoss, OverlapLoss, ProjectionLoss
from rholearn.models import DensityModel
from rhocalc.batch import run_batch
from rhocalc.pyscf import basis_set, compute_targets

from small_setup import HYPERS, OPTIONS

OLD_CHECKPOINT = os.path.join(os.path.dirname(__file__), "..", "data", "checkpoint-format-2.pt")
"""``checkpoint_last.pt`` of ``train.train(make_model(folder), CoefficientLoss(), *datasets,
options(epochs=2), run_dir)`` written by rholearn at commit 17e00fe (format
``"rholearn.checkpoint/2"``), on the datasets of this file."""

BEST_KEYS = {"format", "rholearn_version", "epoch", "best_loss", "best_epoch", "stale_epochs",
             "history", "model"}
CHECKPOINT_KEYS = BEST_KEYS | {"optimizer", "scheduler", "random_states", "options"}


def structures():
    """Rattled waters and methanes."""
    frames = []
    for seed in range(12):
        atoms = ase.build.molecule("H2O" if seed % 3 else "CH4")
        atoms.rattle(0.1, seed=seed)
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dataset"))
    basis = basis_set(OPTIONS.auxbasis, ["H", "C", "O"])
    compute = functools.partial(compute_targets, options=OPTIONS)
    run_batch(structures(), root, compute, basis, progress=False)
    return read_dataset(root)


@pytest.fixture(scope="module")
def descriptors(folder):
    return make_model(folder).descriptor.compute(folder.frames, folder.indices)


def split(folder, descriptors, targets):
    """(train, val) datasets of 8 and 4 structures."""
    train_ids, val_ids, _ = data.split_indices(folder.indices, n_train=8, n_val=4, seed=0)
    return tuple(
        data.make_dataset(folder, ids, descriptors, targets=targets)
        for ids in (train_ids, val_ids)
    )


@pytest.fixture(scope="module")
def datasets(folder, descriptors):
    """(train, val) with precomputed lambda-SOAP descriptors and coefficients."""
    return split(folder, descriptors, ["coefficients"])


def make_model(folder, seed=0):
    """A linear model on featomic's stock lambda-SOAP: these tests are about the
    training loop, and their loss curves (a plateau the scheduler acts on) were
    chosen for it."""
    return DensityModel(folder.basis, HYPERS, descriptor="stock", model="linear", seed=seed)


def assert_same_weights(state, reference):
    """Every tensor of two state dicts is bitwise equal."""
    tensors = {name for name, value in reference.items() if isinstance(value, torch.Tensor)}
    assert tensors and tensors <= set(state)
    for name in tensors:
        assert torch.equal(state[name], reference[name]), name


def options(**changes):
    defaults = dict(epochs=6, batch_size=3, learning_rate=0.1, checkpoint_every=2, verbose=False)
    return train.TrainOptions(**{**defaults, **changes})


def test_adam_training_learns_and_writes_a_complete_run(folder, datasets, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    model = make_model(folder)
    history = train.train(
        model, CoefficientLoss(), *datasets, options(epochs=8, verbose=True), run_dir
    )
    assert [record["epoch"] for record in history] == list(range(1, 9))
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["val_loss"] < 0.5 * history[0]["val_loss"]
    assert len(capsys.readouterr().out.strip().splitlines()) == 8

    assert sorted(os.listdir(run_dir)) == sorted(
        [train.LOG_FILE, train.LAST_CHECKPOINT, train.BEST_CHECKPOINT, "train.log", ".lock"]
    )
    with open(os.path.join(run_dir, "train.log")) as f:
        text_log = f.read().splitlines()
    assert len(text_log) == 8 and text_log[-1].split()[3:5] == ["epoch", "8/8"]
    with open(os.path.join(run_dir, train.LOG_FILE)) as f:
        rows = list(csv.DictReader(f))
    assert [float(row["val_loss"]) for row in rows] == [r["val_loss"] for r in history]

    last = torch.load(os.path.join(run_dir, train.LAST_CHECKPOINT), weights_only=True)
    assert set(last) == CHECKPOINT_KEYS
    # the best checkpoint holds weights, no optimizer state
    assert set(torch.load(os.path.join(run_dir, train.BEST_CHECKPOINT))) == BEST_KEYS
    assert last["epoch"] == 8 and last["history"] == history
    assert last["format"] == run.CHECKPOINT_FORMAT
    assert last["options"] == dataclasses.asdict(options(epochs=8, verbose=True))
    assert_same_weights(last["model"], model.state_dict())

    best_epoch = min(history, key=lambda r: r["val_loss"])["epoch"]
    best = make_model(folder, seed=1)
    checkpoint = train.load_checkpoint(os.path.join(run_dir, train.BEST_CHECKPOINT), best)
    assert checkpoint["best_epoch"] == best_epoch
    loader = data.make_dataloader(datasets[1], batch_size=2)
    assert train.evaluate(best, CoefficientLoss(), loader) == pytest.approx(
        history[best_epoch - 1]["val_loss"], rel=1e-12
    )


def test_lbfgs_training_minimises_the_density_error(folder, descriptors, tmp_path):
    datasets = split(folder, descriptors, ["coefficients", "overlap"])
    history = train.train(
        make_model(folder), OverlapLoss(), *datasets,
        options(epochs=2, optimizer="lbfgs", learning_rate=1.0, lbfgs_max_iter=4),
        str(tmp_path),
    )
    assert history[-1]["train_loss"] < 0.1 * history[0]["train_loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]


def test_early_stopping_without_improvement(folder, datasets, tmp_path):
    # a zero learning rate never changes the weights: the validation loss stays put
    history = train.train(
        make_model(folder), CoefficientLoss(), *datasets,
        options(epochs=20, learning_rate=0.0, early_stopping_patience=3, scheduler=None),
        str(tmp_path),
    )
    assert len(history) == 4
    assert len({record["val_loss"] for record in history}) == 1
    checkpoint = torch.load(tmp_path / train.LAST_CHECKPOINT, weights_only=True)
    assert checkpoint["epoch"] == 4 and checkpoint["stale_epochs"] == 3


class InterruptingLoss(CoefficientLoss):
    """Raises ``KeyboardInterrupt``, as a killed run would stop, at its
    ``calls``-th call after ``path`` (the first checkpoint) appeared."""

    def __init__(self, path: str, calls: int):
        super().__init__()
        self.path = path
        self.calls = calls

    def forward(self, prediction, target):
        if os.path.exists(self.path):
            self.calls -= 1
            if self.calls == 0:
                raise KeyboardInterrupt
        return super().forward(prediction, target)


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_resume_after_interruption_gives_the_same_weights(folder, datasets, tmp_path, optimizer):
    settings = options(
        epochs=6, optimizer=optimizer, learning_rate=0.5, lbfgs_max_iter=2, scheduler_patience=1
    )
    model = make_model(folder)
    history = train.train(model, CoefficientLoss(), *datasets, settings, str(tmp_path / "once"))

    # killed after the checkpoint of epoch 2, in epoch 3 or 4 (each epoch calls the
    # loss at least 5 times: 3 training and 2 validation batches)
    run_dir = str(tmp_path / "interrupted")
    checkpoint = os.path.join(run_dir, train.LAST_CHECKPOINT)
    with pytest.raises(KeyboardInterrupt):
        train.train(
            make_model(folder), InterruptingLoss(checkpoint, 8), *datasets, settings, run_dir
        )
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2

    resumed = make_model(folder, seed=7)  # a new instance, other initial weights
    resumed_history = train.train(
        resumed, CoefficientLoss(), *datasets, settings, run_dir, resume=True
    )
    assert_same_weights(resumed.state_dict(), model.state_dict())
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed_history) == strip(history)
    if optimizer == "adam":  # the scheduler acted, its state was restored too
        assert len({record["learning_rate"] for record in history}) > 1
    with open(os.path.join(run_dir, train.LOG_FILE)) as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == list(range(1, 7))


def test_a_finished_run_is_not_overwritten(folder, datasets, tmp_path):
    train.train(make_model(folder), CoefficientLoss(), *datasets, options(epochs=1), str(tmp_path))
    with pytest.raises(FileExistsError, match="resume=True"):
        train.train(make_model(folder), CoefficientLoss(), *datasets, options(), str(tmp_path))
    # resuming a run that already reached its epochs trains no further
    history = train.train(make_model(folder, seed=3), CoefficientLoss(), *datasets,
                          options(epochs=1), str(tmp_path), resume=True)
    assert len(history) == 1


@pytest.mark.parametrize("change, culprit", [
    ({"optimizer": "lbfgs"}, "optimizer: 'adam' there, 'lbfgs' now"),
    ({"dtype": "float32"}, "dtype: 'float64' there, 'float32' now"),
    ({"batch_size": 4, "seed": 1}, "batch_size: 3 there, 4 now; seed: 0 there, 1 now"),
])
def test_resuming_with_options_that_cannot_continue_is_refused_untouched(
    folder, datasets, tmp_path, change, culprit
):
    train.train(make_model(folder), CoefficientLoss(), *datasets, options(epochs=2), str(tmp_path))
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    with pytest.raises(ValueError, match=culprit):
        train.train(make_model(folder), CoefficientLoss(), *datasets,
                    options(epochs=3, **change), str(tmp_path), resume=True)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


def test_a_new_learning_rate_on_resume_is_applied_and_logged(folder, datasets, tmp_path):
    settings = options(epochs=2, scheduler=None)
    train.train(make_model(folder), CoefficientLoss(), *datasets, settings, str(tmp_path))
    history = train.train(
        make_model(folder), CoefficientLoss(), *datasets,
        dataclasses.replace(settings, epochs=4, learning_rate=0.02), str(tmp_path), resume=True,
    )
    assert [record["learning_rate"] for record in history] == [0.1, 0.1, 0.02, 0.02]
    with open(tmp_path / "train.log") as f:
        assert "learning rate 0.1 -> 0.02 from epoch 3" in f.read()
    checkpoint = torch.load(tmp_path / train.LAST_CHECKPOINT, weights_only=True)
    assert checkpoint["options"]["learning_rate"] == 0.02


def test_a_format_2_checkpoint_is_upgraded_and_resumes(folder, datasets, tmp_path):
    """A real checkpoint of the previous format (tests/data), read and resumed."""
    old = torch.load(OLD_CHECKPOINT, weights_only=True)
    assert old["format"] == "rholearn.checkpoint/2"
    upgraded = run.read_checkpoint(OLD_CHECKPOINT)
    assert upgraded["format"] == run.CHECKPOINT_FORMAT == 3
    assert upgraded["rholearn_version"] is None
    assert set(upgraded) == CHECKPOINT_KEYS
    shutil.copy(OLD_CHECKPOINT, tmp_path / train.LAST_CHECKPOINT)
    model = make_model(folder, seed=5)
    history = train.train(model, CoefficientLoss(), *datasets, options(epochs=3), str(tmp_path),
                          resume=True)
    assert [record["epoch"] for record in history] == [1, 2, 3]
    assert history[:2] == old["history"]
    assert history[2]["train_loss"] < old["history"][0]["train_loss"]
    resumed = torch.load(tmp_path / train.LAST_CHECKPOINT, weights_only=True)
    assert resumed["format"] == run.CHECKPOINT_FORMAT and resumed["epoch"] == 3


def test_training_without_validation_monitors_the_training_loss(folder, datasets, tmp_path, capsys):
    history = train.train(
        make_model(folder), CoefficientLoss(), datasets[0], None, options(epochs=2), str(tmp_path)
    )
    assert all(math.isnan(record["val_loss"]) for record in history)
    best = torch.load(tmp_path / train.BEST_CHECKPOINT, weights_only=True)
    assert best["best_loss"] == min(record["train_loss"] for record in history)
    assert capsys.readouterr().out == ""  # verbose=False


def test_checkpoint_writes_are_atomic(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    train.save_checkpoint({"epoch": 1, "weights": torch.ones(3)}, path)
    with pytest.raises(Exception):  # a lambda cannot be pickled: the write fails half-way
        train.save_checkpoint({"epoch": 2, "weights": torch.zeros(3), "bad": lambda: 0}, path)
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    kept = torch.load(path)
    assert kept["epoch"] == 1 and torch.equal(kept["weights"], torch.ones(3))


def test_the_negative_projection_loss_trains_every_epoch(folder, descriptors, tmp_path):
    # its value is negative near the minimum: a falling loss must not read as divergence
    datasets = split(folder, descriptors, ["projections", "overlap"])
    history = train.train(make_model(folder), ProjectionLoss(), *datasets,
                          options(epochs=3, learning_rate=1e-2), str(tmp_path))
    assert len(history) == 3
    assert history[0]["train_loss"] < 0
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_a_diverging_loss_stops_with_a_clear_error(folder, datasets, tmp_path):
    def nan_loss(prediction, batch):
        return CoefficientLoss()(prediction, batch) * math.nan

    with pytest.raises(FloatingPointError, match="epoch 1: the validation loss is nan"):
        train.train(make_model(folder), nan_loss, *datasets, options(epochs=2), str(tmp_path))


def test_early_stopping_needs_a_patience_of_at_least_one():
    with pytest.raises(ValueError, match="early_stopping_patience must be >= 1"):
        options(early_stopping_patience=0)


class CreatesAFile:
    """A harmless pickle payload: unpickling it creates the file ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_checkpoint_is_not_executed_on_resume(folder, datasets, tmp_path):
    run_dir = tmp_path / "run"
    train.train(make_model(folder), CoefficientLoss(), *datasets, options(epochs=2), str(run_dir))
    marker = tmp_path / "payload-ran"
    with open(run_dir / train.LAST_CHECKPOINT, "wb") as f:
        pickle.dump({"epoch": 1, "payload": CreatesAFile(str(marker))}, f, protocol=2)
    # the payload works when unpickled the unsafe way ...
    with open(run_dir / train.LAST_CHECKPOINT, "rb") as f:
        pickle.load(f)["payload"].close()
    assert marker.exists()
    marker.unlink()
    # ... but resuming refuses the file without running it
    with pytest.raises(ValueError, match=f"cannot read checkpoint '.*{train.LAST_CHECKPOINT}'"):
        train.train(
            make_model(folder), CoefficientLoss(), *datasets, options(epochs=3), str(run_dir),
            resume=True,
        )
    assert not marker.exists()


def test_truncated_and_unknown_checkpoints_name_the_file_and_what_to_do(folder, datasets, tmp_path):
    run_dir = str(tmp_path)
    train.train(make_model(folder), CoefficientLoss(), *datasets, options(epochs=2), run_dir)
    last = os.path.join(run_dir, train.LAST_CHECKPOINT)
    with open(last, "rb") as f:
        content = f.read()
    with open(last, "wb") as f:
        f.write(content[: len(content) // 2])
    with pytest.raises(ValueError) as error:
        train.train(make_model(folder), CoefficientLoss(), *datasets, options(epochs=3), run_dir,
                    resume=True)
    message = str(error.value)
    assert last in message and train.BEST_CHECKPOINT in message and "start again" in message

    checkpoint = torch.load(os.path.join(run_dir, train.BEST_CHECKPOINT), weights_only=True)
    train.save_checkpoint({**checkpoint, "format": 99}, last)
    with pytest.raises(ValueError, match=r"has format 99 \(written by a newer rholearn\), this"):
        train.load_checkpoint(last, make_model(folder))
    train.save_checkpoint({**checkpoint, "format": 1}, last)
    with pytest.raises(ValueError, match=r"has format 1, this rholearn reads formats \[2, 3\]"):
        train.load_checkpoint(last, make_model(folder))
    # the best weights are usable, but cannot resume a run (no optimizer state)
    train.load_checkpoint(os.path.join(run_dir, train.BEST_CHECKPOINT), make_model(folder))
    optimizer = torch.optim.Adam(make_model(folder).parameters())
    with pytest.raises(ValueError, match="weights only"):
        train.load_checkpoint(
            os.path.join(run_dir, train.BEST_CHECKPOINT), make_model(folder), optimizer
        )


def test_stale_temporary_files_of_a_killed_run_are_removed(folder, datasets, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "descriptors").mkdir(parents=True)
    stale = [run_dir / ".tmp-999999-checkpoint_last.pt", run_dir / "descriptors" / ".tmp-1-0.mts"]
    for path in stale:
        path.write_bytes(b"partial")
    # a symlinked subfolder, a symlink named .tmp-*, a subfolder that is not the run's own:
    # what they hold is not the run's
    outside = tmp_path / "outside"
    outside.mkdir()
    (run_dir / "other").mkdir()
    kept = [outside / ".tmp-1-mine.txt", outside / "file.txt", run_dir / "other" / ".tmp-3-x"]
    for path in kept:
        path.write_text("mine")
    (run_dir / "linked").symlink_to(outside)
    (run_dir / ".tmp-2-link").symlink_to(outside / "file.txt")
    train.train(make_model(folder), CoefficientLoss(), *datasets, options(epochs=1), str(run_dir))
    assert not any(path.exists() for path in stale)
    assert all(path.read_text() == "mine" for path in kept)
    assert not os.path.lexists(run_dir / ".tmp-2-link")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_cuda_device_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="device 'cuda': torch sees no GPU"):
        options(device="cuda")


def test_ctrl_c_during_training_is_raised_between_batches():
    """A SIGINT is noted and raised at the next batch (not inside a compiled call); a
    second one raises at once; the previous handler is back afterwards."""
    before = signal.getsignal(signal.SIGINT)
    with train._interrupts_between_batches():
        os.kill(os.getpid(), signal.SIGINT)  # noted, not raised here
        time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):
            train._check_interrupt()
        with pytest.raises(KeyboardInterrupt):  # the second one at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before
    train._check_interrupt()  # nothing pending after the training
