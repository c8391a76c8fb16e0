"""Fitting across processes with ``torch.distributed``: who the processes are, how the
training structures are shared among them, and the few collective operations the
fitters need.

A fit runs across processes when it is launched by ``torchrun`` (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) or by SLURM's
``srun`` (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``; the first host
of ``SLURM_JOB_NODELIST`` is the rendezvous unless ``MASTER_ADDR`` is set) with more
than one process: :func:`initialise` then starts the process group (``gloo`` on the
CPU, ``nccl`` on CUDA, one GPU per local rank). Every process holds the whole model;
each handles a share of the structures and the sums over structures (losses,
gradients, normal equations) are all-reduced, so every process takes the same steps
and ends with the same weights. Process 0 writes the run folder.

Without a launcher (or with one process) nothing here does anything and every
function returns what one process would: the single-process path is unchanged.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import subprocess
import warnings
from typing import ContextManager, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

from .runlog import LOGGER, run_log

DEFAULT_PORT = 29500
"""Rendezvous port under SLURM when ``MASTER_PORT`` is not set."""


def _environment() -> tuple:
    """``(rank, world size, local rank)`` from torchrun's or srun's variables
    (torchrun's first: ``srun torchrun ...`` sets both). SLURM's are read only in a
    task started by ``srun`` (``SLURM_STEP_NUM_TASKS``): a batch script's own
    ``SLURM_NTASKS`` is the size of the allocation, not of a launch."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                int(os.environ.get("LOCAL_RANK", 0)))
    if "SLURM_STEP_NUM_TASKS" in os.environ and "SLURM_PROCID" in os.environ:
        return (int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_STEP_NUM_TASKS"]),
                int(os.environ.get("SLURM_LOCALID", 0)))
    return 0, 1, 0


def initialise(device: str = "cpu", timeout_minutes: float = 30.0) -> Optional[torch.device]:
    """Start the process group if launched among several processes (else do nothing).

    Parameters
    ----------
    device : str
        The device the fit runs on: ``"cuda"`` picks the ``nccl`` backend and the GPU of
        this process's local rank, anything else ``gloo``.
    timeout_minutes : float
        How long a collective operation waits for the other processes.

    Returns
    -------
    torch.device or None
        The device this process computes on (``cuda:<local rank>`` for ``"cuda"``);
        ``None`` when not launched among several processes.
    """
    rank, world_size, local_rank = _environment()
    if world_size <= 1:
        return None
    on_gpu = torch.device(device).type == "cuda"
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = _first_slurm_host()
        os.environ.setdefault("MASTER_PORT", str(DEFAULT_PORT))
        if on_gpu:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend="nccl" if on_gpu else "gloo", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
        atexit.register(_finish)  # a group left running at exit aborts the process
    return torch.device("cuda", local_rank) if on_gpu else torch.device(device)


def _finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _first_slurm_host() -> str:
    """The first host of the SLURM allocation (``scontrol show hostnames``)."""
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        raise RuntimeError("launched among several processes but neither MASTER_ADDR nor "
                           "SLURM_JOB_NODELIST is set: export MASTER_ADDR=<first host>")
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], check=True,
                               capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as error:
        raise RuntimeError(f"cannot expand SLURM_JOB_NODELIST '{nodes}' with scontrol ({error}): "
                           "export MASTER_ADDR=<first host> in the job script") from error
    return hosts[0]


def active() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes the run folder (process 0, or the only one)."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def on_main(context: ContextManager):
    """Enter ``context`` (claiming or locking the run folder) on process 0 only.

    If entering fails there, the other processes raise a ``RuntimeError`` with its
    message instead of waiting for process 0; they get ``None`` as the value.
    """
    if not active():
        with context as value:
            yield value
        return
    with contextlib.ExitStack() as stack:
        value = None
        if is_main():
            try:
                value = stack.enter_context(context)
            except Exception as error:
                broadcast_object(f"{type(error).__name__}: {error}")
                raise
        failure = broadcast_object(None)  # what process 0 sent
        if failure is not None:
            raise RuntimeError(f"process 0 stopped: {failure}")
        yield value


@contextlib.contextmanager
def rank_log(run_dir: str, console: bool = True) -> Iterator[logging.Logger]:
    """:func:`rholearn.runlog.run_log` on process 0; the others log nothing and do not
    repeat its warnings."""
    if is_main():
        with run_log(run_dir, console) as log:
            yield log
        return
    disabled, LOGGER.disabled = LOGGER.disabled, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield LOGGER
    finally:
        LOGGER.disabled = disabled


def shard(indices: Sequence[int]) -> List[int]:
    """This process's share of ``indices``: every ``world_size``-th from its rank."""
    return list(indices)[rank() :: world_size()]


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the processes, in place (and return it)."""
    if active():
        _in_place(lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM), tensor)
    return tensor


def all_reduce_sum(value: float, dtype: torch.dtype = torch.float64) -> float:
    """The sum of a number over the processes."""
    if not active():
        return value
    return float(all_reduce(torch.tensor([value], dtype=dtype))[0])


def broadcast(tensor: torch.Tensor, source: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` with process ``source``'s, in place (and return it)."""
    if active():
        _in_place(lambda t: dist.broadcast(t, source), tensor)
    return tensor


def _in_place(operation, tensor: torch.Tensor) -> None:
    """Run a collective ``operation`` on ``tensor``; under ``nccl``, a CPU tensor
    goes through the GPU and back."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        on_gpu = tensor.cuda()
        operation(on_gpu)
        tensor.copy_(on_gpu)
    else:
        operation(tensor)


def broadcast_object(value, source: int = 0):
    """Process ``source``'s ``value`` (any picklable object) on every process."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, source)
    return box[0]


def gather_objects(value) -> list:
    """``value`` of every process, in rank order."""
    if not active():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_module(module: torch.nn.Module, source: int = 0) -> None:
    """Give every process the parameters and buffers of process ``source``'s ``module``
    (its tensors; other state, such as metadata labels, is left as it is)."""
    if active():
        for value in module.state_dict().values():
            if isinstance(value, torch.Tensor):
                broadcast(value, source)


def all_reduce_gradients(parameters: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``parameters`` over the processes.

    A parameter no process touched keeps ``grad = None`` (as in one process, where
    optimisers skip it); one some processes touched gets the sum, with zeros for the
    others. The loss is a sum over structures, so the summed gradient is that of
    the loss over the union of the processes' structures.
    """
    if not active():
        return
    parameters = list(parameters)
    present = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float64,
                           device=parameters[0].device if parameters else None)
    flat = torch.cat([
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters
    ])
    all_reduce(present)
    all_reduce(flat)
    offset = 0
    for parameter, touched in zip(parameters, present.tolist()):
        size = parameter.numel()
        parameter.grad = flat[offset : offset + size].view_as(parameter).clone() if touched else None
        offset += size


class ShardedBatchSampler(torch.utils.data.Sampler):
    """This process's share of each batch a one-process loader would make.

    The structures are ordered by :class:`torch.utils.data.RandomSampler` with
    ``generator`` (so the generator's state, saved in checkpoints, evolves as in one
    process; in order without shuffling), cut into
    batches of ``batch_size``, and each batch is dealt round-robin to the processes.
    Summed over processes, every step sees the batch of one process: the same loss
    curve. A process may get an empty share (``[]``) of a small last batch; it still
    takes part in the step.

    Torch's ``DistributedSampler`` is not used: it orders each epoch by
    ``seed + epoch`` (another order than one process) and pads the shares by
    repeating structures, which a loss summed over structures would count twice.
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.size, self.batch_size, self.shuffle, self.generator = size, batch_size, shuffle, generator

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)

    def __iter__(self) -> Iterator[List[int]]:
        if self.shuffle:
            order = list(torch.utils.data.RandomSampler(range(self.size), generator=self.generator))
        else:
            order = list(range(self.size))
        for start in range(0, self.size, self.batch_size):
            yield order[start : start + self.batch_size][rank() :: world_size()]
