"""`python run.py ...` for the tests, started warm.

Starting Python and importing torch costs every `python run.py` 2.3 s of CPU on these
machines, whatever it then does, and a third of the suite's time went to it. A server per test
worker (tests/warm_server.py) imports the packages once and forks a child for each command.
The child is a process of its own (its pid, exit code, signals, files), running run.py as
`__main__` with the command's arguments, working directory, environment and standard
streams: it skips only the interpreter's start and those imports. Nothing of the project is
imported by the server, so every test's copy of the project runs its own code.

Cold, as a user's shell starts them: a command whose environment changes how Python starts
(PYTHON* variables) or that is given a standard input, the processes a test starts itself
(torchrun, `make`, a run it kills from outside), and those run.py starts (torchrun's workers,
the members of a sweep, a search's trials, a reproduction at its commit).
TEMPLATE_TEST_COLD=1 starts every command cold.
"""

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

SERVER = Path(__file__).with_name("warm_server.py")
_lock = threading.Lock()
_server: dict = {}


def available(env: dict, stdin) -> bool:
    """Whether this command can start warm (see the module's docstring)."""
    if os.environ.get("TEMPLATE_TEST_COLD") or stdin is not subprocess.DEVNULL:
        return False
    return not any(key.startswith("PYTHON") for key in env)  # the server's are the suite's own


def _address(base_env: dict) -> str:
    """The server's socket, started on first use (one per test worker)."""
    with _lock:
        if _server.get("process") is None or _server["process"].poll() is not None:
            directory = tempfile.mkdtemp(prefix="warm-run-")
            address = os.path.join(directory, "socket")
            process = subprocess.Popen(
                [sys.executable, str(SERVER), address],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                env=base_env,
                text=True,
            )
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError("the warm-start server did not start")
            atexit.register(process.kill)
            _server.update(process=process, address=address)
        return _server["address"]


def run(argv: list[str], cwd: str, env: dict, timeout: float) -> subprocess.CompletedProcess | None:
    """`python ARGV` in `cwd` with `env`, warm; as subprocess.run(..., capture_output=True, text=True).
    None when the server could not start it (the caller then starts it cold)."""
    base_env = {**os.environ, "PYTHONHASHSEED": "0"}  # as helpers.Project runs every command
    with (
        open(os.devnull, "rb") as stdin,
        tempfile.TemporaryFile() as stdout,
        tempfile.TemporaryFile() as stderr,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection,
    ):
        payload = json.dumps({"argv": argv, "cwd": str(cwd), "env": env}).encode()
        try:
            connection.connect(_address(base_env))
            fds = [stream.fileno() for stream in (stdin, stdout, stderr)]
            socket.send_fds(connection, [f"{len(payload):012d}".encode()], fds)
            connection.sendall(payload)
            lines = _lines(connection)
            pid = int(next(lines))
        except (OSError, RuntimeError, ValueError):
            with _lock:  # started again for the next command
                if _server.get("process") is not None:
                    _server["process"].kill()
                _server.clear()
            return None
        connection.settimeout(timeout)
        try:
            returncode = int(next(lines))
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout) from None
        output = []
        for stream in (stdout, stderr):
            stream.seek(0)
            output.append(stream.read().decode("utf-8", errors="replace"))
    return subprocess.CompletedProcess([sys.executable, *argv], returncode, output[0], output[1])


def _lines(connection: socket.socket):
    """The server's answers, a line at a time: the child's pid, then its exit code."""
    buffer = b""
    while True:
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode()
        chunk = connection.recv(64)
        if not chunk:
            raise RuntimeError("the warm-start server closed the connection")
        buffer += chunk
