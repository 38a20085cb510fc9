"""8. Archiving, against moto's S3 server on localhost (a real S3 API, as in the tests).

- A one-shot `--archive` of a run holding a 1 GB checkpoint (upload, SHA-256 computed while
  sending, size check, manifest after it, run files) against a plain s3fs `put_file` of the
  same file, alternating, each to a fresh key.
- The example as `make demo` runs it (sample_runconfig.yaml, logged: a checkpoint at each of
  8 epoch ends), whole process, with the archive set and without, alternating: the mirror's
  import, its uploads while training and the final sync are all inside the time measured.

python benchmarks/archive.py [REPETITIONS] [training,one-shot]   (run_all.py: section "archive")
"""

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from common import REPO, Comparison, epoch_seconds, measure, python, scratch_project

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the tests' helpers import each other as pytest sees them
from helpers import CREDENTIALS, MotoServer

from src.core.archive.commands import archive_run
from src.core.archive.store import Store
from src.core.record.checkpoint import write_checkpoint

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


def moto_cpu_seconds(server: MotoServer) -> float:
    """CPU time the S3 server has used so far: on this machine it competes with training for
    the same two cores, which a remote store would not."""
    fields = Path(f"/proc/{server.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def training_with_mirror(scratch: Path, repetitions: int, server: MotoServer) -> tuple[list[Comparison], list[str]]:
    """`python run.py sample_runconfig.yaml`, logged, as `make demo` runs it, with the archive set
    ($TEMPLATE_ARCHIVE_URI) and without; again with an upload pass after every checkpoint."""
    project = scratch_project(scratch)
    shutil.copytree(REPO / "data" / "pendulum", project / "data" / "pendulum")  # ignored: the tree stays clean
    counter = iter(range(10**6))
    archive = {"TEMPLATE_ARCHIVE_URI": "s3://bench/mirrored"}
    sides = {
        "not archived": ([], {}),
        "mirrored": ([], archive),
        "mirrored, a pass after every checkpoint": (["--archive.sync_interval_seconds=0"], archive),
    }
    results = {side: [] for side in sides}
    server_cpu = {side: [] for side in sides}
    for repetition in range(repetitions + 1):  # alternate the sides; the first round warms up
        for side, (flags, env) in sides.items():
            name = f"bench-{next(counter)}"
            command = [python(), "run.py", "sample_runconfig.yaml", "--cpu", f"--run_name={name}"]
            before = moto_cpu_seconds(server)
            measurement = measure([*command, *flags], project, env)
            metadata = yaml.safe_load((project / "logs" / "PendulumModel" / name / "metadata.yaml").read_text())
            assert not env or metadata["archive"]["status"] == "synced", metadata.get("archive")  # it did mirror
            if repetition:
                results[side].append(measurement)
                server_cpu[side].append(moto_cpu_seconds(server) - before)
    base = results["not archived"]
    comparisons, notes = [], []
    for side in list(sides)[1:]:
        name = f"the example (make demo's run, 8 epochs), whole process: {side} / not archived"
        comparisons.append(Comparison(name, [m.seconds for m in results[side]], [m.seconds for m in base]))
        comparisons.append(
            Comparison(f"{name}, CPU time", [m.cpu_seconds for m in results[side]], [m.cpu_seconds for m in base])
        )
        loop = [epoch_seconds(m.stdout) for m in results[side]]  # training alone: start-up and final sync aside
        comparisons.append(Comparison(f"{name}, training loop", loop, [epoch_seconds(m.stdout) for m in base]))
        notes.append(f"S3 server CPU per run, {side}: median {statistics.median(server_cpu[side]):.2f} s.")
    return comparisons, notes


def run(repetitions: int, parts: str = "training,one-shot") -> tuple[list[Comparison], list[str]]:
    os.environ.update(CREDENTIALS)
    server = MotoServer()
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint
    try:
        Store("s3://bench").fs.mkdir("bench")
        comparisons, notes = [], []
        with tempfile.TemporaryDirectory(prefix="bench-archive-") as scratch:
            if "training" in parts:
                mirrored, server_notes = training_with_mirror(Path(scratch), repetitions, server)
                comparisons += mirrored
                notes += server_notes
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
