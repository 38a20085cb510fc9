"""Distributed set-up: one process per device, started by torchrun (README, "Scaling out").

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT and keeps a
key-value store (a TCPStore) that outlives worker restarts. Rank 0 decides the plan
(config, git gate, run directory) and hands it to the other ranks through that store;
then every rank joins the process group, with the backend and timeout the config
asks for (NCCL on CUDA, gloo on the CPU by default). In a single process every
function here is a no-op, so the Trainer reads the same either way.

`python run.py cfg.yaml` with `distributed.nproc_per_node > 1` (or the original
`multigpu_parameters`) starts itself through torchrun's own launcher.
"""

import contextlib
import datetime
import os
import pickle
import signal
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from src.core.config import Config
from src.core.errors import UserError

STORE_PREFIX = "pytorch-template"


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    restart_count: int = 0  # torchrun's TORCHELASTIC_RESTART_COUNT: 0 on the first attempt
    store: object = field(default=None, compare=False, repr=False)  # torchrun's store, shared by all attempts

    @property
    def is_main(self) -> bool:
        """Rank 0 alone runs the gate, writes logs and checkpoints, and shows progress."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

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


def init_process_group(context: DistContext, backend: str, timeout_seconds: float, device: torch.device) -> None:
    """Join the process group: NCCL on CUDA, gloo on the CPU, unless the config names one.

    A collective that waits longer than `timeout_seconds` (a dead rank) fails the job
    instead of hanging it.
    """
    if not context.enabled:
        return
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


# ---------------------------------------------------------------------------------------
# Starting the processes: `python run.py cfg.yaml` with several processes per node


def launch_settings(config: Config) -> dict:
    """The `distributed` section (the original template's `multigpu_parameters` are mapped onto
    it when the config is finalized: src/core/config.py, map_original_sections)."""
    return config.distributed.to_dict()


def torchrun_arguments(settings: dict) -> list[str]:
    """torchrun's flags for these settings: standalone on one node, else a c10d rendezvous."""
    arguments = [f"--nproc-per-node={settings['nproc_per_node']}", f"--max-restarts={settings['max_restarts']}"]
    if settings["nnodes"] == 1:
        return [*arguments, "--standalone"]
    if not settings.get("rdzv_endpoint"):
        raise UserError("distributed.nnodes > 1 needs distributed.rdzv_endpoint (host:port of the first node)")
    if settings.get("node_rank") is not None:  # the original template numbered its nodes: a static rendezvous
        host, _, port = settings["rdzv_endpoint"].rpartition(":")
        return [
            *arguments,
            f"--nnodes={settings['nnodes']}",
            f"--node-rank={settings['node_rank']}",
            f"--master-addr={host}",
            f"--master-port={port}",
        ]
    return [
        *arguments,
        f"--nnodes={settings['nnodes']}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={settings['rdzv_endpoint']}",
        f"--rdzv-id={settings.get('rdzv_id') or 'pytorch-template'}",
    ]


def launch_with_torchrun(settings: dict, script: str, argv: list[str]) -> int:
    """Run `script argv` in torchrun's elastic agent; return rank 0's exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    arguments = [*torchrun_arguments(settings), script, *argv]
    with forwarding_sigusr1_to_workers():
        print(f"starting {settings['nproc_per_node'] * settings['nnodes']} processes: torchrun {' '.join(arguments)}")
        try:
            run(get_args_parser().parse_args(arguments))
        except ChildFailedError as error:
            failures = error.failures
            first = failures.get(0) or next(iter(failures.values()))
            return first.exitcode if first.exitcode > 0 else 1
    return 0


@contextlib.contextmanager
def forwarding_sigusr1_to_workers():
    """Pass Slurm's warning before the time limit (SIGUSR1, for --requeue) on to the workers.

    It reaches this launcher, not its workers. Each worker that gets it checkpoints and
    stops, and rank 0 requeues the job. A worker still starting up has no handler yet,
    and SIGUSR1 would kill it, so it gets the signal once it has one (a thread keeps
    looking, which also covers workers that torchrun restarts).
    """
    requested, finished = threading.Event(), threading.Event()

    def forward() -> None:
        requested.wait()
        if not finished.is_set():
            print("SIGUSR1: passing it on to the workers (--requeue)", flush=True)
        signalled = set()
        while not finished.is_set():
            for pid in children_handling(signal.SIGUSR1) - signalled:
                with contextlib.suppress(ProcessLookupError):  # ended meanwhile
                    os.kill(pid, signal.SIGUSR1)
                signalled.add(pid)
            finished.wait(0.5)

    threading.Thread(target=forward, daemon=True, name="forward-SIGUSR1").start()
    previous = signal.signal(signal.SIGUSR1, lambda *_: requested.set())
    try:
        yield
    finally:
        finished.set()
        requested.set()  # lets the thread see `finished` and end
        signal.signal(signal.SIGUSR1, previous if previous is not None else signal.SIG_DFL)


def children_handling(signal_number: int) -> set[int]:
    """This process's children that have a handler for `signal_number` (SigCgt in Linux's /proc)."""
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as stream:
                fields = dict(line.split(":", 1) for line in stream if ":" in line)
        except OSError:  # ended meanwhile
            continue
        caught = int(fields.get("SigCgt", "0").strip(), 16) >> (signal_number - 1) & 1
        if caught and int(fields.get("PPid", "0")) == os.getpid():
            found.add(int(entry.name))
    return found
