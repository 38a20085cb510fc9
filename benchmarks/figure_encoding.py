"""11. Where a figure's PNG encoding should run: on the training thread, on a thread beside it,
or in a helper process forked for it (what the template does: src/core/training/figures.py).

The small classifier of benchmark 6 (an MLP, 16 -> 128 -> 128 -> 3, batch 64, AdamW, one
intra-op thread), trained for 10 epochs of 188 steps on random points, and after each epoch
a confusion-matrix figure drawn on the training thread and handed to the template's
FigureWriter, which encodes it on the training thread itself (`inline`), on its writer
thread (`thread`) or in its helper process (`process`). Each side is a fresh process, run
alternately; the time is from the first step to the last figure written, and the CPU time
is the process's and its helper's. Ratios are to `inline`, the cost the plain loop pays.

python benchmarks/figure_encoding.py [--repetitions 5]
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIDES = ("inline", "thread", "process")
EPOCHS, STEPS, BATCH = 10, 188, 64


def confusion_figure(prediction, target):
    """The figure benchmark 6's model draws: a 3x3 confusion matrix with its counts."""
    import itertools

    import matplotlib.pyplot as plt
    import torch

    counts = torch.zeros(3, 3)
    for true, guessed in zip(target.tolist(), prediction.argmax(1).tolist(), strict=True):
        counts[true, guessed] += 1
    figure, axes = plt.subplots(figsize=(4, 4))
    axes.imshow(counts.numpy(), cmap="Blues")
    axes.set(xlabel="predicted", ylabel="true")
    for row, column in itertools.product(range(3), range(3)):
        axes.text(column, row, int(counts[row, column]), ha="center", va="center")
    return figure


def side(name: str) -> None:
    """One side, in this process: print its seconds and CPU seconds."""
    os.environ["MPLBACKEND"] = "Agg"
    sys.path.insert(0, str(REPO))
    import matplotlib.pyplot  # noqa: F401 (imported before timing, on every side)
    import torch
    import torch.nn.functional as F

    from src.core.training.figures import FigureWriter
    from src.core.training.measures import prepare_figure

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 3)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    features, labels = torch.randn(STEPS, BATCH, 16), torch.randint(0, 3, (STEPS, BATCH))
    written = []
    writer = FigureWriter(lambda step, phase, figure_name, png: written.append(len(png)))
    started = time.perf_counter()
    for epoch in range(EPOCHS):
        for step in range(STEPS):
            loss = F.cross_entropy(model(features[step]), labels[step])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            encode = prepare_figure("confusion", confusion_figure(model(features[0]), labels[0]))
        if name == "inline":
            written.append(len(encode(None)))
        elif name == "thread":  # on the writer's thread, not given the helper process
            writer.put(epoch, "rollout", "confusion", lambda encoder, encode=encode: encode(None))
        else:
            writer.put(epoch, "rollout", "confusion", encode)
    writer.wait()
    seconds = time.perf_counter() - started
    assert len(written) == EPOCHS
    print(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.side:
        return side(arguments.side)
    results = {name: {"wall": [], "cpu": []} for name in SIDES}
    for repetition in range(arguments.repetitions + 1):  # alternating; the first round warms up
        for name in SIDES:
            environment = {**os.environ, "OMP_NUM_THREADS": "1"}
            command = [sys.executable, __file__, "--side", name]
            process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=environment)
            output = process.stdout.read()
            _, status, usage = os.wait4(process.pid, 0)
            if status != 0:
                raise RuntimeError(f"{name} failed")
            if repetition:
                results[name]["wall"].append(float(output))
                results[name]["cpu"].append(usage.ru_utime + usage.ru_stime)
    print("| side | first step to last figure written | / inline (min–max) | process CPU | / inline |")
    print("|---|---|---|---|---|")
    for name in SIDES:
        cells = []
        for part in ("wall", "cpu"):
            ratios = [a / b for a, b in zip(results[name][part], results["inline"][part], strict=True)]
            value = statistics.median(results[name][part])
            cells.append(f"{value:.3f} s | **{statistics.median(ratios):.3f}×** ({min(ratios):.3f}–{max(ratios):.3f})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
