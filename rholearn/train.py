"""Training loop: minibatch Adam or full-batch LBFGS, validation, early stopping,
checkpoints that resume a run exactly.

A run writes into its own folder ``run_dir`` (file names: :mod:`rholearn.run`)::

    log.csv              epoch, train_loss, val_loss (per structure), val_rmse_percent,
                         learning_rate, seconds
    train.log            the same as text with timestamps, warnings and how to resume
    checkpoint_last.pt   the state after the latest checkpointed epoch, with the options
    checkpoint_best.pt   the weights of the epoch with the lowest validation loss
                         (training loss without validation data)

``checkpoint_last.pt`` holds the model, optimizer and scheduler states, the
epoch, the early-stopping counters, the history and every random state (torch,
numpy, python ``random`` and the data loader's shuffling generator). A run
interrupted and restarted with ``resume=True`` therefore ends with the same
weights, bit for bit, as one that was never interrupted.
``checkpoint_best.pt`` holds the weights and counters only (no optimizer state).

Both are written atomically and hold only tensors and plain data (dicts, lists,
numbers, strings), so they are read with ``torch.load(weights_only=True)``: a
crafted file cannot run code, it is refused. Their format has an integer version
(:data:`rholearn.run.CHECKPOINT_FORMAT`); older files are upgraded on reading.

A resumed run may change only :data:`RESUMABLE_OPTIONS`; a new learning rate is
applied from the next epoch (and logged), any other change is refused.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import random
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from metatensor.learn.data import IndexedDataset

from . import distributed
from .data import collate, make_dataloader
from .models.weights import load_weights
from .run import (
    BEST_CHECKPOINT,
    EPOCH_LOG_FILE as LOG_FILE,
    LAST_CHECKPOINT,
    RunFolder,
    checkpoint_fields,
    read_checkpoint,
    save_checkpoint,
)

LOG_COLUMNS = ["epoch", "train_loss", "val_loss", "val_rmse_percent", "learning_rate", "seconds"]
RESUMABLE_OPTIONS = ("epochs", "verbose", "checkpoint_every", "learning_rate",
                     "early_stopping_patience", "device")
"""The :class:`TrainOptions` a resumed run may change (the others are refused)."""
_STATE_KEYS = ("epoch", "best_loss", "best_epoch", "stale_epochs", "history")

DIVERGENCE_FACTOR = 1e3
"""A training loss that rises above that of the first epoch by this many times its
size stops training as diverged (too large a learning rate): a converging run never
climbs that far. The size, not the value: the projection loss is negative near its
minimum."""

LossFunction = Callable[[Any, Any], torch.Tensor]
"""``loss_fn(prediction, batch) -> scalar``: the loss of a batch, summed over its
structures (so that the losses of the batches of an epoch add up)."""


@dataclasses.dataclass
class TrainOptions:
    """Settings of a training run (recorded in its checkpoints).

    Parameters
    ----------
    epochs : int
        Number of epochs to train up to (a resumed run continues to this).
    batch_size : int
        Structures per minibatch (Adam), or per chunk of the full-batch loss
        (LBFGS: gradients are accumulated over chunks, so the autograd graph
        of one chunk only is in memory; the data of all are).
    optimizer : str
        ``"adam"`` (minibatches, shuffled) or ``"lbfgs"`` (one full-batch step
        of up to ``lbfgs_max_iter`` iterations per epoch; for linear models).
    learning_rate : float
        Initial learning rate.
    lbfgs_max_iter : int
        LBFGS iterations per epoch (strong-Wolfe line search).
    scheduler : str or None
        ``"plateau"`` (:class:`torch.optim.lr_scheduler.ReduceLROnPlateau` on the
        validation loss) or ``None`` (constant learning rate).
    scheduler_factor, scheduler_patience
        Factor and patience (epochs) of the plateau scheduler.
    early_stopping_patience : int or None
        Stop after this many epochs without a lower validation loss; ``None``
        never stops early.
    seed : int
        Seeds torch, numpy, python ``random`` and the shuffling generator.
    device, dtype : str
        Where and in which precision the model is trained (``"cpu"``,
        ``"cuda"``; ``"float64"``, ``"float32"``). The datasets must return
        tensors of the same kind.
    checkpoint_every : int
        Write ``checkpoint_last.pt`` every this many epochs (and always at the
        end). ``checkpoint_best.pt`` is written whenever the validation loss
        improves.
    verbose : bool
        Print one line per epoch.
    """

    epochs: int = 100
    batch_size: int = 8
    optimizer: str = "adam"
    learning_rate: float = 1e-2
    lbfgs_max_iter: int = 20
    scheduler: Optional[str] = "plateau"
    scheduler_factor: float = 0.5
    scheduler_patience: int = 10
    early_stopping_patience: Optional[int] = 50
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float64"
    checkpoint_every: int = 10
    verbose: bool = True

    def __post_init__(self):
        if self.optimizer not in ("adam", "lbfgs"):
            raise ValueError(f"optimizer must be 'adam' or 'lbfgs', got '{self.optimizer}'")
        if self.scheduler not in ("plateau", None):
            raise ValueError(f"scheduler must be 'plateau' or None, got '{self.scheduler}'")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"dtype must name a torch dtype, got '{self.dtype}'")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError(
                f"early_stopping_patience must be >= 1 or None, got {self.early_stopping_patience}"
            )
        for name in ("epochs", "batch_size", "checkpoint_every", "lbfgs_max_iter"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        _check_device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def _check_device(name: str) -> None:
    """Raise a ``ValueError`` unless torch can use device ``name`` here."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:1', ...; got '{name}'") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device '{name}': torch sees no GPU (torch.cuda.is_available() is False; "
                "no CUDA device, or a CPU-only torch build); use device 'cpu'"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device '{name}': torch sees only {torch.cuda.device_count()} GPU(s)"
            )


def train(
    model: torch.nn.Module,
    loss_fn: LossFunction,
    train_data: IndexedDataset,
    val_data: Optional[IndexedDataset],
    options: TrainOptions,
    run_dir: str,
    resume: bool = False,
    val_spread: Optional[float] = None,
) -> List[Dict[str, float]]:
    """Train ``model`` and return the history, one dict per epoch.

    Parameters
    ----------
    model : torch.nn.Module
        Maps a batch's ``descriptor`` TensorMap to a prediction (coefficients
        TensorMap). Moved to ``options.device`` and ``options.dtype``. It holds
        the weights of the last epoch on return; the best ones are in
        ``run_dir/checkpoint_best.pt`` (:func:`load_checkpoint`).
    loss_fn : callable
        ``loss_fn(prediction, batch) -> scalar tensor``, summed over the
        structures of the batch; ``batch`` is the collated batch (fields
        ``sample_id``, ``frame``, ``descriptor``, ``coefficients``, ...).
    train_data, val_data : IndexedDataset
        From :func:`rholearn.data.make_dataset`, with a ``descriptor`` field.
        Without ``val_data`` the training loss drives the scheduler, early
        stopping and the best checkpoint.
    options : TrainOptions
    run_dir : str
        Output folder, created if needed.
    resume : bool
        Continue from ``run_dir/checkpoint_last.pt`` if it exists, with the options
        saved there except :data:`RESUMABLE_OPTIONS` (another optimizer, dtype, ...
        is refused before anything is written; a new ``learning_rate`` is applied).
        Without it a ``run_dir`` that already holds a checkpoint is refused.
        Temporary files a killed run left in ``run_dir`` and its own subfolders
        are removed. The folder is locked: a second process on it is refused.
    val_spread : float, optional
        ``sum (c - c_base)^T S (c - c_base)`` over the validation structures;
        with it and a loss summing ``dc^T S dc`` (:class:`rholearn.loss.OverlapLoss`),
        each epoch also logs the validation % RMSE
        ``100 sqrt(sum dc^T S dc / val_spread)`` (:mod:`rholearn.metrics`).

    Under :mod:`rholearn.distributed` (``torchrun``, ``srun``), each process takes its
    share of every batch (:class:`~rholearn.distributed.ShardedBatchSampler`), the
    gradients and losses are summed over the processes (the loss of one process on the
    whole batch; LBFGS sees the full-batch loss), and process 0 alone writes ``run_dir``;
    every process returns the same history and weights.

    Progress goes to the ``rholearn`` logger: ``run_dir/train.log`` and, with
    ``options.verbose``, stdout. On Ctrl-C the run stops with a message saying
    how to resume it (from ``checkpoint_last.pt``) and ``KeyboardInterrupt`` is
    raised again.

    Returns
    -------
    list of dict
        Per epoch (also those before a resume): ``epoch``, ``train_loss`` and
        ``val_loss`` (per structure), ``val_rmse_percent``, ``learning_rate``,
        ``seconds``.
    """
    run = RunFolder(run_dir)
    with distributed.on_main(run.locked()), distributed.rank_log(run_dir, options.verbose) as log:
        try:
            with _interrupts_between_batches():
                return _train(model, loss_fn, train_data, val_data, options, run, resume,
                              val_spread, log)
        except KeyboardInterrupt:
            log.warning(
                f"interrupted: '{run_dir}' keeps the last checkpointed epoch; continue with "
                f"{run.resume_hint()}"
            )
            raise


def _train(model, loss_fn, train_data, val_data, options, run, resume, val_spread, log):
    last_path = run.file(LAST_CHECKPOINT)
    checkpoint = None
    if os.path.exists(last_path) and not resume:
        raise FileExistsError(
            f"'{run.path}' already holds a training run ('{last_path}'); pass "
            "resume=True to continue it or choose another run_dir"
        )
    if resume and os.path.exists(last_path):
        checkpoint = read_checkpoint(last_path)
        _check_resumable(checkpoint.get("options", {}), options, last_path)
    if distributed.is_main():
        run.remove_stale_files()  # and the descriptor cache's
    _seed_everything(options.seed)
    model.to(device=torch.device(options.device), dtype=options.torch_dtype)
    generator = torch.Generator().manual_seed(options.seed)
    loader = _sharded_loader if distributed.active() else make_dataloader
    train_loader = loader(
        train_data,
        options.batch_size,
        shuffle=options.optimizer == "adam",
        generator=generator,
    )
    val_loader = None if val_data is None else loader(val_data, options.batch_size)
    optimizer = _optimizer(model, options)
    scheduler = _scheduler(optimizer, options)
    state = {"epoch": 0, "best_loss": math.inf, "best_epoch": 0, "stale_epochs": 0, "history": []}

    if checkpoint is not None:
        restore_checkpoint(checkpoint, last_path, model, optimizer, scheduler, generator)
        state = {name: checkpoint[name] for name in _STATE_KEYS}
        _apply_learning_rate(checkpoint["options"], options, optimizer, state, log)
    writes = distributed.is_main()  # the run folder is written by process 0 only
    if writes:
        _write_log(run.file(LOG_FILE), state["history"])
    if val_loader is None:
        log.warning(
            "no validation structures: the training loss picks the best epoch and drives "
            "the scheduler and early stopping, and nothing measures overfitting"
        )
    n_val = 0 if val_data is None else len(val_data)

    run_epoch = _adam_epoch if options.optimizer == "adam" else _lbfgs_epoch
    for epoch in range(state["epoch"] + 1, options.epochs + 1):
        _check_interrupt()
        if _should_stop(state, options):
            break
        start = time.perf_counter()
        train_loss = run_epoch(model, loss_fn, train_loader, optimizer)
        val_loss = math.nan if val_loader is None else evaluate(model, loss_fn, val_loader)
        monitored = train_loss if val_loader is None else val_loss
        if not math.isfinite(monitored):
            raise FloatingPointError(
                f"epoch {epoch}: the {'training' if val_loader is None else 'validation'} "
                f"loss is {monitored}; lower the learning rate, or check the targets "
                f"(the last good weights are in '{run.path}')"
            )
        first = state["history"][0]["train_loss"] if state["history"] else train_loss
        if train_loss - first > DIVERGENCE_FACTOR * abs(first):  # the projection loss is < 0
            raise FloatingPointError(
                f"epoch {epoch}: training diverged: the training loss {train_loss:.3g} rose from "
                f"that of epoch 1 ({first:.3g}) by over {DIVERGENCE_FACTOR:g} times its size; lower "
                f"train.learning_rate (now {optimizer.param_groups[0]['lr']:g}) and start "
                "again (the weights of the best epoch so far are in "
                f"'{run.file(BEST_CHECKPOINT)}')"
            )
        if scheduler is not None:
            scheduler.step(monitored)
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_rmse_percent": (
                100 * math.sqrt(val_loss * n_val / val_spread) if val_spread else None
            ),
            "learning_rate": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - start,
        }
        improved = _record_epoch(state, record, monitored)
        log.info(_progress_line(record, options.epochs, improved))
        if not writes:
            continue
        _append_log(run.file(LOG_FILE), record)
        if improved:
            save_checkpoint(_checkpoint(state, model), run.file(BEST_CHECKPOINT))
        if epoch % options.checkpoint_every == 0 or epoch == options.epochs or _should_stop(
            state, options
        ):
            checkpoint = _checkpoint(state, model, optimizer, scheduler, generator, options)
            save_checkpoint(checkpoint, last_path)
    distributed.barrier()  # the checkpoints are complete for every process
    return state["history"]


def evaluate(model: torch.nn.Module, loss_fn: LossFunction, loader) -> float:
    """Loss per structure of ``model`` over all batches of ``loader`` (of every
    process's share, under :mod:`rholearn.distributed`)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            _check_interrupt()
            if batch is None:  # an empty share of a batch
                continue
            total += float(loss_fn(model(batch.descriptor), batch))
            count += len(batch.sample_id)
    return distributed.all_reduce_sum(total) / distributed.all_reduce_sum(count)


# -------------------------------------------------------------- checkpoints ---
def load_checkpoint(
    path: str,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, Any]:
    """Restore the states saved in a checkpoint and return it.

    Only ``model`` is needed to get trained weights back (for instance from
    ``checkpoint_best.pt``); the optimizer, scheduler, loader generator and
    the global random states are restored when ``generator`` is given, as
    :func:`train` does to resume (``checkpoint_last.pt`` only).

    The file is read with :func:`rholearn.run.read_checkpoint`
    (``torch.load(weights_only=True)``, older formats upgraded): tensors and plain
    data only, nothing in it is executed.

    Raises
    ------
    ValueError
        Naming ``path``, if it is truncated, corrupt, not a checkpoint, of
        a format this rholearn cannot read, or lacks the optimizer state asked for.
    """
    checkpoint = read_checkpoint(path)
    restore_checkpoint(checkpoint, path, model, optimizer, scheduler, generator)
    return checkpoint


def restore_checkpoint(
    checkpoint: Dict[str, Any],
    path: str,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    generator: Optional[torch.Generator] = None,
) -> None:
    """Restore the states of a checkpoint read from ``path`` (see :func:`load_checkpoint`)."""
    try:
        load_weights(model, checkpoint["model"])
        if optimizer is not None or scheduler is not None or generator is not None:
            if "optimizer" not in checkpoint:
                raise ValueError(
                    "it holds weights only (no optimizer or random states); resume from "
                    f"'{LAST_CHECKPOINT}'"
                )
            if optimizer is not None:
                optimizer.load_state_dict(checkpoint["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(checkpoint["scheduler"])
            if generator is not None:
                _set_random_states(checkpoint["random_states"], generator)
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        raise ValueError(f"cannot resume from checkpoint '{path}': {error}") from error


def _checkpoint(
    state, model, optimizer=None, scheduler=None, generator=None, options=None
) -> Dict[str, Any]:
    """The checkpoint of the current state: weights and counters, and with an
    ``optimizer`` everything needed to resume. Tensors and plain data only."""
    checkpoint = {
        **checkpoint_fields(),
        **{name: state[name] for name in _STATE_KEYS},
        "model": model.state_dict(),
    }
    if optimizer is not None:
        checkpoint.update(
            optimizer=optimizer.state_dict(),
            scheduler=None if scheduler is None else scheduler.state_dict(),
            random_states=_random_states(generator),
            options=dataclasses.asdict(options),
        )
    return checkpoint


def _random_states(generator: torch.Generator) -> Dict[str, Any]:
    """Every random state as tensors and plain lists (loadable with weights_only)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(position),
                  int(has_gauss), float(cached_gaussian)],
        "python": [version, list(internal), gauss_next],
        "loader": generator.get_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_random_states(states: Dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss,
                         cached_gaussian))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    generator.set_state(states["loader"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# ---------------------------------------------------------------- one epoch ---
_INTERRUPTED = threading.Event()


@contextlib.contextmanager
def _interrupts_between_batches():
    """Ctrl-C (SIGINT) during training raises ``KeyboardInterrupt`` at the next batch
    (:func:`_check_interrupt`), in Python: raised inside a TorchScript call (metatensor's
    labels) it would come out as a ``RuntimeError``. A second Ctrl-C raises at once.
    Nothing changes outside the main thread (signals go to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # a handler installed outside Python: back to Python's own
        previous = signal.default_int_handler

    def note(signum, frame):
        _INTERRUPTED.set()
        signal.signal(signal.SIGINT, previous)

    _INTERRUPTED.clear()
    signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _INTERRUPTED.clear()


def _check_interrupt() -> None:
    """Raise the ``KeyboardInterrupt`` of a Ctrl-C noted during training."""
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt


def _adam_epoch(model, loss_fn, loader, optimizer) -> float:
    """One pass of minibatch steps; the mean loss per structure during the pass."""
    model.train()
    total, count = 0.0, 0
    for batch in loader:
        _check_interrupt()
        optimizer.zero_grad()
        if batch is not None:  # None: this process's share of the batch is empty
            loss = loss_fn(model(batch.descriptor), batch)
            loss.backward()
            total += float(loss.detach())
            count += len(batch.sample_id)
        distributed.all_reduce_gradients(list(model.parameters()))
        optimizer.step()
    return distributed.all_reduce_sum(total) / distributed.all_reduce_sum(count)


def _lbfgs_epoch(model, loss_fn, loader, optimizer) -> float:
    """One LBFGS step on the full-batch loss; the loss per structure before it.

    The batches are read once per epoch and kept in memory, as every
    evaluation of the line search runs over all of them.
    """
    model.train()
    batches = [batch for batch in loader if batch is not None]
    count = distributed.all_reduce_sum(sum(len(batch.sample_id) for batch in batches))
    first = next(model.parameters())

    def closure():
        optimizer.zero_grad()
        total = torch.zeros((), dtype=first.dtype, device=first.device)
        for batch in batches:  # gradients accumulate over the chunks
            _check_interrupt()
            loss = loss_fn(model(batch.descriptor), batch)
            loss.backward()
            total += loss.detach()
        distributed.all_reduce_gradients(list(model.parameters()))
        return distributed.all_reduce(total)  # the full-batch loss, on every process

    return float(optimizer.step(closure)) / count


def _sharded_loader(dataset: IndexedDataset, batch_size: int, shuffle: bool = False,
                    generator: Optional[torch.Generator] = None):
    """This process's shares of the batches a one-process loader would make
    (:class:`rholearn.distributed.ShardedBatchSampler`); ``None`` for an empty share."""
    sampler = distributed.ShardedBatchSampler(len(dataset), batch_size, shuffle, generator)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, generator=generator,
                                       collate_fn=_collate_share)


def _collate_share(items):
    return collate(items) if items else None


def _optimizer(model: torch.nn.Module, options: TrainOptions) -> torch.optim.Optimizer:
    if options.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=options.learning_rate)
    return torch.optim.LBFGS(
        model.parameters(),
        lr=options.learning_rate,
        max_iter=options.lbfgs_max_iter,
        line_search_fn="strong_wolfe",
    )


def _scheduler(optimizer, options: TrainOptions):
    if options.scheduler is None:
        return None
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=options.scheduler_factor, patience=options.scheduler_patience
    )


def _record_epoch(state: Dict[str, Any], record: Dict[str, float], monitored: float) -> bool:
    """Add an epoch to the run's state; whether ``monitored`` is the best loss yet."""
    state["history"].append(record)
    state["epoch"] = record["epoch"]
    improved = monitored < state["best_loss"]
    if improved:
        state.update(best_loss=monitored, best_epoch=record["epoch"], stale_epochs=0)
    else:
        state["stale_epochs"] += 1
    return improved


def _check_resumable(saved: Dict[str, Any], options: TrainOptions, path: str) -> None:
    """Refuse to resume with other options than :data:`RESUMABLE_OPTIONS` (another
    optimizer or dtype cannot continue the saved state)."""
    changed = [
        f"{name}: {value!r} there, {getattr(options, name)!r} now"
        for name, value in saved.items()
        if name not in RESUMABLE_OPTIONS and value != getattr(options, name, value)
    ]
    if changed:
        raise ValueError(
            f"cannot resume from '{path}' with other options ({'; '.join(changed)}); a "
            f"resumed run may change only {', '.join(RESUMABLE_OPTIONS)}: resume with its "
            "options or start a new run"
        )


def _apply_learning_rate(saved, options: TrainOptions, optimizer, state, log) -> None:
    """A resumed run with a new ``learning_rate`` continues with it (the scheduler's
    reductions so far are dropped), and says so in the log."""
    if saved.get("learning_rate") == options.learning_rate:
        return
    current = optimizer.param_groups[0]["lr"]
    for group in optimizer.param_groups:
        group["lr"] = options.learning_rate
    log.warning(
        f"learning rate {current:g} -> {options.learning_rate:g} from epoch "
        f"{state['epoch'] + 1} (train.learning_rate was {saved.get('learning_rate')!r}); the "
        "result will differ from an uninterrupted run"
    )


def _should_stop(state: Dict[str, Any], options: TrainOptions) -> bool:
    patience = options.early_stopping_patience
    return patience is not None and state["stale_epochs"] >= patience


# -------------------------------------------------------------------- logs ---


def _write_log(path: str, history: List[Dict[str, float]]) -> None:
    """Start the CSV log afresh from ``history`` (on resume: drops epochs after
    the checkpoint, which the resumed run recomputes)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(history)


def _append_log(path: str, record: Dict[str, float]) -> None:
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, LOG_COLUMNS).writerow(record)


def _progress_line(record: Dict[str, float], epochs: int, improved: bool) -> str:
    return (
        f"epoch {record['epoch']:>5}/{epochs}  train {record['train_loss']:.6e}  "
        f"val {record['val_loss']:.6e}  "
        + ("" if record.get("val_rmse_percent") is None
           else f"val RMSE {record['val_rmse_percent']:.3f} %  ")
        + f"lr {record['learning_rate']:.2e}  "
        f"{record['seconds']:.2f} s" + ("  *" if improved else "")
    )
