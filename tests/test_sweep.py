"""Sweeps: expansion, naming, local sequential runs pinned to their commit, failures; the Slurm
array script (run with stand-ins, no cluster), the sweep table, and --requeue's signal forwarding."""

import csv
import os
import signal
import socket
import subprocess
import sys

import pytest
import yaml
from helpers import DATA, REPO
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from src.core.commands import sweep as sweep_module
from src.core.commands.runs import filter_rows
from src.core.commands.slurm import requeue_this_job, slurm_script
from src.core.commands.sweep import (
    Sweep,
    SweepMember,
    expand,
    format_value,
    member_name,
    member_rows,
    write_table,
)
from src.core.config.loader import parse_yaml
from src.core.config.schema import project_schema
from src.core.errors import UserError

SCHEMA = project_schema()

BASE = f"""\
description: sweep
data_directory: {DATA}
model_type: PendulumModel
model_parameters: {{hidden_size: 16, layer_sizes_unused: null}}
loss_function: F.mse_loss
train_data_loader_type: PendulumSteps
epochs: 1
batch_size: 8
"""


def document(extra: str) -> dict:
    text = BASE.replace(", layer_sizes_unused: null", "")
    return {**parse_yaml(text, "base"), **parse_yaml(extra, "extra")}


def test_cartesian_product_in_order_and_plain_lists_stay_plain():
    members = expand(
        document(
            "sweep: {optimizer.lr: [1.0e-3, 3.0e-4], model_parameters.hidden_size: [16, 32, 64]}\n"
            "data_loader_parameters: {train: {}}\n"
            "slurm: {extra_sbatch: ['--constraint=a100', '--exclusive']}\n"
        ),
        SCHEMA,
    )
    assert [(m.config["optimizer"]["lr"], m.config["model_parameters"]["hidden_size"]) for m in members] == [
        (1e-3, 16),
        (1e-3, 32),
        (1e-3, 64),
        (3e-4, 16),
        (3e-4, 32),
        (3e-4, 64),
    ]
    assert all(m.config["slurm"]["extra_sbatch"] == ["--constraint=a100", "--exclusive"] for m in members)
    assert all("sweep" not in m.config or m.config["sweep"] is None for m in members)


def test_a_list_value_can_itself_be_swept():
    members = expand(document("sweep: {loggers: [[tensorboard, jsonl], [jsonl]]}\n"), SCHEMA)
    assert [m.config["loggers"] for m in members] == [["tensorboard", "jsonl"], ["jsonl"]]


def test_member_names_are_short_and_readable():
    assert member_name(3, 12, {"optimizer.lr": 3e-4, "model_parameters.hidden": 64}) == "03-lr=3e-4,hidden=64"
    assert member_name(0, 2, {"a.size": 1, "b.size": 2}) == "0-a.size=1,b.size=2"  # same last part: whole keys
    assert member_name(1, 2, {"x": [1, 2], "name": "a/b c"}) == "1-x=_1,2_,name=a_b_c"
    assert [format_value(v) for v in (1e-3, 0.5, 0.01, 2.5e6, 0.0, True)] == [
        "1e-3",
        "0.5",
        "0.01",
        "2.5e6",
        "0",
        "True",
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("sweep: {optimizer.lrr: [0.1]}\n", "did you mean 'optimizer.lr'"),
        ("sweep: {optimizer.lr: []}\n", "expected a non-empty list of values"),
        ("sweep: {optimizer.lr: 0.1}\n", "expected a non-empty list of values"),
        ("sweep: {optimizer.lr: [fast]}\n", "sweep member 0-lr=fast: invalid config"),
        ("sweep: {model_type: [PendulumModel, Nope]}\n", "sweep member 1-model_type=Nope"),
        ("sweep: {seed: [0, 1, 2, 3], epochs: [1, 2, 3]}\nmax_sweep_size: 10\n", "4 x 3 values make 12 runs"),
        # One array script asks for one set of resources: varying them would be silently ignored.
        ("sweep: {slurm.time: ['1:00:00', '2:00:00']}\n", "sweep.slurm.time': a sweep cannot vary Slurm"),
        ("sweep: {slurm: [{nodes: 1}, {nodes: 2}]}\n", "sweep.slurm': a sweep cannot vary Slurm"),
    ],
)
def test_bad_sweeps_are_errors(extra, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        expand(document(extra), SCHEMA)


def write_sweep(project, name="sweep.yaml", **sweep):
    config = yaml.safe_load((project.root / "sample_runconfig.yaml").read_text())
    config.update(epochs=1, batch_size=8, sweep=sweep)
    (project.root / name).write_text(yaml.safe_dump(config, sort_keys=False))
    project.commit("a sweep")
    return name


def test_local_sweep_runs_every_member_in_its_own_run_directory(project):
    name = write_sweep(project, **{"optimizer.lr": [1.0e-3, 3.0e-4], "model_parameters.hidden_size": [16, 32]})
    result = project.run(name, "--mini", "--cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    (sweep,) = (project.root / "logs" / "PendulumModel").glob("sweep-*")
    members = [
        "0-lr=1e-3,hidden_size=16",
        "1-lr=1e-3,hidden_size=32",
        "2-lr=3e-4,hidden_size=16",
        "3-lr=3e-4,hidden_size=32",
    ]
    assert sorted(p.name for p in sweep.iterdir() if (p / "metadata.yaml").exists()) == members
    commit = project.git("rev-parse", "HEAD")
    for member in members:
        config = yaml.safe_load((sweep / member / "config.yaml").read_text())
        assert config["git"]["commit"] == commit and config["run_name"] == member
    assert yaml.safe_load((sweep / members[2] / "config.yaml").read_text())["optimizer"]["lr"] == 3e-4
    with open(sweep / "sweep.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["member"] for row in rows] == members and {row["status"] for row in rows} == {"finished"}
    assert all(float(row["rollout/loss"]) > 0 and float(row["rollout/final_angle_error"]) > 0 for row in rows)
    assert [(row["optimizer.lr"], row["model_parameters.hidden_size"]) for row in rows] == [
        ("0.001", "16"),
        ("0.001", "32"),
        ("0.0003", "16"),
        ("0.0003", "32"),
    ]  # a column per swept key
    hparams = EventAccumulator(str(sweep / members[3]))  # TensorBoard's HParams tab: values and metrics
    hparams.Reload()
    session = HParamsPluginData.FromString(hparams.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    values = session.session_start_info.hparams
    assert values["optimizer.lr"].number_value == 3e-4 and values["model_parameters.hidden_size"].number_value == 32
    assert yaml.safe_load((sweep / "sweep.yaml").read_text())["sweep"]["optimizer.lr"] == [1e-3, 3e-4]
    assert not (sweep / "code").exists() and len(project.git("worktree", "list").splitlines()) == 1


def test_a_failing_member_does_not_stop_the_others(project):
    name = write_sweep(project, **{"loss_function": ["F.mse_loss", "F.binary_cross_entropy", "F.l1_loss"]})
    result = project.run(name, "--mini", "--cpu")
    assert result.returncode == 1
    assert "2 of 3 finished" in result.stdout and "failed: 1-loss_function=F.binary_cross_entropy" in result.stdout
    (sweep,) = (project.root / "logs" / "PendulumModel").glob("sweep-*")
    with open(sweep / "sweep.csv") as stream:
        statuses = [row["status"] for row in csv.DictReader(stream)]
    assert statuses == ["finished", "failed", "finished"]


def test_a_bad_sweep_exits_2_and_writes_nothing(project):
    name = write_sweep(project, **{"optimizer.lrr": [0.1]})
    result = project.run(name, "--mini", "--cpu")
    assert result.returncode == 2 and "did you mean 'optimizer.lr'" in result.stderr
    assert project.written_files() == []


def start_local_sweep(project, name: str) -> subprocess.Popen:
    """`python run.py SWEEP`, returned once its first member starts: the sweep has passed the
    gate and made its worktree by then."""
    process = subprocess.Popen(
        [sys.executable, "run.py", name, "--mini", "--cpu"],
        cwd=project.root,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines = []
    while not (lines and lines[-1].startswith("=== sweep member")):
        line = process.stdout.readline()
        assert line, "the sweep ended before its first member started:\n" + "\n".join(lines)
        lines.append(line.strip())
    return process


def test_a_local_sweep_keeps_running_its_commit_while_the_tree_changes(project):
    name = write_sweep(project, **{"seed": [0, 1, 2]})
    started = project.git("rev-parse", "HEAD")
    process = start_local_sweep(project, name)
    model = project.root / "src" / "model.py"
    model.write_text(model.read_text().replace("0.1 * self.net(state)", "0.3 * self.net(state)"))
    project.commit("edited while the sweep runs")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    (sweep,) = (project.root / "logs" / "PendulumModel").glob("sweep-*")
    commits = {yaml.safe_load(p.read_text())["git"]["commit"] for p in sweep.glob("*/config.yaml")}
    assert commits == {started}


def test_ctrl_c_in_a_local_sweep_removes_its_worktree(project):
    process = start_local_sweep(project, write_sweep(project, **{"seed": [0, 1]}))
    (sweep,) = (project.root / "logs" / "PendulumModel").glob("sweep-*")
    assert (sweep / "code").is_dir()
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    assert process.returncode == 130
    assert not (sweep / "code").exists() and len(project.git("worktree", "list").splitlines()) == 1


def test_the_launcher_passes_sigusr1_on_to_workers_that_were_still_starting(project):
    """--requeue with two processes: the launcher (which Slurm signals) forwards the warning,
    waiting for each worker to install its handler (SIGUSR1 would kill it before), and ends
    with exit code 0 once rank 0 has checkpointed and stopped."""
    command = [sys.executable, "run.py", "sample_runconfig.yaml", "--mini", "--cpu", "--requeue", "--epochs=20"]
    process = subprocess.Popen(
        [*command, "--batch_size=8", "--distributed.nproc_per_node=2", "--run_name=warned"],
        cwd=project.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={key: value for key, value in os.environ.items() if not key.startswith("SLURM_")},
    )
    lines = [process.stdout.readline()]
    assert lines[0].startswith("starting 2 processes"), lines
    process.send_signal(signal.SIGUSR1)  # the workers are importing torch: no handler yet
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, lines[0] + output
    assert "stopped for preemption" in output and "not a Slurm job: continue it with --resume" in output
    run = project.root / "logs" / "PendulumModel" / "warned"
    metadata = yaml.safe_load((run / "metadata.yaml").read_text())
    assert metadata["status"] == "preempted" and 0 < metadata["global_step"] < 100
    assert metadata["last_checkpoint"]


# ---------------------------------------------------------------------------------------
# The Slurm array script, run with stand-ins for python, srun and scontrol (no cluster)


def slurm_settings(**changes) -> dict:
    return {**expand(document("seed: 0\n"), SCHEMA)[0].config["slurm"], **changes}


def fake_sweep(tmp_path) -> Sweep:
    directory = tmp_path / "Pendulum" / "sweep-1"
    (directory / "code").mkdir(parents=True)
    members = [SweepMember(index, f"{index}-seed={index}", {"seed": index}, {}) for index in range(3)]
    return Sweep(directory, directory / "code", members, "0" * 40)


def run_script(script: str, tmp_path, job_id: str = "4242") -> list[list[str]]:
    """Run array task 1 of `script`; each stand-in prints its name, working directory and arguments."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name in ("python", "srun"):
        (stubs / name).write_text(f'#!/bin/bash\necho "{name}|$PWD|$(printf "%s|" "$@")"\n')
    # show hostnames: a long list, which a reader that stops early would cut with a SIGPIPE
    (stubs / "scontrol").write_text("#!/bin/bash\nseq -f node%g 7 200000\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    (tmp_path / "task.sh").write_text(script)
    environment = {
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "PYTHON": str(stubs / "python"),
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_JOB_ID": job_id,
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[7-8]",
        "SLURM_CPUS_PER_TASK": "4",
    }
    result = subprocess.run(["bash", str(tmp_path / "task.sh")], env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [line.rstrip("|").split("|") for line in result.stdout.splitlines()]


SETUP = ['echo "setup|before set -u|[$NOT_SET_ANYWHERE]"']  # fails under set -u, as many module scripts do


def test_a_one_node_slurm_script_asks_for_the_config_and_execs_the_task(tmp_path):
    sweep = fake_sweep(tmp_path)
    settings = slurm_settings(
        partition="gpu",
        time="02:00:00",
        cpus_per_task=4,
        mem="16G",
        account="lab",
        qos="high",
        parallel=2,
        extra_sbatch=["--constraint=a100"],
        setup=SETUP,
        signal_seconds=300,
    )
    script = slurm_script(sweep, settings, ["--cpu", "--mini"], requeue=True)
    assert [line for line in script.splitlines() if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=Pendulum-sweep-1",
        "#SBATCH --array=0-2%2",
        f"#SBATCH --output={sweep.directory}/slurm/%A_%a.out",
        "#SBATCH --time=02:00:00",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --mem=16G",
        "#SBATCH --account=lab",
        "#SBATCH --qos=high",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@300",  # the batch shell, which exec made the task itself
        "#SBATCH --open-mode=append",
        "#SBATCH --constraint=a100",
    ]
    assert "29500" not in script and "srun" not in script  # run.py's torchrun --standalone picks a free port
    task = ["python", str(sweep.code), "run.py"]
    new = [str(sweep.directory / "configs" / "1-seed=1.yaml"), "--run-parent", str(sweep.directory)]
    assert run_script(script, tmp_path) == [
        ["setup", "before set -u", "[]"],
        [*task, *new, "--cpu", "--mini", "--requeue"],
    ]
    (sweep.directory / "1-seed=1").mkdir()
    (sweep.directory / "1-seed=1" / "config.yaml").write_text("{}\n")  # requeued: the run exists
    resumed = run_script(slurm_script(sweep, slurm_settings(), [], requeue=False), tmp_path)
    assert resumed == [[*task, "--resume", str(sweep.directory / "1-seed=1")]]
    plain = slurm_script(sweep, slurm_settings(), [], requeue=False)
    assert "--signal" not in plain and "--requeue" not in plain and "--gpus-per-node" not in plain


def test_a_multi_node_slurm_script_sruns_the_task_with_a_rendezvous_per_job(tmp_path):
    sweep = fake_sweep(tmp_path)
    settings = slurm_settings(nodes=2, gpus_per_node=4, cpus_per_task=4, setup=SETUP, signal_seconds=300)
    script = slurm_script(sweep, settings, ["--cpu"], requeue=True)
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --array=0-2" in sbatch and "#SBATCH --nodes=2" in sbatch
    assert "#SBATCH --gpus-per-node=4" in sbatch
    assert "#SBATCH --signal=USR1@300" in sbatch  # srun's steps (the launchers), not the batch shell
    (setup, srun) = run_script(script, tmp_path, job_id="4242")
    assert setup == ["setup", "before set -u", "[]"]
    assert srun == [
        "srun",
        str(sweep.code),
        "--ntasks-per-node=1",
        "--cpus-per-task=4",  # Slurm 22.05+ does not pass sbatch's on to srun
        str(tmp_path / "bin" / "python"),
        "run.py",
        str(sweep.directory / "configs" / "1-seed=1.yaml"),
        "--run-parent",
        str(sweep.directory),
        "--cpu",
        "--requeue",
        "--distributed.nproc_per_node=4",  # a process per GPU
        "--distributed.nnodes=2",
        "--distributed.rdzv_endpoint=node7:24242",  # the first node, a port of this job's own
    ]
    other = run_script(script, tmp_path, job_id="4243")[1]
    assert other[-1] == "--distributed.rdzv_endpoint=node7:24243"  # another task: another port


def test_member_rows_filter_like_runs_and_the_table_leaves_out_slurm_states(tmp_path):
    sweep = tmp_path / "sweep-1"
    (sweep / "configs").mkdir(parents=True)
    for name, description, status in (
        ("0-lr=1", "small", "finished"),
        ("1-lr=2", "big", "failed"),
        ("2-lr=3", "big", None),
    ):
        (sweep / "configs" / f"{name}.yaml").write_text(yaml.safe_dump({"description": description}))
        if status:
            (sweep / name).mkdir()
            (sweep / name / "metadata.yaml").write_text(yaml.safe_dump({"status": status}))
    assert [row["status"] for row in member_rows(sweep)] == ["finished", "failed", "not started"]
    assert [row["member"] for row in filter_rows(member_rows(sweep), status="failed")] == ["1-lr=2"]
    assert [row["member"] for row in filter_rows(member_rows(sweep), "LR=3", "not started")] == ["2-lr=3"]
    assert filter_rows(member_rows(sweep), "lr=3", "finished") == []
    (sweep / "slurm.json").write_text('{"job_id": "999999999"}\n')  # a job Slurm does not know (if present)
    assert [row["slurm"] for row in member_rows(sweep)] == ["-", "-", "-"]
    write_table(sweep)
    with open(sweep / "sweep.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [(row["member"], row["status"]) for row in rows] == [
        ("0-lr=1", "finished"),
        ("1-lr=2", "failed"),
        ("2-lr=3", "not started"),
    ]
    assert "slurm" not in rows[0]


def test_a_multi_node_task_trains_one_run_across_its_nodes(project, tmp_path):
    """The script's srun line, with a stand-in srun that starts the task twice on this machine
    as srun would on two nodes: both meet at the c10d rendezvous and train one run."""
    config = yaml.safe_load((project.root / "sample_runconfig.yaml").read_text())
    config.update(epochs=1, batch_size=8, sweep={"seed": [3]}, slurm={"nodes": 2})
    (project.root / "nodes.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    project.commit("a sweep on two nodes")
    result = project.run("nodes.yaml", "--mini", "--cpu", "--slurm")
    assert result.returncode == 0, result.stderr
    (sweep,) = (project.root / "logs" / "PendulumModel").glob("sweep-*")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "srun").write_text(  # skip srun's own options, then run the task twice
        '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"$@" & other=$!\n"$@"; mine=$?\n'
        "wait $other && exit $mine\n"
    )
    (stubs / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    job = next(port - 20000 for port in range(20000 + os.getpid() % 10000, 40000) if port_is_free(port))
    environment = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    environment.update(
        PATH=f"{stubs}:{os.environ['PATH']}",
        SLURM_ARRAY_TASK_ID="0",
        SLURM_JOB_ID=str(job),
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="node[1-2]",
        SLURM_CPUS_PER_TASK="1",
    )
    task = subprocess.run(
        ["bash", str(sweep / "sweep.sbatch")], env=environment, capture_output=True, text=True, timeout=600
    )
    assert task.returncode == 0, task.stdout + task.stderr
    run = sweep / "0-seed=3"
    assert yaml.safe_load((run / "metadata.yaml").read_text())["status"] == "finished"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["environment"]["world_size"] == 2
    assert saved["distributed"]["rdzv_endpoint"] == f"127.0.0.1:{20000 + job}"
    with open(sweep / "sweep.csv") as stream:
        assert [row["status"] for row in csv.DictReader(stream)] == ["finished"]


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_an_array_task_requeues_itself_not_its_whole_array(monkeypatch):
    """One task of an array has the array's own job id: `scontrol requeue <that id>` would
    requeue every task, the ones that are running or done included."""
    calls = []
    monkeypatch.setattr(
        sweep_module.subprocess,
        "run",
        lambda command, **_: calls.append(command) or subprocess.CompletedProcess(command, 0),
    )
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "9")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert requeue_this_job() == "requeued Slurm job 9_1" and calls == [["scontrol", "requeue", "9_1"]]


def test_a_tasks_setup_can_reach_the_checkout_the_sweep_was_submitted_from(tmp_path):
    """Each task runs in the sweep's worktree, which has no .venv: `slurm.setup` reaches the
    submitting checkout's as "$TEMPLATE_PROJECT/.venv/bin/activate"."""
    settings = slurm_settings(setup=['echo "project|$TEMPLATE_PROJECT"'])
    output = run_script(slurm_script(fake_sweep(tmp_path), settings, [], requeue=False), tmp_path)
    assert output[0] == ["project", str(REPO)]
