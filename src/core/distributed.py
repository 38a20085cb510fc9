"""Distributed set-up: one process per device, started by torchrun (README, "Scaling out").

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; this
module joins the process group (NCCL on CUDA, gloo on the CPU), and gives the
Trainer the few collectives it needs. In a single process every function here
is a no-op, so the Trainer reads the same either way.
"""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone runs the gate, writes logs and checkpoints, and shows progress."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def choose_device(cpu: bool, context: DistContext) -> torch.device:
    """CUDA when present unless --cpu; one device per local rank."""
    if not cpu and torch.cuda.is_available():
        torch.cuda.set_device(context.local_rank)
        return torch.device("cuda", context.local_rank)
    return torch.device("cpu")


def init_distributed(backend: str = "auto", timeout_seconds: float = 600.0, cpu: bool = False) -> DistContext:
    """Join the process group torchrun prepared; a single process when not under torchrun."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistContext()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and not cpu else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_seconds))
    return DistContext(
        rank=dist.get_rank(),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=dist.get_world_size(),
    )


def all_reduce_sum(tensor: torch.Tensor, context: DistContext) -> torch.Tensor:
    """The sum over ranks (in place); the tensor itself in a single process."""
    if context.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(value, context: DistContext):
    """Rank 0's `value` on every rank (the config, the run directory...)."""
    if not context.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(context: DistContext) -> None:
    if context.enabled:
        dist.barrier()


def shutdown(context: DistContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()
