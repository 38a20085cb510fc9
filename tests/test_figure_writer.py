"""Figures are drawn on the training thread and encoded and written on a thread of their own:
in order, with a failed write raised on the training thread (tests/test_measures.py runs them
through whole runs, into figures/ and TensorBoard)."""

import io
import threading

import pytest
import torch
from PIL import Image

from src.core.training.figures import FigureWriter
from src.core.training.measures import prepare_figure


def test_figures_are_written_in_the_order_given_on_another_thread():
    written, threads = [], set()

    def write(step, phase, name, png):
        written.append((step, name, png))
        threads.add(threading.current_thread().name)

    writer = FigureWriter(write)
    for step in range(20):
        writer.put(step, "rollout", f"f{step}", lambda step=step: bytes([step]))
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
        writer.put(step, "rollout", "f", lambda: b"png")
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
    png = encode()
    assert Image.open(io.BytesIO(png)).format == "PNG"


def test_an_image_tensor_is_copied_so_the_model_may_reuse_it():
    image = torch.zeros(1, 2, 2)
    encode = prepare_figure("zeros", image)
    image.fill_(1.0)  # the model draws into the same tensor next time
    with Image.open(io.BytesIO(encode())) as decoded:
        assert decoded.tobytes() == bytes(4)
