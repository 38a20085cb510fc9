"""Figures are drawn on the training thread and written on a thread of their own, matplotlib's
encoded in a helper process forked for them: in order, with a failed write raised on the
training thread, and the same PNG whichever way it was encoded (tests/test_measures.py runs
them through whole runs, into figures/ and TensorBoard)."""

import contextlib
import io
import os
import signal
import threading
from pathlib import Path

import pytest
import torch
from helpers import REPO
from PIL import Image

from src.core.training.figures import FigureEncoder, FigureWriter, figure_to_png
from src.core.training.measures import prepare_figure


def test_figures_are_written_in_the_order_given_on_another_thread():
    written, threads = [], set()

    def write(step, phase, name, png):
        written.append((step, name, png))
        threads.add(threading.current_thread().name)

    writer = FigureWriter(write)
    for step in range(20):
        writer.put(step, "rollout", f"f{step}", lambda encoder, step=step: bytes([step]))
    writer.wait()
    assert written == [(step, f"f{step}", bytes([step])) for step in range(20)]
    assert threads == {"figures"}


def test_a_failed_write_reaches_the_training_thread_and_stops_later_writes():
    written = []

    def write(step, phase, name, png):
        if step == 1:
            raise OSError(28, "No space left on device")
        written.append(step)

    writer = FigureWriter(write)
    for step in range(3):
        writer.put(step, "rollout", "f", lambda encoder: b"png")
    with pytest.raises(OSError, match="No space left"):
        writer.wait()
    assert written == [0]  # the figure after the failed one is not written
    writer.wait()  # raised once


def test_a_matplotlib_figure_leaves_pyplot_at_once_and_is_encoded_later():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots()
    axes.plot([0, 1], [1, 0])
    encode = prepare_figure("line", figure)
    assert plt.get_fignums() == []  # closed on the calling thread
    png = encode(None)
    assert Image.open(io.BytesIO(png)).format == "PNG"


def test_an_image_tensor_is_copied_so_the_model_may_reuse_it():
    image = torch.zeros(1, 2, 2)
    encode = prepare_figure("zeros", image)
    image.fill_(1.0)  # the model draws into the same tensor next time
    with Image.open(io.BytesIO(encode(None))) as decoded:
        assert decoded.tobytes() == bytes(4)


class DrawingProcess:
    """Draws nothing; writes the id of the process that draws its figure to `path` (picklable)."""

    def __init__(self, path):
        self.path = path

    def __call__(self, renderer):
        self.path.write_text(str(os.getpid()))


def matplotlib_figure(tmp_path, title="a line"):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3, 2))
    axes = figure.add_subplot()
    axes.plot([0, 1, 3], [1, 0, 2])
    axes.set_title(title)
    artist = axes.text(0.5, 0.5, "")
    artist.draw = DrawingProcess(tmp_path / "drawn-by")  # an instance attribute: pickled with the figure
    return figure


def test_a_matplotlib_figure_is_encoded_in_the_helper_process_into_the_same_png(tmp_path):
    import matplotlib

    encoder = FigureEncoder()
    try:
        figure = matplotlib_figure(tmp_path)
        png = encoder.encode(figure)
        helper = encoder.pid
        assert helper not in (None, os.getpid())
        assert (tmp_path / "drawn-by").read_text() == str(helper)
        assert png == figure_to_png(figure)  # here, in this process
        assert (tmp_path / "drawn-by").read_text() == str(os.getpid())

        # matplotlib's settings as they are at each figure, the helper's changed with the run's
        with matplotlib.rc_context({"savefig.facecolor": "red"}):
            red = encoder.encode(matplotlib_figure(tmp_path))
            assert encoder.pid == helper
            assert red == figure_to_png(matplotlib_figure(tmp_path)) != png
        assert encoder.encode(matplotlib_figure(tmp_path)) == png
    finally:
        encoder.close()
    assert encoder.pid is None
    with pytest.raises(ChildProcessError):  # waited for: nothing is left behind
        os.waitpid(helper, os.WNOHANG)


def test_what_the_helper_cannot_encode_is_encoded_here_and_its_errors_raised_here(tmp_path):
    encoder = FigureEncoder()
    try:
        unpicklable = matplotlib_figure(tmp_path)
        unpicklable.axes[0].lines[0].stored = lambda: None  # a lambda does not pickle
        assert encoder.encode(unpicklable) == figure_to_png(unpicklable)
        assert (tmp_path / "drawn-by").read_text() == str(os.getpid())

        failing = matplotlib_figure(tmp_path)
        failing.axes[0].texts[0].draw = None  # savefig fails: in the helper, then here with its traceback
        with pytest.raises(TypeError, match="not callable"):
            encoder.encode(failing)
        helper = encoder.pid
        assert helper is not None  # still there for the next figure
        assert encoder.encode(matplotlib_figure(tmp_path)) == figure_to_png(matplotlib_figure(tmp_path))

        os.kill(helper, signal.SIGKILL)  # the helper gone: this figure and later ones are encoded here
        assert encoder.encode(matplotlib_figure(tmp_path)) == figure_to_png(matplotlib_figure(tmp_path))
        assert encoder.broken and encoder.pid is None
        assert (tmp_path / "drawn-by").read_text() == str(os.getpid())
    finally:
        encoder.close()


def test_the_helper_ends_when_told_or_when_the_run_is_gone_though_forked_workers_hold_its_pipe(tmp_path):
    """A data loader's workers, forked after the helper, hold a copy of its requests' pipe: the
    helper must not wait for that pipe's end of file, at the run's close or after a kill -9."""
    import subprocess
    import sys
    import time

    script = f"""
import os, signal, sys, time
sys.path.insert(0, {str(REPO)!r})
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_figure_writer import matplotlib_figure
from pathlib import Path
from src.core.training.figures import FigureEncoder
encoder = FigureEncoder()
encoder.encode(matplotlib_figure(Path({str(tmp_path)!r})))
worker = os.fork()
if worker == 0:  # a data loader's worker: holds every descriptor of the run
    time.sleep(60)
    os._exit(0)
print(encoder.pid, worker, flush=True)
if sys.argv[1] == "close":
    encoder.close()
    print("closed", flush=True)
    os.kill(worker, signal.SIGKILL)
else:
    os.kill(os.getpid(), signal.SIGKILL)
"""
    for ending in ("close", "kill"):
        process = subprocess.Popen(
            [sys.executable, "-c", script, ending], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        helper, worker = (int(value) for value in process.stdout.readline().split())
        process.wait(timeout=60)  # a close waiting for the pipe's end of file would time out here
        if ending == "close":  # the script killed its worker, the pipe's last other holder, before ending
            # Read on through the reader of the first line: it may hold "closed" already (the
            # script can print both lines before that first read, on a loaded machine).
            assert process.stdout.read().strip() == "closed", process.stderr.read()
        deadline = time.monotonic() + 30
        while alive(helper) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(helper), ending
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for whoever adopted it to collect it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
