"""Train a model from a YAML config, and log every result with the code that made it.

    python run.py CONFIG.yaml [flags] [--key.path=value ...]
    python run.py --resume RUN_DIR | --evaluate RUN_DIR | --reproduce RUN_DIR | --runs | --note RUN_DIR TEXT
    python run.py --export RUN_DIR --to wandb|mlflow
    python run.py --diff RUN_A RUN_B [--json] [--full-diff]

Training reads top to bottom in `train`: parse -> plan -> build -> fit. Your code is in
src/model.py, src/data_loader.py and src/schema.py; the machinery in src/core/ (README,
"Architecture"). Exit codes: 0 done, 2 bad command line, config or checkpoint, 3 refused
(repository state), 1 training failed, 4 --reproduce or --diff found differences, 130 Ctrl-C.
"""

import atexit
import contextlib
import os
import sys
import threading
from pathlib import Path

from src.core import faults
from src.core.commands.cli import CommandLine, parse_command_line
from src.core.commands.launch import launch_with_torchrun
from src.core.commands.planning import Request, make_plan, read_request
from src.core.commands.search import continue_search, is_search_directory, run_search, search_pruning
from src.core.commands.search_spec import is_search
from src.core.commands.session import gather_provenance, open_run
from src.core.commands.slurm import requeue_this_job
from src.core.commands.sweep import run_sweep
from src.core.distributed import (
    choose_device,
    connect,
    init_process_group,
    launched_by_torchrun,
    share_from_rank_zero,
    shutdown,
)
from src.core.errors import UserError, quiet_storage_errors_in_threads, report
from src.core.training.build import build_task
from src.core.training.policies import Stops, listen_for_preemption
from src.core.training.trainer import build_trainer, check_monitor_before_launch, check_monitor_before_training


def main(argv: list[str] | None = None) -> int:
    faults.arm()  # the crash tests' TEMPLATE_FAULT; nothing without it
    os.environ.setdefault("MPLBACKEND", "Agg")  # figures are drawn without a display
    quiet_storage_errors_in_threads()  # a full disk is reported once, by the training thread
    try:
        command = parse_command_line(argv)
        # Slurm's warning before the time limit (SIGUSR1), listened for first, so that none is lost.
        preemption = listen_for_preemption() if command.requeue else None
        answered = run_other_command(command)  # --archive, --runs, --diff, --evaluate...
        if answered is not None:
            return answered
        if command.resume and is_search_directory(command.resume):  # continue a search (a Slurm worker)
            return continue_search(command)
        # The config, read and validated once (a torchrun worker leaves it to rank 0).
        request = None if launched_by_torchrun() else read_request(command)
        if request is not None and request.sweep is not None:  # a grid, or a search (commands/search.py)
            return (run_search if is_search(request.sweep) else run_sweep)(command, request.sweep)
        return train(command, request, preemption)
    except UserError as error:  # the user's to fix: one message, no traceback
        return report(error)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run_other_command(command: CommandLine) -> int | None:
    """The commands that do not train (None: this one trains). Each one's module is imported only
    when it is asked for: a training run's start-up does not pay for them (0.1 s of imports)."""
    if command.archive or command.restore or command.delete_local_checkpoints:
        from src.core.commands.archiving import run_archive_command

        return run_archive_command(command)
    if command.runs is not None:  # a directory of runs, a sweep, or an archive URI
        from src.core.commands.runs import show_runs

        return show_runs(command)
    if command.diff:
        from src.core.commands.diff import diff_runs

        return diff_runs(command)
    if command.note:
        from src.core.commands.runs import set_note

        return set_note(Path(command.note[0]), command.note[1])
    if command.reproduce:
        from src.core.commands.reproduce import reproduce

        return reproduce(Path(command.reproduce), command.cpu, command.edits.overrides)
    if command.evaluate:
        from src.core.commands.evaluation import evaluate_run

        return evaluate_run(command)
    if command.export:
        from src.core.commands.export import export_run

        return export_run(Path(command.export), command.to, command.edits)
    return None


def train(command: CommandLine, request: Request | None, preemption: threading.Event | None) -> int:
    """parse -> plan -> build -> fit, in every process of the run."""
    if request is not None and request.processes > 1:  # torchrun starts them, each running this script
        plan = make_plan(command, request)
        if plan is None:  # --print-config; bad input is refused here, once
            return 0
        if plan.resume_from is None:  # a misspelled checkpoint.monitor too, not once per torchrun restart
            check_monitor_before_launch(plan.config, plan.data_directory, plan.mini)
        argv = [*command.argv, "--y"] if command.allow_dirty_repo else list(command.argv)
        return launch_with_torchrun(request.launch, __file__, argv)
    context = connect()  # torchrun's rank and store, or a single process
    status = 1
    try:
        # Plan: the config, the git gate, the data and the resume point (rank 0 decides for all).
        plan = share_from_rank_zero(context, "plan", lambda: make_plan(command, request, context))
        if plan is None:  # --print-config, or an --auto-resume of a finished run
            return 0
        config = plan.config
        gathering = gather_provenance(plan, context)  # the package list and data fingerprint, beside the build
        # Build: the device, the process group, then the model, its data and its loss.
        context = context.on(choose_device(command.cpu, context))
        init_process_group(context, config.distributed.backend, config.distributed.timeout_seconds)
        task = build_task(config, plan.data_directory, plan.mini, context.device, context.rank)
        if plan.resume_from is None:  # a misspelled checkpoint.monitor fails before anything is written
            check_monitor_before_training(config, task, context)

        # Fit: in the run directory (rank 0 creates or reopens it), or logging nothing. The Trainer
        # is built inside run.fit, so that a failure while building it is recorded too.
        with open_run(plan, command, context, gathering) as run:
            stops = Stops(preemption, pruning=search_pruning(run.directory, context))  # a search's trial

            def fit(output, start) -> dict:
                return build_trainer(config, task, context, output, stops).fit(start)

            status = run.fit(fit, on_preempted=requeue_this_job)
        return status
    finally:
        shutdown(context, finished=status == 0)


def exit_without_teardown(exit_code: int) -> None:
    """End the process once every file of the run is closed and fsynced (main has returned),
    skipping the interpreter's teardown: freeing torch's modules one by one costs a small run's
    exit more than its own closing work, and under torchrun gloo's threads can still abort a
    finished worker there (SIGABRT, seen under load). What a normal exit does first is done
    here: threads that are not daemons are joined, the atexit functions run (logging, the data
    loader's worker processes, the trackers' clients), the console is flushed. Files you opened
    yourself are closed by `with open(...)`; one left open is not flushed at this exit."""
    if not launched_by_torchrun():  # a torchrun worker skips these, as it always has
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can be said
            stream.flush()
    os._exit(exit_code)


if __name__ == "__main__":
    exit_without_teardown(main())
