"""What the machine did each epoch, logged as `system/...`: peak memory, and the share of the
training epoch spent waiting for the data loader (docs/system-metrics.md)."""

import pytest
from helpers import QUICK_RUN, run_directory

from src.core.phases import WALL_CLOCK_METRICS
from src.core.tracking.metrics import read_metrics
from src.core.training.system import WaitClock, system_metrics

SLOW_DATASET = '''

class SlowPendulumSteps(PendulumSteps):
    """The example's training pairs, each taking 20 ms to load: a starved model."""

    def __getitem__(self, index: int) -> dict:
        import time

        time.sleep(0.02)
        return super().__getitem__(index)
'''


def system_values(run) -> dict[str, list[float]]:
    values = {}
    for record in read_metrics(run):
        if record["phase"] == "system":
            values.setdefault(record["name"], []).append(record["value"])
    return values


def test_a_model_starved_by_its_data_loader_waits_most_of_the_epoch(project):
    with open(project.root / "src" / "data_loader.py", "a") as stream:
        stream.write(SLOW_DATASET)
    project.commit("a dataset whose items take 20 ms each")
    result = project.run(*QUICK_RUN, "--epochs=2", "--train_data_loader_type=SlowPendulumSteps", "--run_name=slow")
    assert result.returncode == 0, result.stderr
    values = system_values(run_directory(project, "slow"))
    assert len(values["data_wait_fraction"]) == 2  # one per epoch
    assert all(fraction > 0.8 for fraction in values["data_wait_fraction"]), values


def test_the_example_is_not_starved_and_its_peak_memory_is_logged(project):
    # The whole example (400 steps an epoch): in a few steps' epoch, one hiccup of a loaded
    # machine, or the figure thread's turn at the interpreter, would be most of the epoch.
    result = project.run("sample_runconfig.yaml", "--cpu", "--epochs=2", "--run_name=example")
    assert result.returncode == 0, result.stderr
    values = system_values(run_directory(project, "example"))
    assert set(values) == {"peak_rss_mb", "data_wait_fraction"}  # on a CPU: no peak_cuda_mb
    assert all(fraction < 0.5 for fraction in values["data_wait_fraction"]), values
    assert len(values["peak_rss_mb"]) == 2 and all(peak > 50 for peak in values["peak_rss_mb"])  # torch alone


def test_the_wait_clock_counts_only_the_time_inside_next():
    import time

    def slow_batches():
        for batch in range(3):
            time.sleep(0.05)
            yield batch

    clock = WaitClock(slow_batches())
    assert list(clock) == [0, 1, 2]
    waited = clock.waited
    assert waited >= 0.15
    time.sleep(0.05)  # outside the iterator: not counted
    assert clock.waited == waited


@pytest.mark.parametrize("name", ["system/peak_rss_mb", "system/peak_cuda_mb", "system/data_wait_fraction"])
def test_comparisons_of_runs_leave_the_system_values_out(name):
    assert name in WALL_CLOCK_METRICS


def test_the_fraction_is_a_share_of_the_epoch():
    import torch

    values = system_metrics(waited_seconds=3.0, epoch_seconds=4.0, device=torch.device("cpu"))
    assert values["system/data_wait_fraction"] == 0.75
    assert "system/peak_cuda_mb" not in values and values["system/peak_rss_mb"] > 0
