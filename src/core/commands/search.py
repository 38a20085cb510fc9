"""A hyperparameter search: the search form of the `sweep:` section (commands/search_spec.py),
run by Optuna (optional: requirements-search.txt), with every trial an ordinary logged run.

The search lives in a sweep directory named after the search, so that the same command
started again continues it (docs/search.md):

    logs/<project>/search-<run_name or config file name>/
        sweep.yaml, code/, configs/, sweep.csv   as for a grid sweep (commands/sweep.py)
        study.journal         Optuna's study (journal file storage): trials, parameters, reports
        output/<trial>.log    each trial's console
        <trial>/              each trial's run directory

The driver asks the study for parameters, writes the trial's config with concrete values,
and runs `python run.py` on it in the sweep's worktree, `parallel` at a time. The trial
reports its objective at each evaluation and stops when the pruner says so (Trainer, Stops);
the driver tells the study how each trial ended, from the run's metadata.yaml. A trial still
running when the driver died is resumed from its checkpoint (`run.py --resume`).
"""

import contextlib
import ctypes
import signal
import subprocess
import sys
import time
from pathlib import Path

from src.core import faults
from src.core.commands.cli import CommandLine
from src.core.commands.search_spec import SearchSpec, check_search, read_search, trial_document
from src.core.commands.sweep import Sweep, member_name, trial_objective, write_table
from src.core.config.loader import dump_yaml
from src.core.config.schema import project_schema
from src.core.config.validation import Config, finalize
from src.core.distributed import DistContext, broadcast_object
from src.core.errors import UserError
from src.core.record.bootstrap import bootstrap_path
from src.core.record.environment import find_data_directory
from src.core.record.git import add_worktree, gate, remove_worktree
from src.core.record.rundir import CONFIG_FILE, METADATA_FILE, log_root, read_yaml, write_text_atomic

STUDY_FILE = "study.journal"
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
    it (the driver, each trial) gets the same sampler and pruner. A continued search draws on
    from `seed` + the trials it has already (the same seed again would repeat their values)."""
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
    existing = len(study.get_trials(deepcopy=False))
    if existing:
        study.sampler = make_sampler(spec, spec.seed + existing)
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


def open_search(command: CommandLine, document: dict, config: Config) -> tuple[Path, str, bool]:
    """The search directory (new, gated at HEAD; or the one this command made before, at its
    own commit) and its commit. A directory of another config is refused."""
    directory = search_directory(command, document, config)
    saved_file = directory / "sweep.yaml"
    if saved_file.exists():
        saved = read_yaml(saved_file) or {}
        if {key: value for key, value in saved.items() if key != "git"} != document or not (
            directory / STUDY_FILE
        ).exists():
            raise UserError(
                f"{directory} holds another search (another config or command line); set another "
                "run_name to start a new search, or run the same config to continue that one"
            )
        return directory, saved["git"]["commit"], True
    if directory.exists():
        raise UserError(f"{directory} exists and is not a search; set another run_name")
    git = gate()
    directory.mkdir(parents=True)
    (directory / "configs").mkdir()
    (directory / "output").mkdir()
    write_text_atomic(saved_file, dump_yaml({**document, "git": git}))
    return directory, git["commit"], False


def run_search(command: CommandLine, document: dict) -> int:
    """Check the search, open (or continue) its directory and study, and run its trials."""
    schema = project_schema()
    spec = check_search(document, schema)
    config = finalize(trial_document(document, {}, schema), schema)
    if command.print_config:
        print(dump_yaml({"search": spec.__dict__ | {"parameters": [p.__dict__ for p in spec.parameters]}}), end="")
        return 0
    if command.no_logging or command.allow_dirty_repo:
        raise UserError("a search logs every trial it runs, so it cannot run with --no-logging or --allow-dirty-repo")
    if command.slurm or command.submit:
        raise UserError("a search runs locally for now (docs/search.md); drop --slurm/--submit")
    import_optuna()  # before anything is written
    directory, commit, continued = open_search(command, document, config)
    code = directory / "code"
    if not (code / ".git").exists():
        remove_worktree(code)  # a registration left by a killed driver
        add_worktree(commit, code, "search")
    verb = "continuing" if continued else "starting"
    print(f"{verb} a search of {spec.trials} trial(s) at commit {commit[:12]}: {directory}", flush=True)
    flags = [flag for flag, on in (("--cpu", command.cpu), ("--mini", command.mini)) if on]
    mode = spec.mode or config.checkpoint.mode  # the objective's direction: checkpoint.mode by default
    driver = SearchDriver(Sweep(directory, code, [], commit), spec, document, flags, mode)
    try:
        return driver.run()
    finally:
        remove_worktree(code)


def die_with_parent() -> None:
    """In a trial's process: be killed when the driver dies (Linux), so that a killed search
    leaves no trial writing, and the next driver resumes it from its checkpoint alone."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class SearchDriver:
    """Asks the study for trials, runs `parallel` at a time, and tells the study how each ended."""

    def __init__(self, sweep: Sweep, spec: SearchSpec, document: dict, flags: list[str], mode: str):
        self.sweep, self.spec, self.document, self.flags = sweep, spec, document, flags
        self.study = open_study(sweep.directory, spec, mode)
        self.running: dict[int, tuple[subprocess.Popen, str]] = {}
        self.to_resume: list[tuple[int, str]] = []
        self.checkpointed: set[str] = set()

    def run(self) -> int:
        self.reconcile()
        while True:
            self.reap()
            while self.to_resume and len(self.running) < self.spec.parallel:
                self.start(*self.to_resume.pop(0))
            while len(self.running) < self.spec.parallel and self.asked() < self.spec.trials:
                self.ask()
            if not self.running:
                break
            self.watch_checkpoints()
            time.sleep(0.2)
        write_table(self.sweep.directory)
        return self.summary()

    def asked(self) -> int:
        return sum(1 for trial in self.study.get_trials(deepcopy=False) if "run" in trial.user_attrs)

    def reconcile(self) -> None:
        """After a killed driver: a trial the study still counts as running either ended (its
        metadata says so) or is resumed; one that never got its config is dropped."""
        for trial in self.study.get_trials(deepcopy=False, states=[self.trial_state("RUNNING")]):
            name = trial.user_attrs.get("run")
            if name is None:
                self.study.tell(trial.number, state=self.trial_state("FAIL"))
                continue
            status = self.status(name)
            if status in ("finished", "failed"):
                self.tell(trial.number, name, 0 if status == "finished" else 1)
            else:
                print(f"resuming trial {name} (it was running when the search stopped)", flush=True)
                self.to_resume.append((trial.number, name))

    def trial_state(self, name: str):
        import optuna

        return getattr(optuna.trial.TrialState, name)

    def ask(self) -> None:
        trial = self.study.ask()
        values = suggest(trial, self.spec)
        name = member_name(trial.number, max(self.spec.trials, trial.number + 1), values)
        config = finalize(trial_document(self.document, values, project_schema()), project_schema()).to_dict()
        config["data_directory"] = str(find_data_directory(config["data_directory"]))  # the worktree has no data
        if config.get("bootstrap_model_file"):
            config["bootstrap_model_file"] = str(bootstrap_path(config["bootstrap_model_file"]))
        write_text_atomic(self.sweep.directory / "configs" / f"{name}.yaml", dump_yaml({**config, "run_name": name}))
        trial.set_user_attr("run", name)  # from here on the trial counts, and a new driver resumes it
        self.start(trial.number, name)

    def start(self, number: int, name: str) -> None:
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
        self.running[number] = (process, name)
        faults.maybe_fail("search_trial_started")

    def watch_checkpoints(self) -> None:
        """The crash tests' kill point: a trial in flight has written its first checkpoint."""
        for _, name in list(self.running.values()):
            if name not in self.checkpointed and (self.sweep.directory / name / "checkpoints" / "last.pt").exists():
                self.checkpointed.add(name)
                faults.maybe_fail("search_trial_checkpointed")

    def reap(self) -> None:
        for number, (process, name) in list(self.running.items()):
            if process.poll() is not None:
                del self.running[number]
                self.tell(number, name, process.returncode)
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
