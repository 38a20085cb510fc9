"""1. Training overhead, and 5. peak memory: the Trainer against a plain PyTorch loop.

The same task on both sides (benchmarks/plain_loop.py): the example model on 20,000
pendulum pairs, batch 32 (625 steps an epoch), AdamW, 3 epochs, a validation pass
after each, deterministic algorithms, one process on the CPU. Timed two ways: the
whole process, as a user waits for it (start-up included, which benchmark 2 isolates),
and the training loop alone (the sum of the epoch durations each side prints). The
Trainer runs with its default features on (metrics.jsonl, TensorBoard, tqdm bars, best
and last checkpoints each epoch), and again with --no-logging. Lightning is a third
column when installed (whole process only).
"""

import importlib.util
import statistics
import subprocess

import yaml
from common import Comparison, epoch_seconds, measure, python

TASKS = {
    "tiny (the example model, 4.5k parameters)": {"hidden_size": 64, "num_layers": 2},
    "large (4 layers of 512, 0.8M parameters)": {"hidden_size": 512, "num_layers": 4},
}


def write_config(project, name: str, model_parameters: dict) -> str:
    config = {
        "description": f"benchmark: {name}",
        "data_directory": "data/bench",
        "model_type": "PendulumModel",
        "model_parameters": model_parameters,
        "loss_function": "F.mse_loss",
        "train_data_loader_type": "PendulumSteps",
        "test_data_loader_type": "PendulumSteps",
        "epochs": 3,
        "batch_size": 32,
        "optimizer": {"type": "AdamW", "lr": 1.0e-3},
        "progress_bar": True,  # default features on, though stderr is not a terminal here
    }
    path = f"bench_{model_parameters['hidden_size']}.yaml"
    (project / path).write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def prepare(project) -> dict[str, str]:
    """The benchmark data (20,000 training pairs) and one committed config per task."""
    subprocess.run(
        [python(), "data/generate_pendulum.py", "--out", "data/bench", "--train-trajectories", "200"],
        cwd=project,
        check=True,
        capture_output=True,
    )
    configs = {name: write_config(project, name, parameters) for name, parameters in TASKS.items()}
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "benchmark configs"], cwd=project, check=True)
    return configs


def run(project, configs: dict[str, str], repetitions: int) -> tuple[list[Comparison], list[str]]:
    data = project / "data" / "bench"
    with_lightning = importlib.util.find_spec("lightning") is not None

    comparisons, memory = [], []
    for name, parameters in TASKS.items():
        plain_args = ["--data", str(data), "--hidden-size", str(parameters["hidden_size"])]
        plain_args += ["--num-layers", str(parameters["num_layers"])]
        sides = {
            "plain": [python(), "benchmarks/plain_loop.py", *plain_args],
            "trainer": [python(), "run.py", configs[name], "--cpu"],
            "trainer, logging off": [python(), "run.py", configs[name], "--cpu", "--no-logging"],
        }
        if with_lightning:
            sides["lightning"] = [python(), "benchmarks/lightning_loop.py", *plain_args]
        results = {side: [] for side in sides}
        for repetition in range(repetitions + 1):  # alternate the sides; the first round warms up
            for side, command in sides.items():
                if repetition:
                    results[side].append(measure(command, project))
                else:
                    measure(command, project)
        plain_seconds = [m.seconds for m in results["plain"]]
        plain_loop = [epoch_seconds(m.stdout) for m in results["plain"]]
        for side in sides:
            if side == "plain":
                continue
            seconds = [m.seconds for m in results[side]]
            comparisons.append(Comparison(f"{name}: {side} / plain, whole process", seconds, plain_seconds))
            if side != "lightning":  # Lightning prints no epoch times
                loop = [epoch_seconds(m.stdout) for m in results[side]]
                comparisons.append(Comparison(f"{name}: {side} / plain, training loop", loop, plain_loop))
        plain_rss = statistics.median(m.max_rss_mib for m in results["plain"])
        trainer_rss = statistics.median(m.max_rss_mib for m in results["trainer"])
        memory.append(
            f"| {name} | {trainer_rss:.0f} MiB | {plain_rss:.0f} MiB | **{trainer_rss - plain_rss:+.0f} MiB** |"
        )
    return comparisons, memory
