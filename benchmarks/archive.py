"""6. Archiving, against moto's S3 server on localhost (a real S3 API, as in the tests).

- A one-shot `--archive` of a run holding a 1 GB checkpoint (upload, SHA-256 computed while
  sending, size check, manifest after it, run files) against a plain s3fs `put_file` of the
  same file, alternating, each to a fresh key.
- Training with a live Mirror attached to the checkpoint writer against the same training
  without it: the example (sample_runconfig.yaml: a checkpoint at each of 8 epoch ends), in
  one process, alternating, fit() timed (the final sync after training is reported apart).

python benchmarks/archive.py [REPETITIONS] [training,one-shot]   (run_all.py: section "archive")
"""

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, Comparison, in_process_trainer

sys.path.insert(0, str(REPO))
from src.core.archive import Mirror, Store, archive_run
from src.core.checkpoint import write_checkpoint
from tests.helpers import CREDENTIALS, MotoServer

GIGABYTE_FLOATS = 2**28  # 2^28 float32 values: 1 GiB


def one_shot_archive(scratch: Path, repetitions: int, bucket: str) -> Comparison:
    run = scratch / "logs" / "Bench" / "one-gigabyte"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("description: archive benchmark\n")
    (run / "metadata.yaml").write_text("status: finished\n")
    state = {"format": 1, "progress": {"global_step": 1, "epoch": 1, "batch_in_epoch": 0}}
    state["model"] = {"weight": torch.ones(GIGABYTE_FLOATS)}
    path = write_checkpoint(run / "checkpoints", state, links=("last",))
    del state
    store = Store(f"s3://{bucket}")
    counter = iter(range(10**6))

    def ours() -> float:
        location = f"s3://{bucket}/ours-{next(counter)}"
        started = time.perf_counter()
        report = archive_run(run, location)
        seconds = time.perf_counter() - started
        assert report.uploaded == [path.name], report
        store.fs.rm(location.removeprefix("s3://"), recursive=True)  # moto holds objects in memory
        return seconds

    def plain() -> float:
        key = f"{bucket}/plain-{next(counter)}/{path.name}"
        started = time.perf_counter()
        store.fs.put_file(str(path), key)
        seconds = time.perf_counter() - started
        store.fs.rm_file(key)
        return seconds

    ours(), plain()  # warm-up
    a, b = [], []
    for _ in range(repetitions):
        a.append(ours())
        b.append(plain())
    return Comparison("1 GiB checkpoint: --archive (verified) / plain s3fs put_file", a, b)


def training_with_mirror(scratch: Path, repetitions: int, bucket: str) -> tuple[list[Comparison], list[float]]:
    config = (
        (REPO / "sample_runconfig.yaml")
        .read_text()
        .replace("data_directory: data/pendulum", f"data_directory: {REPO / 'data' / 'pendulum'}")
    )
    counter = iter(range(10**6))
    final_syncs, cpu = [], {True: [], False: []}  # process CPU seconds (every thread): robust to a busy machine

    def fit(mirrored: bool) -> float:
        run = scratch / "runs" / f"run-{next(counter)}"
        run.mkdir(parents=True)
        trainer = in_process_trainer(config, run, mini=False)
        mirror = Mirror(run, f"s3://{bucket}/mirrored") if mirrored else None
        trainer.checkpoints.archive = mirror
        started, cpu_started = time.perf_counter(), time.process_time()
        trainer.fit()
        seconds = time.perf_counter() - started
        cpu[mirrored].append(time.process_time() - cpu_started)
        if mirror is not None:
            closing = time.perf_counter()
            assert mirror.close(120)
            final_syncs.append(time.perf_counter() - closing)
        return seconds

    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        fit(True), fit(False)  # warm-up
        final_syncs.clear()
        cpu[True].clear(), cpu[False].clear()
        a, b = [], []
        for _ in range(repetitions):
            a.append(fit(True))
            b.append(fit(False))
    name = "the example (sample_runconfig.yaml, 8 epochs): fit() mirrored / not"
    return [Comparison(name, a, b), Comparison(f"{name}, process CPU time", cpu[True], cpu[False])], final_syncs


def run(repetitions: int, parts: str = "training,one-shot") -> tuple[list[Comparison], list[str]]:
    os.environ.update(CREDENTIALS)
    server = MotoServer()
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint
    try:
        Store("s3://bench").fs.mkdir("bench")
        comparisons, notes = [], []
        with tempfile.TemporaryDirectory(prefix="bench-archive-") as scratch:
            if "training" in parts:
                mirrored, final_syncs = training_with_mirror(Path(scratch), repetitions, "bench")
                comparisons += mirrored
                final = sorted(final_syncs)[len(final_syncs) // 2]
                notes.append(f"Final sync after training (Mirror.close): median {final:.3f} s.")
            if "one-shot" in parts:
                one_shot = one_shot_archive(Path(scratch), max(3, repetitions // 2), "bench")
                comparisons.append(one_shot)
                speeds = sorted(b / a for a, b in zip(one_shot.a, one_shot.b, strict=True))
                notes.append(
                    f"One-shot archive speed as a share of the plain put's: median {speeds[len(speeds) // 2]:.0%} "
                    f"({speeds[0]:.0%}–{speeds[-1]:.0%})."
                )
    finally:
        server.stop()
    return comparisons, notes


if __name__ == "__main__":
    comparisons, notes = run(int(sys.argv[1]) if len(sys.argv) > 1 else 3, *sys.argv[2:3])
    print("\n".join(c.row() for c in comparisons))
    print("\n".join(notes))
