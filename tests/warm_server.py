"""The warm-start server of tests/warm_start.py, started as `python tests/warm_server.py SOCKET`:
it imports what every `python run.py` pays to start, then forks a child per command and tells
the client the child's pid, then how it ended."""

import contextlib
import json
import os
import runpy
import select
import signal
import socket
import sys
import traceback

os.environ.setdefault("MPLBACKEND", "Agg")  # as run.py sets it, before matplotlib reads it

import cerberus  # noqa: F401 (imported once here, by every command's child already)
import matplotlib.pyplot  # noqa: F401 (the example model's figures)
import numpy  # noqa: F401
import torch
import torch._dynamo  # noqa: F401 (torch imports it when the first optimizer is made)
import tqdm  # noqa: F401
import yaml  # noqa: F401
from tensorboard.compat.proto import event_pb2, summary_pb2  # noqa: F401


def receive(connection: socket.socket) -> tuple[dict, list[int]]:
    """A request: a 12-digit length with the three descriptors (stdin, stdout, stderr), then
    that many bytes of JSON: {argv, cwd, env}."""
    header, fds, _, _ = socket.recv_fds(connection, 12, 3)
    while len(header) < 12:
        chunk = connection.recv(12 - len(header))
        if not chunk:
            raise ConnectionError("request cut short")
        header += chunk
    size, data = int(header), b""
    while len(data) < size:
        chunk = connection.recv(min(1 << 20, size - len(data)))
        if not chunk:
            raise ConnectionError("request cut short")
        data += chunk
    return json.loads(data), fds


def become(request: dict, fds: list[int]) -> None:
    """In the child: `python ARGV` in the request's directory, environment and streams; never returns."""
    for number in (signal.SIGTERM, signal.SIGCHLD, signal.SIGUSR1):
        signal.signal(number, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh interpreter has it
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = request["argv"]
    sys.path[0] = request["cwd"]  # the script's directory, as `python run.py` has it
    code = 1
    try:
        runpy.run_path(request["argv"][0], run_name="__main__")
        code = 0
    except SystemExit as exit:
        if exit.code is None or isinstance(exit.code, int):
            code = exit.code or 0
        else:
            print(exit.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def serve(address: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(64)
    print("ready", flush=True)
    waiting: dict[int, socket.socket] = {}  # child pid -> the connection that asked for it
    while True:
        if select.select([listener], [], [], 0.05)[0]:
            connection, _ = listener.accept()
            fds: list[int] = []
            try:
                request, fds = receive(connection)
            except Exception:  # the client starts this command cold
                traceback.print_exc()
                for fd in fds:
                    os.close(fd)
                connection.close()
                continue
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in [connection, *waiting.values()]:
                    other.close()
                become(request, fds)
            for fd in fds:
                os.close(fd)
            connection.sendall(f"{pid}\n".encode())
            waiting[pid] = connection
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = waiting.pop(pid, None)
            if connection is not None:
                with contextlib.suppress(OSError):  # a client gone (its test timed out)
                    connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                connection.close()


if __name__ == "__main__":
    serve(sys.argv[1])
