"""run.py ends without the interpreter's teardown, but only after what a normal exit does first:
threads that are not daemons finish, atexit functions run, the console is flushed."""

from helpers import QUICK_RUN

USER_CODE = """

import atexit
import threading


def _written(name: str) -> Path:  # under logs/, which git ignores: the gate never sees them
    (Path(__file__).resolve().parents[1] / "logs").mkdir(exist_ok=True)
    return Path(__file__).resolve().parents[1] / "logs" / name


def _write_later(name: str) -> None:
    import time

    time.sleep(1.0)
    _written(name).write_text("written")


threading.Thread(target=_write_later, args=("thread-done",)).start()  # not a daemon: exit waits for it
atexit.register(lambda: _written("atexit-done").write_text("written"))
"""


def test_a_finished_run_waits_for_the_users_threads_and_runs_atexit_functions(project):
    with open(project.root / "src" / "data_loader.py", "a") as stream:
        stream.write(USER_CODE)
    project.commit("a thread and an atexit function of the user's")
    result = project.run(*QUICK_RUN, "--epochs=1", "--run_name=exit")
    assert result.returncode == 0, result.stderr
    assert (project.root / "logs" / "thread-done").read_text() == "written"
    assert (project.root / "logs" / "atexit-done").read_text() == "written"
    assert "finished:" in result.stdout  # the last line printed is not lost
