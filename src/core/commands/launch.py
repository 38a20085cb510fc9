"""Starting the processes: `python run.py cfg.yaml` with several processes per node (or the
original `multigpu_parameters`) starts itself through torchrun's own launcher."""

import contextlib
import os
import signal
import threading

from src.core.config.validation import Config
from src.core.errors import UserError


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


PROCESSES_PER_DEVICE = 4  # more processes than this per CPU (or per GPU) on one node is a typo


def check_process_count(settings: dict) -> None:
    """Refuse a process count this machine cannot run before torchrun starts them: a million
    processes would hang it and leave a folder per rank under /tmp/torchelastic_*."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    limit = PROCESSES_PER_DEVICE * max(cpus, gpus)
    if settings["nproc_per_node"] > limit:
        devices = f"{cpus} CPUs" + (f" and {gpus} GPUs" if gpus else "")
        raise UserError(
            f"config key 'distributed.nproc_per_node': {settings['nproc_per_node']} processes on this node, which has "
            f"{devices}; expected at most {limit} (usually one per GPU, or a few on CPUs)"
        )


def launch_with_torchrun(settings: dict, script: str, argv: list[str]) -> int:
    """Run `script argv` in torchrun's elastic agent; return rank 0's exit code."""
    check_process_count(settings)
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
