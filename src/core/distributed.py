"""Distributed set-up: one process per device, started by torchrun (README, "Scaling out").

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT and keeps a
key-value store (a TCPStore) that outlives worker restarts. Rank 0 decides the plan
(config, git gate, run directory) and hands it to the other ranks through that store;
then every rank joins the process group, with the backend and timeout the config
asks for (NCCL on CUDA, gloo on the CPU by default). In a single process every
function here is a no-op, so the Trainer reads the same either way.
Starting the processes is src/core/commands/launch.py's job.
"""

import datetime
import os
import pickle
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from src.core.errors import UserError

STORE_PREFIX = "pytorch-template"


@dataclass(frozen=True)
class DistContext:
    """Where this process computes: its rank among `world_size` processes, and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    restart_count: int = 0  # torchrun's TORCHELASTIC_RESTART_COUNT: 0 on the first attempt
    store: object = field(default=None, compare=False, repr=False)  # torchrun's store, shared by all attempts
    device: torch.device = field(default=torch.device("cpu"), compare=False)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone runs the gate, writes logs and checkpoints, and shows progress."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def on(self, device: torch.device) -> "DistContext":
        """This context, computing on `device`."""
        return replace(self, device=device)

    def attempt_store(self):
        """Keys of this attempt only: a restarted group must not read the last attempt's keys."""
        return dist.PrefixStore(f"{STORE_PREFIX}/attempt-{self.restart_count}/", self.store)

    def remember(self, key: str, value: str) -> None:
        """Keep a value for later attempts (the run directory, so a restart resumes it)."""
        if self.store is not None:
            self.store.set(f"{STORE_PREFIX}/{key}", value)

    def recall(self, key: str) -> str | None:
        if self.store is None or not self.store.check([f"{STORE_PREFIX}/{key}"]):
            return None
        return self.store.get(f"{STORE_PREFIX}/{key}").decode()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def connect(timeout_seconds: float = 1800.0) -> DistContext:
    """Read torchrun's environment and connect to its store; no process group yet."""
    if not launched_by_torchrun():
        return DistContext()
    rank = int(os.environ["RANK"])
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=not agent_hosts_store and rank == 0,  # without torchrun's agent, rank 0 hosts it
        timeout=datetime.timedelta(seconds=timeout_seconds),
        wait_for_workers=False,
    )
    return DistContext(
        rank=rank,
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ["WORLD_SIZE"]),
        restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
        store=store,
    )


def share_from_rank_zero(context: DistContext, key: str, compute):
    """`compute()` on rank 0, its result on every rank (through the store, before any process
    group exists). A UserError on rank 0 stops every rank with the same exit code."""
    if not context.enabled:
        return compute()
    store = context.attempt_store()
    if context.is_main:
        try:
            outcome = (compute(), None)
        except UserError as error:
            outcome = (None, error)
        store.set(key, pickle.dumps(outcome))
    else:
        outcome = pickle.loads(store.get(key))  # waits for rank 0
    result, error = outcome
    if error is not None:
        raise error
    return result


def choose_device(cpu: bool, context: DistContext) -> torch.device:
    """CUDA when present unless --cpu; one device per local rank."""
    if not cpu and torch.cuda.is_available():
        torch.cuda.set_device(context.local_rank)
        return torch.device("cuda", context.local_rank)
    return torch.device("cpu")


def init_process_group(context: DistContext, backend: str, timeout_seconds: float) -> None:
    """Join the process group: NCCL on CUDA, gloo on the CPU, unless the config names one.

    A collective that waits longer than `timeout_seconds` (a dead rank) fails the job
    instead of hanging it.
    """
    if not context.enabled:
        return
    device = context.device
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend,
        store=context.attempt_store(),
        rank=context.rank,
        world_size=context.world_size,
        timeout=datetime.timedelta(seconds=timeout_seconds),
        device_id=device if device.type == "cuda" else None,
    )


def all_reduce_sum(tensor: torch.Tensor, context: DistContext) -> torch.Tensor:
    """The sum over ranks (in place); the tensor itself in a single process."""
    if context.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(value, context: DistContext):
    """Rank 0's `value` on every rank."""
    if not context.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(value, context: DistContext) -> list:
    """Every rank's `value`, in rank order."""
    if not context.enabled:
        return [value]
    gathered = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def shutdown(context: DistContext, finished: bool) -> None:
    """Leave the process group; after a run that every rank finished, meet in a barrier first.

    DDP keeps the process group, and so gloo's worker threads, alive until Python exits. A
    worker that is slow to drop the tensors of the last collective can then release them while
    the interpreter shuts down, which can abort the process (SIGABRT). A gloo barrier holds no
    tensors and waits for all earlier work, so the last collective is long settled when a rank
    leaves. After a failure other ranks may be stuck in a collective: no barrier then."""
    if context.enabled and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
