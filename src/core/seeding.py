"""Seeds and random states: everything exact resume and reproduction need from randomness.

- `seed_everything` seeds Python, NumPy and torch (CPU and CUDA).
- `rng_state` / `restore_rng_state` capture all four streams for a checkpoint.
- `isolated_rng` runs the evaluation phases on their own fixed streams, so
  evaluating (or not) never changes training, and `--evaluate` gets the same numbers.
- `seed_worker` seeds NumPy and Python in DataLoader workers from torch's worker seed,
  and makes each worker die with the training process (`die_with_parent`).
"""

import contextlib
import ctypes
import hashlib
import multiprocessing
import os
import random
import signal
import sys

import numpy as np
import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed from the run's seed and a purpose ("train", epoch 3...): stable everywhere."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # every CUDA device too


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: torch seeds each worker; give NumPy and Python the same seed.
    A worker also dies with the training process, even one killed by `kill -9`."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)
    if torch.utils.data.get_worker_info() is not None:  # never arm it in the training process itself
        die_with_parent()


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; elsewhere nothing).

    Without it, the DataLoader workers of a training process killed with `kill -9` live on
    until torch's own check notices, up to 5 s later, and indefinitely while they are inside
    a slow `__getitem__`, holding memory, GPU handles and open files. The signal follows
    the thread that started the worker, which for the Trainer's loaders is the main thread.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # no C library with prctl: nothing to arm
        return
    if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    # The parent may have died before the signal was armed: then it never comes, so act now.
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid and not _running(parent.pid):
        os.kill(os.getpid(), signal.SIGKILL)


def _running(pid: int) -> bool:
    """Whether a process exists and has not exited (a zombie has). Under the "forkserver" start
    method the OS parent is the server, not `pid`, so a living `pid` is not an orphan's sign."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            stat = stream.read()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def apply_torch_threads(threads: int | None) -> None:
    """The `torch_threads` config key: intra-op CPU threads, set before the model is built so
    that every operation of the run uses it (None: leave torch's default, one per core)."""
    if threads is not None:
        torch.set_num_threads(threads)


def configure_determinism(deterministic: bool | str, device: torch.device) -> bool:
    """Apply the `deterministic` config key ("auto": on for the CPU, off for CUDA); return it."""
    enabled = device.type == "cpu" if deterministic == "auto" else bool(deterministic)
    if enabled and device.type == "cuda":
        # cuBLAS needs this set before its first use to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # torch.use_deterministic_algorithms() also sets torch.compile's flag, importing the compiler
    # (0.8 s) to do so. Set the same two things without that import: the compiler reads its flag
    # from this variable whenever it is first imported.
    torch._C._set_deterministic_algorithms(enabled)
    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None:
        inductor.deterministic = enabled
    os.environ["TORCHINDUCTOR_DETERMINISTIC"] = "1" if enabled else "0"
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled
    return enabled


def rng_state() -> dict:
    """Every random stream, as tensors and plain values (loadable with weights_only=True)."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": numpy_state["state"]["pos"],
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        },
        "torch": torch.get_rng_state(),
        # Only where CUDA is in use: asking would start CUDA on a GPU machine during a --cpu run.
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def restore_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():  # as many devices as both runs see
        for device, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)


def _as_tuples(value):
    """random.setstate wants tuples; a checkpoint may hand back lists."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuples(item) for item in value)
    return value


@contextlib.contextmanager
def isolated_rng(seed: int):
    """Run a block on fresh streams seeded by `seed`, then put every stream back as it was."""
    saved = rng_state()
    seed_everything(seed)
    try:
        yield
    finally:
        restore_rng_state(saved)
