"""Process-group set-up for `torchrun`: gloo on CPU, NCCL on CUDA; rank / world size from the environment.

``torchrun --nproc_per_node=N`` (and its multi-node flags) set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; a plain ``python`` run has none of them and is world size 1.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from sdlab.train.errors import TrainError

logger = logging.getLogger(__name__)

__all__ = ["DistContext", "all_reduce_grads", "init_distributed", "reporting_failure", "resolve_device"]

_FAILURE_KEY = "sdlab/failure"


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_mean(self, value: float) -> float:
        """Average of a float over ranks (for logging)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return float(t) / self.world_size

    def from_main(self, value: object) -> object:
        """Rank 0's ``value`` (any picklable object) on every rank: a decision only rank 0 takes."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_max(self, value: int) -> int:
        """The largest of an integer over ranks (the same on every rank)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def resolve_device(name: str, local_rank: int = 0, local_world_size: int = 1) -> torch.device:
    """"auto" -> cuda:<local_rank> when CUDA is available, else cpu; "cuda" -> cuda:<local_rank>. A CUDA index
    taken from the local rank needs a device for each of the machine's ``local_world_size`` processes, so
    that a machine with too few is refused alike by every process on it."""
    requested = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise TrainError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise TrainError(f"--device {name}: this torch build or machine has no CUDA device (use cpu or auto)")
    count = torch.cuda.device_count()
    if device.index is not None:
        if device.index >= count:
            raise TrainError(f"--device {name}: there are only {count} CUDA device(s)")
        return device
    if local_world_size > count:
        raise TrainError(f"--device {name}: the {local_world_size} processes on this machine need a CUDA device "
                         f"each, and there are only {count}")
    return torch.device(f"cuda:{local_rank}")


def init_distributed(device_name: str = "auto") -> DistContext:
    """Join the torchrun process group if the environment names one; otherwise a single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        logger.info("rank %d/%d joined the %s process group on %s", rank, world, backend, device)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world, device=device)


def reporting_failure(rank: int, local_rank: int, status: int) -> int | None:
    """Which process of a torchrun run reports a failure, so that one mistake gives one message: None when this
    one (failing with exit ``status``) does, else the status to exit with quietly, the reporting process's.

    Once the process group exists, the first process to fail reports: its rank and status go into the group's
    store, and a process that fails after it (typically a collective that lost that peer) finds them there.
    A store that cannot be reached has lost its host, a process that failed first: status 1.
    Before that, a mistake or an interrupt (status 2, 130) comes from the command line, the machine's files
    and devices, or a signal to the machine's processes: every process of a machine meets it, and the
    machine's first process (local rank 0) reports it. Anything else (a bug, a group that cannot form) may be
    this process's alone, and it reports it."""
    if not dist.is_initialized():
        return status if local_rank != 0 and status != 1 else None
    try:
        store = dist.distributed_c10d._get_default_store()
        first = store.compare_set(_FAILURE_KEY, "", f"{rank}:{status}").decode()
    except Exception:  # the store's host has exited
        return 1
    first_rank, first_status = (int(v) for v in first.split(":"))
    return None if first_rank == rank else first_status


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_grads(modules: list[nn.Module], world_size: int) -> None:
    """Average the gradients of every trainable parameter over ranks (what DDP's hooks do), for modules
    that were not run through a DDP wrapper. A parameter that no rank gave a gradient (one the loss never
    reaches) keeps ``grad`` None, as in one process, so AdamW leaves it alone (no weight decay either)."""
    if world_size <= 1:
        return
    params = [p for module in modules for p in module.parameters() if p.requires_grad]
    if not params:
        return
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    for p, any_rank in zip(params, has_grad.tolist()):
        if not any_rank:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world_size)
