"""2. Start-up: wall time from process start to the end of the first training step,
minus the wall time of `python -c "import torch"`; and minus the same time of the plain
loop, since torch itself spends most of that first step importing its compiler stack
(torch._dynamo, on the optimizer's first step), which any training process pays.

The Trainer side is a logged run (git gate, run directory, provenance, TensorBoard
writer), stopped by the test-only TEMPLATE_FAULT=train_step:1:exit right after its first
optimizer step; the plain loop stops at the same point. Measured in turn, repeatedly.
"""

import statistics

from common import measure, python


def run(project, config: str, repetitions: int) -> list[str]:
    stop = {"TEMPLATE_FAULT": "train_step:1:exit"}
    commands = {
        "logged run": ([python(), "run.py", config, "--cpu"], stop),
        "--no-logging": ([python(), "run.py", config, "--cpu", "--no-logging"], stop),
        "plain loop": ([python(), "benchmarks/plain_loop.py", "--data", "data/bench", "--exit-after-first-step"], {}),
        "import torch": ([python(), "-c", "import torch"], {}),
    }
    seconds = {name: [] for name in commands}
    for repetition in range(repetitions + 1):  # the first round warms the file cache
        for name, (command, env) in commands.items():
            elapsed = measure(command, project, env).seconds
            if repetition:
                seconds[name].append(elapsed)
    rows = []
    for name in ("logged run", "--no-logging"):
        beyond_torch = [a - b for a, b in zip(seconds[name], seconds["import torch"], strict=True)]
        beyond_plain = [a - b for a, b in zip(seconds[name], seconds["plain loop"], strict=True)]
        rows.append(
            f"| {name} | {statistics.median(seconds[name]):.3f} s "
            f"| **{statistics.median(beyond_torch):.3f} s** ({min(beyond_torch):.3f}–{max(beyond_torch):.3f}) "
            f"| **{statistics.median(beyond_plain):+.3f} s** ({min(beyond_plain):+.3f}–{max(beyond_plain):+.3f}) |"
        )
    plain_beyond = [a - b for a, b in zip(seconds["plain loop"], seconds["import torch"], strict=True)]
    rows.append(
        f"| plain loop | {statistics.median(seconds['plain loop']):.3f} s "
        f"| {statistics.median(plain_beyond):.3f} s | — |"
    )
    return rows
