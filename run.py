"""Train a model from a YAML config, and log every result with the code that made it.

    python run.py CONFIG.yaml [flags] [--key.path=value ...]
    python run.py --resume RUN_DIR | --evaluate RUN_DIR | --reproduce RUN_DIR | --runs | --note RUN_DIR TEXT
    python run.py --export RUN_DIR --to wandb|mlflow

Training reads top to bottom in `train`: parse -> plan -> build -> fit. Your code is in
src/model.py, src/data_loader.py and src/schema.py; the machinery in src/core/ (README,
"Architecture"). Exit codes: 0 done, 2 bad command line, config or checkpoint, 3 refused
(repository state), 1 training failed, 4 --reproduce found differences, 130 Ctrl-C.
"""

import functools
import os
import signal
import sys
import threading
from pathlib import Path

from src.core.archive import run_archive_command
from src.core.cli import parse_command_line
from src.core.distributed import (
    choose_device,
    connect,
    init_process_group,
    launch_with_torchrun,
    launched_by_torchrun,
    share_from_rank_zero,
    shutdown,
)
from src.core.errors import UserError, quiet_storage_errors_in_threads, report
from src.core.evaluation import evaluate_run
from src.core.planning import make_plan, read_request
from src.core.reproduce import reproduce
from src.core.resolve import build_parts
from src.core.runs import set_note, show_runs
from src.core.session import open_run
from src.core.sweep import requeue_this_job, run_sweep
from src.core.trackers import export_run
from src.core.trainer import Trainer, check_monitor_before_training

# Set by SIGUSR1 under --requeue (Slurm's warning before the time limit): checkpoint, then requeue.
PREEMPTION = threading.Event()


def main(argv: list[str] | None = None) -> int:
    quiet_storage_errors_in_threads()  # a full disk is reported once, by the training thread
    try:
        args = parse_command_line(argv)
        if args.requeue:  # installed first, so that no warning is lost
            signal.signal(signal.SIGUSR1, lambda *_: PREEMPTION.set())
        archived = run_archive_command(args)  # --archive, --restore
        if archived is not None:
            return archived
        if args.runs is not None:  # a directory of runs, a sweep, or an archive URI
            return show_runs(args)
        if args.note:
            return set_note(Path(args.note[0]), args.note[1])
        if args.reproduce:
            return reproduce(Path(args.reproduce), args.cpu, args.edits.overrides)
        if args.evaluate:
            return evaluate_run(args)
        if args.export:
            return export_run(Path(args.export), args.to)
        # The config, read and validated once (a torchrun worker leaves it to rank 0).
        request = None if launched_by_torchrun() else read_request(args)
        if request is not None and request.sweep is not None:
            return run_sweep(args, request.sweep)
        return train(args, request)
    except UserError as error:  # the user's to fix: one message, no traceback
        return report(error)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def train(args, request) -> int:
    """parse -> plan -> build -> fit, in every process of the run."""
    if request is not None and request.processes > 1:  # torchrun starts them, each running this script
        if make_plan(args, request) is None:  # --print-config; bad input is refused here, once
            return 0
        argv = [*args.argv, "--y"] if args.allow_dirty_repo else args.argv
        return launch_with_torchrun(request.launch, __file__, argv)
    context = connect()  # torchrun's rank and store, or a single process
    status = 1
    try:
        # Plan: the config, the git gate, the data and the resume point (rank 0 decides for all).
        plan = share_from_rank_zero(context, "plan", lambda: make_plan(args, request, context))
        if plan is None:  # --print-config
            return 0
        config = plan.config
        # Build: the device, the process group, then the model, its data and its loss.
        device = choose_device(args.cpu, context)
        init_process_group(context, config.distributed.backend, config.distributed.timeout_seconds, device)
        model, datasets, loss_function = build_parts(config, plan.data_directory, plan.mini, device, context.rank)
        if plan.resume_from is None:  # a misspelled checkpoint.monitor fails before anything is written
            check_monitor_before_training(config, model, loss_function, datasets, device, context)
        # Fit: in the run directory (rank 0 creates or reopens it), or logging nothing.
        with open_run(plan, args, context) as run:
            trainer = functools.partial(  # built inside run.fit: a failure while building it is recorded too
                Trainer,
                config,
                model,
                loss_function,
                datasets,
                device=device,
                context=context,
                run_directory=run.directory,
                archive=run.mirror,
                resume_state=run.checkpoint,
                commit=run.commit,
                config_hash=run.config_hash,
                preemption=PREEMPTION if args.requeue else None,
                show_progress=config.progress_bar is True or (config.progress_bar == "auto" and sys.stderr.isatty()),
                branched=run.branched,
            )
            status = run.fit(lambda: trainer().fit(), on_preempted=requeue_this_job)
        return status
    finally:
        shutdown(context, finished=status == 0)


if __name__ == "__main__":
    exit_code = main()
    if launched_by_torchrun():  # every file is closed: skip the interpreter's teardown, where gloo's
        sys.stdout.flush()  # threads can still abort a finished worker (SIGABRT, seen under load)
        sys.stderr.flush()
        os._exit(exit_code)
    sys.exit(exit_code)
