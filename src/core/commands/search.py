"""A hyperparameter search: the search form of the `sweep:` section (commands/search_spec.py),
run by Optuna (optional: requirements-search.txt), with every trial an ordinary logged run.

The search lives in a sweep directory named after the search, so that the same command
started again continues it (docs/search.md):

    logs/<project>/search-<run_name or config file name>/
        sweep.yaml, code/, configs/, sweep.csv   as for a grid sweep (commands/sweep.py)
        study.journal         Optuna's study (journal file storage): trials, parameters, reports
        output/<trial>.log    each trial's console (and .lock, held by the driver running it)
        <trial>/              each trial's run directory
        search.sbatch, slurm/ with --slurm: the workers' array script and their output

The driver asks the study for parameters, writes the trial's config with concrete values,
and runs `python run.py` on it in the sweep's worktree, `parallel` at a time. The trial
reports its objective at each evaluation and stops when the pruner says so (Trainer, Stops);
the driver tells the study how each trial ended, from the run's metadata.yaml. A trial still
running when the driver died is resumed from its checkpoint (`run.py --resume`).

Several drivers can share one study: the workers of a Slurm array (`--slurm`), or `python run.py
--resume SEARCH_DIR` started twice. They take turns to ask for a trial (search.lock), so that
the search has `trials` trials in all, and each holds a lock on every trial it runs, so that a
trial whose lock is free has lost its driver and is resumed by the next driver that looks.
"""

import contextlib
import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from src.core import faults
from src.core.commands.cli import CommandLine
from src.core.commands.search_spec import SearchSpec, check_search, read_search, trial_document
from src.core.commands.slurm import submit, write_search_script
from src.core.commands.sweep import Sweep, member_flags, member_name, trial_objective, write_table
from src.core.config.loader import dump_yaml
from src.core.config.schema import project_schema
from src.core.config.validation import Config, finalize
from src.core.distributed import DistContext, broadcast_object
from src.core.errors import UserError
from src.core.record.environment import find_data_directory
from src.core.record.git import PROJECT_ROOT, add_worktree, gate, remove_worktree
from src.core.record.rundir import CONFIG_FILE, METADATA_FILE, log_root, read_yaml, write_text_atomic

STUDY_FILE = "study.journal"
LOCK_FILE = "search.lock"  # held while a driver asks for a trial or takes one over
SAVED_KEYS = ("git", "flags", "project")  # what sweep.yaml holds beside the config's document
STUDY_NAME = "search"
INSTALL = "pip install -r requirements-search.txt"


def import_optuna():
    """Optuna, imported only when a search runs."""
    try:
        import optuna
    except ImportError:
        raise UserError(f"a search (sweep.search) needs Optuna, which is not installed; {INSTALL}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def journal_storage(directory: Path):
    """The study's storage: a journal file in the search directory (shared filesystems too)."""
    optuna = import_optuna()
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(directory / STUDY_FILE)))


def make_sampler(spec: SearchSpec, seed: int):
    optuna = import_optuna()
    if spec.sampler == "grid":
        space = {parameter.key: parameter.values for parameter in spec.parameters}
        return optuna.samplers.GridSampler(space, seed=seed)
    return {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}[spec.sampler](seed=seed)


def make_pruner(spec: SearchSpec):
    optuna = import_optuna()
    options = {key: value for key, value in spec.pruner.items() if key != "type"}
    return {
        "median": optuna.pruners.MedianPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "none": optuna.pruners.NopPruner,
    }[spec.pruner["type"]](**options)


def open_study(directory: Path, spec: SearchSpec, mode: str, storage=None):
    """The study in `directory`'s journal file, created on first use; every process that opens
    it (the drivers, each trial) gets the same sampler and pruner. The sampler is seeded again
    before each trial is asked for (SearchDriver.ask), from `seed` and the trials so far."""
    optuna = import_optuna()
    storage = storage or journal_storage(directory)
    study = optuna.create_study(
        storage=storage,
        sampler=make_sampler(spec, spec.seed),
        pruner=make_pruner(spec),
        study_name=STUDY_NAME,
        direction="maximize" if mode == "max" else "minimize",
        load_if_exists=True,
    )
    return study


def suggest(trial, spec: SearchSpec) -> dict:
    """The trial's value of every parameter, drawn by the study's sampler."""
    values = {}
    for parameter in spec.parameters:
        low, high = parameter.values[0], parameter.values[-1]
        if parameter.kind == "choice":
            values[parameter.key] = trial.suggest_categorical(parameter.key, parameter.values)
        elif parameter.kind.endswith("int"):
            values[parameter.key] = trial.suggest_int(parameter.key, low, high, log=parameter.kind == "log_int")
        else:
            values[parameter.key] = trial.suggest_float(parameter.key, low, high, log=parameter.kind == "log_uniform")
    return values


# ---------------------------------------------------------------------------------------
# The trial's side: report at each evaluation, and ask whether to stop


def search_pruning(run_directory: Path | None, context: DistContext):
    """For a run that is a trial of a search (its parent holds the study, and the study has its
    trial running): a check `(metrics, epoch, step, monitored) -> stop reason or None` that
    reports the objective and asks the pruner. None for any other run (a reproduction, a run
    outside a search). Rank 0 alone talks to the study; the Trainer shares its answer."""
    check = trial_check(run_directory) if context.is_main else None
    if not broadcast_object(check is not None, context):  # every rank agrees, or collectives would hang
        return None
    return check or (lambda *_: None)  # the other ranks' answer comes from rank 0 (policies.PruningStop)


def trial_check(run_directory: Path | None):
    if run_directory is None or not (run_directory.parent / STUDY_FILE).is_file():
        return None
    sweep_directory = run_directory.parent
    spec = read_search(read_yaml(sweep_directory / "sweep.yaml"))
    storage = journal_storage(sweep_directory)
    study = import_optuna().load_study(
        study_name=STUDY_NAME, storage=storage, sampler=make_sampler(spec, spec.seed), pruner=make_pruner(spec)
    )
    trial = next((t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("run") == run_directory.name), None)
    if trial is None or trial.state.name != "RUNNING":
        return None
    study_id = storage.get_study_id_from_name(STUDY_NAME)
    live = import_optuna().trial.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, trial.number))

    def check(metrics: dict, epoch: int, step: int, monitored: str) -> str | None:
        metric = spec.objective or monitored
        value = metrics.get(metric)
        if value is None:  # not evaluated at this epoch: nothing to report
            return None
        live.report(float(value), epoch)  # epochs: comparable across trials whatever their batch size
        if not live.should_prune():
            return None
        return f"pruned at step {step} (epoch {epoch}: {metric} {value:.4g}, by the {spec.pruner['type']} pruner)"

    return check


# ---------------------------------------------------------------------------------------
# The driver


def search_directory(command: CommandLine, document: dict, config: Config) -> Path:
    """Where this search lives: named after run_name, else after the config file."""
    name = config.run_name or Path(command.config).stem
    return log_root(command.log_dir) / (config.project_name or config.model_type) / f"search-{name}"


def is_search_directory(path: str | Path) -> bool:
    """Whether `--resume PATH` names a search directory (continue the search) rather than a run."""
    return (Path(path) / STUDY_FILE).is_file() and (Path(path) / "sweep.yaml").is_file()


def open_search(command: CommandLine, document: dict, config: Config, flags: list[str]) -> tuple[Path, str, bool]:
    """The search directory (new, gated at HEAD; or the one this command made before, at its
    own commit) and its commit. A directory of another config, or other flags, is refused."""
    directory = search_directory(command, document, config)
    saved_file = directory / "sweep.yaml"
    if saved_file.exists():
        saved = read_yaml(saved_file) or {}
        if {key: value for key, value in saved.items() if key not in SAVED_KEYS} != document or not (
            directory / STUDY_FILE
        ).exists():
            raise UserError(
                f"{directory} holds another search (another config or command line); set another "
                "run_name to start a new search, or run the same config to continue that one"
            )
        check_same_flags(directory, saved, flags)
        return directory, saved["git"]["commit"], True
    if directory.exists():
        raise UserError(f"{directory} exists and is not a search; set another run_name")
    git = gate()
    directory.mkdir(parents=True)
    (directory / "configs").mkdir()
    (directory / "output").mkdir()
    saved = {**document, "git": git, "flags": flags, "project": str(PROJECT_ROOT)}  # relative paths start there
    write_text_atomic(saved_file, dump_yaml(saved))
    return directory, git["commit"], False


def check_same_flags(directory: Path, saved: dict, flags: list[str]) -> None:
    """Every trial of a search runs with the same --cpu and --mini (a search saved before
    they were recorded takes the flags it is continued with)."""
    if saved.get("flags") is not None and sorted(saved["flags"]) != sorted(flags):
        before = " ".join(saved["flags"]) or "neither --cpu nor --mini"
        raise UserError(
            f"{directory} was started with {before}, but is continued with {' '.join(flags) or 'neither'}; "
            "its trials must run alike: give the same flags"
        )


def run_search(command: CommandLine, document: dict) -> int:
    """Check the search, open (or continue) its directory and study, and run its trials here,
    or (--slurm) write and submit the array of workers that run them."""
    schema = project_schema()
    spec = check_search(document, schema)
    config = finalize(trial_document(document, {}, schema), schema)
    if command.print_config:
        print(dump_yaml({"search": spec.__dict__ | {"parameters": [p.__dict__ for p in spec.parameters]}}), end="")
        return 0
    if command.no_logging or command.allow_dirty_repo:
        raise UserError("a search logs every trial it runs, so it cannot run with --no-logging or --allow-dirty-repo")
    if command.snapshot or command.auto_resume or command.requeue:
        flag = "--snapshot" if command.snapshot else "--auto-resume" if command.auto_resume else "--requeue"
        raise UserError(
            f"{flag} does nothing for a search: it runs at a commit, and continues when the same command "
            "(or --resume SEARCH_DIR) runs again; drop it"
        )
    if (command.slurm or command.submit) and config.slurm.nodes > 1:
        raise UserError("slurm.nodes: a search's workers each run their trials on one node; set slurm.nodes: 1")
    import_optuna()  # before anything is written
    flags = member_flags(command)
    directory, commit, continued = open_search(command, document, config, flags)
    verb = "continuing" if continued else "starting"
    print(f"{verb} a search of {spec.trials} trial(s) at commit {commit[:12]}: {directory}", flush=True)
    if command.slurm or command.submit:
        open_study(directory, spec, spec.mode or config.checkpoint.mode)  # the workers find it there
        return submit_workers(directory, commit, spec, config.slurm.to_dict(), command.submit)
    return drive(directory, commit, spec, document, flags, spec.parallel)


def continue_search(command: CommandLine) -> int:
    """`--resume SEARCH_DIR`: run the search's remaining trials at its own commit, with its own
    flags. Under Slurm, each worker of the array (search.sbatch) is one of these."""
    directory = Path(command.resume)
    edits = command.edits
    if command.from_step is not None or command.snapshot or command.requeue or edits != type(edits)():
        raise UserError(
            f"--resume {directory} continues a search as it was asked (its commit, config and flags); "
            "drop --from-step, --snapshot, --requeue and config edits"
        )
    saved = read_yaml(directory / "sweep.yaml") or {}
    document = {key: value for key, value in saved.items() if key not in SAVED_KEYS}
    spec = check_search(document, project_schema())
    import_optuna()
    given = member_flags(command)
    if given:  # none: the search's own
        check_same_flags(directory, saved, given)
    flags = given if saved.get("flags") is None else saved["flags"]
    worker = os.environ.get("SLURM_ARRAY_TASK_ID") is not None and (directory / "search.sbatch").exists()
    commit = saved["git"]["commit"]
    print(f"continuing a search of {spec.trials} trial(s) at commit {commit[:12]}: {directory}", flush=True)
    return drive(directory, commit, spec, document, flags, 1 if worker else spec.parallel)


def drive(directory: Path, commit: str, spec: SearchSpec, document: dict, flags: list[str], parallel: int) -> int:
    """Run the search's trials from a worktree of its commit, `parallel` at a time. The last
    driver to stop removes the worktree (others may still run trials from it)."""
    code = directory / "code"
    mode = spec.mode or finalize(trial_document(document, {}, project_schema()), project_schema()).checkpoint.mode
    with open(directory / ".drivers.lock", "a") as drivers:
        fcntl.flock(drivers, fcntl.LOCK_SH)  # one per driver: the last one out can take it alone
        with search_lock(directory):
            ensure_worktree(code, commit)
        driver = SearchDriver(Sweep(directory, code, [], commit), spec, document, flags, mode, parallel)
        try:
            return driver.run()
        finally:
            with contextlib.suppress(BlockingIOError):
                fcntl.flock(drivers, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if not (directory / "search.sbatch").exists():  # Slurm workers may start later
                    remove_worktree(code)


def ensure_worktree(code: Path, commit: str) -> None:
    """The search's worktree at its commit, made again where a killed driver left only its registration."""
    if not (code / ".git").exists():
        remove_worktree(code)
        add_worktree(commit, code, "search")


def submit_workers(directory: Path, commit: str, spec: SearchSpec, settings: dict, submitting: bool) -> int:
    """--slurm: an array of `parallel` workers, each `run.py --resume SEARCH_DIR` (one trial at a
    time), sharing the study; the worktree stays for them."""
    code = directory / "code"
    ensure_worktree(code, commit)
    script = write_search_script(directory, code, settings, spec.parallel)
    if submitting:
        print(f"submitted job {submit(script)} ({script}): {spec.parallel} worker(s)")
    else:
        print(f"wrote {script}\nsubmit it with: sbatch {script}")
    print(f"follow it with: python run.py --runs {directory}")
    return 0


@contextlib.contextmanager
def search_lock(directory: Path):
    """One driver at a time asks the study for a trial or takes an orphaned one over."""
    with open(directory / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def hold_trial(directory: Path, name: str):
    """The lock a driver holds while its trial runs (released when the driver dies, however it
    dies). None: another driver holds it."""
    handle = open(directory / "output" / f"{name}.lock", "a")  # noqa: SIM115 (held while the trial runs)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def die_with_parent() -> None:
    """In a trial's process: be killed when the driver dies (Linux), so that a killed search
    leaves no trial writing, and the next driver resumes it from its checkpoint alone."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class SearchDriver:
    """Asks the study for trials, runs `parallel` at a time, and tells the study how each ended;
    takes over the trials of drivers that died."""

    def __init__(self, sweep: Sweep, spec: SearchSpec, document: dict, flags: list[str], mode: str, parallel: int):
        self.sweep, self.spec, self.document, self.flags = sweep, spec, document, flags
        self.parallel = parallel
        self.root = Path((read_yaml(sweep.directory / "sweep.yaml") or {}).get("project") or PROJECT_ROOT)
        self.study = open_study(sweep.directory, spec, mode)
        self.running: dict[int, tuple[subprocess.Popen, str, object]] = {}
        self.to_resume: list[tuple[int, str, object]] = []
        self.checkpointed: set[str] = set()

    def run(self) -> int:
        self.adopt()
        while True:
            self.reap()
            while self.to_resume and len(self.running) < self.parallel:
                self.start(*self.to_resume.pop(0))
            while len(self.running) < self.parallel and self.ask():
                pass
            if not self.running and not self.adopt():  # nothing left, not even another driver's orphan
                break
            self.watch_checkpoints()
            time.sleep(0.2)
        write_table(self.sweep.directory)
        return self.summary()

    def asked(self) -> int:
        return sum(1 for trial in self.study.get_trials(deepcopy=False) if "run" in trial.user_attrs)

    def adopt(self) -> int:
        """The trials the study counts as running whose driver is gone (their lock is free):
        ended ones are told, unfinished ones resumed here, as many as there is room for; one
        that never got its config is dropped. Returns how many are queued to resume."""
        mine = {name for _, name, _ in [*self.running.values(), *self.to_resume]}
        with search_lock(self.sweep.directory):
            for trial in self.study.get_trials(deepcopy=False, states=[self.trial_state("RUNNING")]):
                name = trial.user_attrs.get("run")
                if name is None:  # its driver died between asking and naming it (asking holds the lock)
                    self.study.tell(trial.number, state=self.trial_state("FAIL"))
                    continue
                if name in mine or len(self.running) + len(self.to_resume) >= self.parallel:
                    continue
                held = hold_trial(self.sweep.directory, name)
                if held is None:  # another driver runs it
                    continue
                status = self.status(name)
                if status in ("finished", "failed"):
                    self.tell(trial.number, name, 0 if status == "finished" else 1)
                    held.close()
                else:
                    print(f"resuming trial {name} (it was running when its driver stopped)", flush=True)
                    self.to_resume.append((trial.number, name, held))
        return len(self.to_resume)

    def trial_state(self, name: str):
        import optuna

        return getattr(optuna.trial.TrialState, name)

    def ask(self) -> bool:
        """A new trial from the study, if the search has fewer than `trials`; its config written
        and its run started. The sampler is seeded from `seed` and the trials so far, so that a
        continued search, or one of several drivers, does not draw the same values again."""
        with search_lock(self.sweep.directory):
            if self.asked() >= self.spec.trials:
                return False
            self.study.sampler = make_sampler(self.spec, self.spec.seed + len(self.study.get_trials(deepcopy=False)))
            trial = self.study.ask()
            values = suggest(trial, self.spec)
            name = member_name(trial.number, max(self.spec.trials, trial.number + 1), values)
            config = finalize(trial_document(self.document, values, project_schema()), project_schema()).to_dict()
            # Relative paths start at the project the search was started in (a worker runs in the worktree).
            config["data_directory"] = str(find_data_directory(str(self.root / config["data_directory"])))
            if config.get("bootstrap_model_file"):
                config["bootstrap_model_file"] = str(self.root / Path(config["bootstrap_model_file"]).expanduser())
            configs = self.sweep.directory / "configs"
            write_text_atomic(configs / f"{name}.yaml", dump_yaml({**config, "run_name": name}))
            held = hold_trial(self.sweep.directory, name)
            trial.set_user_attr("run", name)  # from here on the trial counts, and a new driver resumes it
        self.start(trial.number, name, held)
        return True

    def start(self, number: int, name: str, held) -> None:
        directory = self.sweep.directory
        if (directory / name / CONFIG_FILE).exists():
            command = ["run.py", "--resume", str(directory / name), *[f for f in self.flags if f == "--cpu"]]
        else:
            command = ["run.py", str(directory / "configs" / f"{name}.yaml"), "--run-parent", str(directory)]
            command += self.flags
        print(f"trial {name}: {'resumed' if command[1] == '--resume' else 'started'}", flush=True)
        with open(directory / "output" / f"{name}.log", "a") as log:
            process = subprocess.Popen(
                [sys.executable, *command],
                cwd=self.sweep.code,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        self.running[number] = (process, name, held)
        faults.maybe_fail("search_trial_started")

    def watch_checkpoints(self) -> None:
        """The crash tests' kill point: a trial in flight has written its first checkpoint."""
        for _, name, _ in list(self.running.values()):
            if name not in self.checkpointed and (self.sweep.directory / name / "checkpoints" / "last.pt").exists():
                self.checkpointed.add(name)
                faults.maybe_fail("search_trial_checkpointed")

    def reap(self) -> None:
        for number, (process, name, held) in list(self.running.items()):
            if process.poll() is not None:
                del self.running[number]
                self.tell(number, name, process.returncode)
                held.close()  # after the study knows: no other driver takes it over
                write_table(self.sweep.directory)

    def status(self, name: str) -> str | None:
        metadata_file = self.sweep.directory / name / METADATA_FILE
        return (read_yaml(metadata_file) or {}).get("status") if metadata_file.exists() else None

    def tell(self, number: int, name: str, returncode: int) -> None:
        """The study learns how the trial ended, from its run directory."""
        run_directory = self.sweep.directory / name
        metadata = read_yaml(run_directory / METADATA_FILE) if (run_directory / METADATA_FILE).exists() else {}
        if returncode != 0 or metadata.get("status") != "finished":
            self.study.tell(number, state=self.trial_state("FAIL"), skip_if_finished=True)
            print(f"trial {name}: failed (exit code {returncode}; see output/{name}.log)", flush=True)
            return
        if str(metadata.get("stop_reason") or "").startswith("pruned"):
            self.study.tell(number, state=self.trial_state("PRUNED"), skip_if_finished=True)
            print(f"trial {name}: {metadata['stop_reason']}", flush=True)
            return
        metric, value = trial_objective(run_directory, self.spec.objective, self.spec.mode)
        if value is None:
            self.study.tell(number, state=self.trial_state("FAIL"), skip_if_finished=True)
            print(f"trial {name}: finished without a value of {metric}", flush=True)
            return
        self.study.tell(number, value, skip_if_finished=True)
        print(f"trial {name}: complete, {metric} {value:.4g}", flush=True)

    def summary(self) -> int:
        trials = [trial for trial in self.study.get_trials(deepcopy=False) if "run" in trial.user_attrs]
        counts = {}
        for trial in trials:
            counts[trial.state.name.lower()] = counts.get(trial.state.name.lower(), 0) + 1
        print(f"\nsearch {self.sweep.directory}: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
        complete = [trial for trial in trials if trial.state.name == "COMPLETE"]
        if complete:
            best = self.study.best_trial
            print(f"best: {best.user_attrs['run']} with value {best.value:.4g} {best.params}")
        print(f"table: {self.sweep.directory / 'sweep.csv'}")
        return 1 if counts.get("fail") else 0
