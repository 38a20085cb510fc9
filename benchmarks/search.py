"""9. What a search costs a trial: the example's `fit()` (--mini, 4 epochs, each with its
validation and rollout) as a trial that reports its objective to a real study after every
evaluation and asks the median pruner, against the same `fit()` outside a search; both in one
process, alternating. The study is an Optuna journal file holding 20 finished trials of 8
reports each, so the pruner computes a real median (the trial is never pruned: its values
beat them all). A second line times the check alone (report + should_prune) against one
evaluation of the example.

python benchmarks/search.py [--repetitions N]   (needs requirements-search.txt)
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, alternate, in_process_trainer

sys.path.insert(0, str(REPO))
from src.core.commands.search import STUDY_FILE, journal_storage, trial_check
from src.core.config.loader import dump_yaml
from src.core.distributed import DistContext
from src.core.training.policies import PruningStop

CONFIG = f"""
description: search benchmark
data_directory: {REPO / "data" / "pendulum"}
model_type: PendulumModel
model_parameters: {{hidden_size: 32, num_layers: 2}}
loss_function: F.mse_loss
train_data_loader_type: PendulumSteps
test_data_loader_type: PendulumSteps
eval_data_loader_type: PendulumTrajectories
epochs: 4
batch_size: 16
"""


def study_with_history(directory: Path) -> Path:
    """A search directory whose study holds 20 finished trials and one running, named `trial`."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = {"search": {"pruner": {"type": "median", "n_startup_trials": 1}}}
    (directory / "sweep.yaml").write_text(dump_yaml({"sweep": search | {"parameters": {"seed": {"int": [0, 9]}}}}))
    study = optuna.create_study(study_name="search", storage=journal_storage(directory))
    for _ in range(20):
        trial = study.ask()
        for epoch in range(1, 9):
            trial.report(1e9, epoch)
        study.tell(trial, 1e9)
    study.ask().set_user_attr("run", "trial")
    assert (directory / STUDY_FILE).exists()
    return directory / "trial"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-search-") as scratch:
        run_directory = study_with_history(Path(scratch))
        check = trial_check(run_directory)

        def fit(pruning) -> float:
            trainer = in_process_trainer(CONFIG, None, mini=True)
            trainer.pruning = PruningStop(check, DistContext()) if pruning else None
            started = time.perf_counter()
            trainer.fit()
            return time.perf_counter() - started

        whole = alternate(
            "fit() as a search trial / outside a search", lambda: fit(True), lambda: fit(False), args.repetitions
        )
        trainer = in_process_trainer(CONFIG, None, mini=True)

        def one_check() -> float:
            started = time.perf_counter()
            check({"rollout/loss": 0.5}, 1, 1, "rollout/loss")
            return (time.perf_counter() - started) * 1000

        def one_evaluation() -> float:
            started = time.perf_counter()
            trainer.evaluate_and_log(epoch=1)
            return (time.perf_counter() - started) * 1000

        part = alternate(
            "report + should_prune / one evaluation", one_check, one_evaluation, args.repetitions * 4, "ms"
        )
    print("| measurement | A | B | A / B (median) | spread (min–max) |\n|---|---|---|---|---|")
    print(whole.row())
    print(part.row())


if __name__ == "__main__":
    main()
