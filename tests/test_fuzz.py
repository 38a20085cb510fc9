"""Fuzzing run.py's front door: hundreds of malformed configs and command lines, each of which
must end with exit 0 or 2, one message and no traceback, within a time bound and a memory bound.

Starting 400 `python run.py` processes would take 15 minutes, so a few child processes
(this file run as a script, in the `project` copy) each call `run.main(argv)` for many
cases in turn, with stdout and stderr captured per case, an address-space limit
(RLIMIT_AS) as the hard memory bound, and the wall time and peak resident memory recorded.
The cases come from a seeded generator, so a failure names a case that can be re-run.
"""

import contextlib
import io
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

SEED = 14
CHILDREN = 2
MEMORY_LIMIT = 1536 * 2**20  # RLIMIT_AS: the child's address space at start + this
MEMORY_GROWTH = 2**30  # peak resident memory may grow this much over the child's start
FAST = 2.0  # seconds: YAML that would grow without bound (alias bombs, recursion, nesting)
CONFIG = 20.0  # seconds: any other --print-config case (usually 0.02 s)
BUILD = 60.0  # seconds: a case that builds the model and data (and may train an epoch)
BUILD_FLAGS = ["--no-logging", "--mini", "--epochs=1", "--cpu"]

BASE = """\
description: fuzz
data_directory: data/pendulum
model_type: PendulumModel
loss_function: F.mse_loss
train_data_loader_type: PendulumSteps
test_data_loader_type: PendulumSteps
eval_data_loader_type: PendulumTrajectories
epochs: 1
batch_size: 8
"""


# ---------------------------------------------------------------------------------------
# The generator


class Cases:
    """Collects cases; `config(text)` writes a config file outside the project (whose tree stays clean)."""

    def __init__(self, directory: Path, rng: random.Random):
        self.directory, self.rng, self.cases = directory, rng, []

    def config(self, text: str | bytes) -> str:
        path = self.directory / f"case-{len(self.cases):04d}.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return str(path)

    def add(self, kind: str, argv: list[str], expect=(2,), seconds: float = CONFIG, says: str | None = None) -> None:
        self.cases.append(
            {
                "id": len(self.cases),
                "kind": kind,
                "argv": argv,
                "expect": list(expect),
                "seconds": seconds,
                "says": says,
            }
        )

    def print_config(self, kind: str, text: str, *flags: str, expect=(2,), seconds=CONFIG, says=None) -> None:
        self.add(kind, [self.config(text), "--print-config", *flags], expect, seconds, says)


def flow_bomb(rng: random.Random) -> str:
    """A flow sequence of anchored lists, each holding `width` aliases of the one before: width**levels values."""
    width = rng.randint(3, 12)
    levels = math.ceil(math.log(10**6) / math.log(width)) + rng.randint(0, 20)  # 10**6 to 10**40 values
    parts = ["&b0 [" + ", ".join(["x"] * width) + "]"]
    parts += [f"&b{n} [" + ", ".join([f"*b{n - 1}"] * width) + "]" for n in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


def block_merge_bomb(rng: random.Random) -> str:
    width, levels = rng.randint(4, 10), rng.randint(8, 14)
    lines = ["  m0: &m0 {" + ", ".join(f"k{i}: {i}" for i in range(width)) + "}"]
    for n in range(1, levels):
        lines.append(f"  m{n}: &m{n} " + "{<<: [" + ", ".join([f"*m{n - 1}"] * width) + "]}")
    return "\n".join(lines)


def nested(rng: random.Random, depth: int) -> str:
    if rng.random() < 0.5:
        return "[" * depth + "1" + "]" * depth
    return "{a: " * depth + "1" + "}" * depth


def yaml_growth_cases(c: Cases) -> None:
    rng = c.rng
    for _ in range(16):  # alias bombs in files, in the free sections included
        place = rng.choice(["model_parameters", "data_loader_parameters.all", "sweep", "top"])
        bomb = flow_bomb(rng)
        text = {
            "model_parameters": f"model_parameters: {{hidden_size: {bomb}}}\n",
            "data_loader_parameters.all": f"data_loader_parameters: {{all: {{table: {bomb}}}}}\n",
            "sweep": f"sweep: {{seed: {bomb}}}\n",
            "top": f"description2: {bomb}\n",
        }[place]
        c.print_config("alias bomb (file)", BASE + text, seconds=FAST, says="expands to more than")
    for _ in range(6):
        c.print_config("merge bomb (file)", BASE + "model_parameters:\n" + block_merge_bomb(rng) + "\n", seconds=FAST)
    for _ in range(16):  # alias bombs on the command line
        base = c.config(BASE)
        bomb = flow_bomb(rng)
        argv = rng.choice(
            [
                [f"--model_parameters.hidden_size={bomb}"],
                ["--modify", "model_parameters", f"{{hidden_size: {bomb}}}"],
                [f"--data_loader_parameters.all.table={bomb}"],
                [f"--sweep={{seed: {bomb}}}"],
                ["--modify", "description", bomb],
            ]
        )
        c.add("alias bomb (command line)", [base, "--print-config", *argv], seconds=FAST, says="expands to more than")
    recursive = [
        "model_parameters: &r {hidden_size: *r}\n",
        "model_parameters: &r {hidden_size: [1, {deeper: *r}]}\n",
        "data_loader_parameters: {all: &r [*r]}\n",
        "data_loader_parameters: &r {all: {x: *r}}\n",
        "sweep: {seed: &r [*r]}\n",
        "model_parameters: &r {<<: *r}\n",
        "optimizer: &r {parameters: *r}\n",
    ]
    for text in recursive:
        c.print_config("recursive alias (file)", BASE + text, seconds=FAST, says="a recursive alias")
    for value in (
        "--model_parameters.hidden_size=&a [*a]",
        "--sweep={seed: &a [*a]}",
        "--model_parameters={x: &a {y: *a}}",
    ):
        c.add("recursive alias (command line)", [c.config(BASE), "--print-config", value], seconds=FAST)
    c.add(
        "recursive alias (command line)",
        [c.config(BASE), "--print-config", "--modify", "model_parameters", "&a {b: *a}"],
    )
    for _ in range(14):  # deep nesting, past Python's recursion limit
        depth = rng.choice([33, 40, 100, 600, 2000, 20000])
        if rng.random() < 0.5:
            c.print_config(
                "deep nesting (file)", BASE + f"model_parameters: {{x: {nested(rng, depth)}}}\n", seconds=FAST
            )
        else:
            argv = [c.config(BASE), "--print-config", f"--model_parameters.x={nested(rng, depth)}"]
            c.add("deep nesting (command line)", argv, seconds=FAST, says="nests deeper than")
    chain = "".join(f"  a{n}: &a{n} [*a{n - 1}]\n" for n in range(1, 60))
    c.print_config("deep nesting (aliases)", BASE + "model_parameters:\n  a0: &a0 [1]\n" + chain, seconds=FAST)


def key_and_integer_cases(c: Cases) -> None:
    rng = c.rng
    complex_keys = [
        "[1, 2]: x\n",
        "? [a, b]\n: 1\n",
        "model_parameters: {[1, 2]: x}\n",
        "model_parameters: {{a: 1}: x}\n",
        "data_loader_parameters: {all: {[x]: 1}}\n",
        "sweep: {[seed]: [1, 2]}\n",
    ]
    for text in complex_keys:
        c.print_config("complex mapping key (file)", BASE + text, says="used as a key")
    for value in ("{[1, 2]: x}", "{? {a: 1} : 2}"):
        c.add("complex mapping key (command line)", [c.config(BASE), "--print-config", f"--model_parameters.x={value}"])
    for _ in range(20):
        digits = rng.randint(4301, 30000)
        number = rng.choice(
            [
                "".join(rng.choice("123456789") for _ in range(digits)),
                "0x" + "f" * rng.randint(3600, 9000),
                "0b" + "1" * rng.randint(14001, 40000),
                ":".join(["59"] * rng.randint(2400, 5000)),
            ]
        )
        key = rng.choice(["seed", "epochs", "batch_size", "model_parameters.hidden_size", "checkpoint.keep_recent"])
        if rng.random() < 0.5:
            c.add("huge integer (command line)", [c.config(BASE), "--print-config", f"--{key}={number}"])
        elif "." in key:
            section, name = key.split(".")
            c.print_config("huge integer (file)", BASE + f"{section}: {{{name}: {number}}}\n", says="over 4000 digits")
        else:
            c.print_config("huge integer (file)", BASE.replace(f"{key}: ", f"{key}_old: ") + f"{key}: {number}\n")


BAD_NUMBERS = {
    "batch_size": ["0", "-1", "2147483648", "10000000000000000000", "1e19", ".nan"],
    "eval_batch_size": ["0", "1099511627776"],
    "seed": ["-1", "9223372036854775808", "18446744073709551616", "1000000000000000000000000000000"],
    "epochs": ["0", "2147483648", "10000000000000000000"],
    "num_workers": ["-1", "1025", "1000000000"],
    "log_every_n_steps": ["0", "2147483648"],
    "scheduler.warmup_steps": ["-1", "2147483648"],
    "scheduler.total_steps": ["0", "1099511627776"],
    "scheduler.final_lr_fraction": [".nan", ".inf", "-0.1", "1.5"],
    "checkpoint.keep_recent": ["0", "2147483648"],
    "checkpoint.every_n_steps": ["0", "2147483648"],
    "checkpoint_interval": [".nan", ".inf", "-1"],
    "optimizer.lr": [".nan", ".inf", "-.inf", "1e308", "-0.001", "10000000.0"],
    "optimizer.weight_decay": [".inf", ".nan", "-1"],
    "gradient_clip_norm": [".nan", ".inf", "0", "-1"],
    "gradient_accumulation_steps": ["0", "2147483648"],
    "distributed.timeout_seconds": [".nan", ".inf", "1e300", "0"],
    "distributed.nproc_per_node": ["0", "2147483648"],
    "rollout.every_n_epochs": ["0", "2147483648"],
    "rollout.max_samples": ["0", "2147483648"],
    "slurm.signal_seconds": ["0", "2147483648"],
    "max_sweep_size": ["0", "-5"],
}


def schema_cases(c: Cases) -> None:
    rng = c.rng
    for key, values in BAD_NUMBERS.items():
        for value in values:
            flag = [f"--{key}={value}"] if rng.random() < 0.7 else ["--modify", key, value]
            c.add("number out of range", [c.config(BASE), "--print-config", *flag], says=f"key '{key}'")
    for _ in range(12):
        text = "".join(rng.choice("abcXYZ019:-_ .") for _ in range(rng.randint(1, 12))).strip() or "x"
        text = text if not text.replace(":", "").replace("-", "").isdigit() else text + "h"
        c.add("slurm.time", [c.config(BASE), "--print-config", f"--slurm.time='{text}'"], says="Slurm time limit")
    for good in ("90", "30:00", "02:00:00", "1-12", "1-12:30", "2-00:00:00"):
        c.add("slurm.time (valid)", [c.config(BASE), "--print-config", f"--slurm.time='{good}'"], expect=(0,))
    for _ in range(8):
        key = rng.choice(["run_name", "project_name"])
        name = "".join(rng.choice("abcdefgh0123._-") for _ in range(rng.randint(256, 3000)))
        c.add("name too long", [c.config(BASE), "--print-config", f"--{key}=a{name}"], says="at most 255 bytes")
    c.add("name (valid)", [c.config(BASE), "--print-config", f"--run_name={'r' * 255}"], expect=(0,))


def flag_cases(c: Cases, scratch: Path) -> None:
    config = c.config(BASE)
    afile = scratch / "a-file"
    afile.write_text("x")
    run_dir = str(scratch / "no-run")
    contexts = [
        [config, "--checkpoints", "best"],
        [config, "--submit"],
        [config, "--submit", "--print-config"],
        [config, "--y"],
        [config, "--filter", "x"],
        [config, "--status", "failed"],
        [config, "--csv"],
        ["--runs", "--cpu"],
        ["--runs", "--mini"],
        ["--runs", "--epochs=3"],
        ["--runs", "--print-config"],
        ["--note", run_dir, "text", "--cpu"],
        ["--reproduce", run_dir, "--mini"],
        ["--reproduce", run_dir, "--find-replace", "a", "b"],
        ["--reproduce", run_dir, config],
        ["--evaluate", run_dir, "--mini"],
        ["--evaluate", run_dir, "--allow-dirty-repo"],
        ["--evaluate", run_dir, "--print-config"],
        ["--resume", run_dir, "--print-config"],
        ["--resume", run_dir, "--slurm"],
        ["--resume", run_dir, "--log-dir", str(scratch)],
        ["--resume", run_dir, "--evaluate", run_dir],
        ["--runs", str(scratch), "--note", run_dir, "x"],
        [config, "--no-logging", "--log-dir", str(scratch)],
        [config, "--allow-dirty-repo", "--run-parent", str(scratch)],
        [config, "--log-dir", str(scratch), "--run-parent", str(scratch)],
        [config, "--slurm", "--print-config"],
        [config, "--log-dir", str(afile)],
        [config, "--log-dir", str(afile / "logs")],
        [config, "--run-parent", str(afile)],
        [config, "--run-parent", str(scratch / "missing" / "parent")],
        [config, "--run-parent", str(afile / "x")],
        [config, "--epochs"],
        [config, "--modify", "epochs"],
        [config, "--find-replace", "a"],
        ["--cpu"],
        [config, config],
    ]
    for argv in contexts:
        c.add("flag out of context", argv)
    c.rng.shuffle(contexts)  # the same refusals, with a harmless flag moved in front
    for argv in contexts[:10]:
        c.add("flag out of context", ["--print-config", *argv] if argv[0] == config else argv)


def name_and_build_cases(c: Cases) -> None:
    wrong_kinds = [
        ("loss_function", "nn.Module"),
        ("loss_function", "nn.Sequential"),
        ("loss_function", "nn.ModuleList"),
        ("loss_function", "nn.Linear"),
        ("loss_function", "F.relu"),
        ("loss_function", "torch.save"),
        ("loss_function", "PendulumModel"),
        ("loss_function", "nn.TripletMarginLoss"),
        ("train_data_loader_type", "BaseDataset"),
        ("test_data_loader_type", "PendulumModel"),
        ("model_type", "BaseModel"),
        ("model_type", "PendulumSteps"),
        ("loss_function", "__import__('os').system('true')"),
    ]
    for key, name in wrong_kinds:
        c.add("name of the wrong kind", [c.config(BASE), "--print-config", f"--{key}={name}"], says=f"'{key}'")
    for value in ("big", "[1]", "{a: 1}", "1e12", "1000000000000", "-3", "10000000"):  # 10**7: 400 TB at layer 2
        argv = [c.config(BASE), *BUILD_FLAGS, f"--model_parameters.hidden_size={value}"]
        c.add("constructor error (build)", argv, seconds=BUILD, says="config key 'model_parameters': PendulumModel(")
    argv = [c.config(BASE), *BUILD_FLAGS, "--model_parameters.num_layers=many"]
    c.add("constructor error (build)", argv, seconds=BUILD, says="'model_parameters'")


def sweep_cases(c: Cases) -> None:
    rng = c.rng
    for _ in range(8):
        keys, values = rng.randint(2, 12), rng.randint(3, 40)
        while values**keys <= 1000:
            keys += 1
        sweep = ", ".join(f"model_parameters.k{k}: {list(range(values))}" for k in range(keys))
        c.print_config("sweep too large", BASE + f"sweep: {{{sweep}}}\n", says=f"make {values**keys} runs")
    c.print_config("sweep too large", BASE + "max_sweep_size: 3\nsweep: {seed: [1, 2], epochs: [1, 2]}\n")
    c.print_config("sweep (valid)", BASE + "sweep: {seed: [1, 2], model_parameters.hidden_size: [4, 8]}\n", expect=(0,))


def config_file_cases(c: Cases, scratch: Path) -> None:
    fifo = scratch / "a-fifo"
    os.mkfifo(fifo)
    link = scratch / "zero.yaml"
    link.symlink_to("/dev/zero")
    for path in ("/dev/null", "/dev/zero", str(fifo), str(link), str(scratch), str(scratch / "missing.yaml")):
        c.add("config that is no file", [path, "--print-config"])
    for content in (b"", b"\xff\xfe\x00junk", b"\x00\x01\x02", b"- a\n- list\n", b"%YAML 1.1\n---\na: 1\n---\nb: 2\n"):
        c.add("config file content", [c.config(content), "--print-config"])
    c.add("config file too large", [c.config(BASE + "notes: " + "x" * (2 * 2**20) + "\n"), "--print-config"])


TOKENS = [
    "", "~", "[", "]", "{", "}", "&a", "*a", "*undefined", "&a [*a]", "!!python/object/apply:os.system ['true']",
    "!!binary aGk=", "!!set {a, b}", ".nan", "-.inf", "1e999", "0x" + "f" * 30, "'", '"', ":", "- x", "? x", "|",
    ">", "---", "...", "\t", "\x00", "\ufeff", "ü", "<<: *a", "@", "`", "%", "!", "{a: 1, a: 2}", "[1, [2, [3]]]",
]  # fmt: skip


def mutation_cases(c: Cases, sample: str) -> None:
    """Random edits of real configs: most are refused, some are still valid; none may crash."""
    rng = c.rng
    for _ in range(80):
        lines = rng.choice([sample, BASE]).splitlines()
        for _ in range(rng.randint(1, 4)):
            index = rng.randrange(len(lines))
            operation = rng.choice(["delete", "duplicate", "value", "insert", "indent", "truncate"])
            if operation == "delete":
                del lines[index]
            elif operation == "duplicate":
                lines.insert(index, lines[index])
            elif operation == "value" and ":" in lines[index]:
                lines[index] = lines[index].split(":")[0] + ": " + rng.choice(TOKENS)
            elif operation == "insert":
                lines.insert(index, rng.choice(TOKENS))
            elif operation == "indent":
                lines[index] = " " * rng.randint(1, 5) + lines[index]
            elif lines[index]:
                lines[index] = lines[index][: rng.randrange(len(lines[index]))]
            if not lines:
                lines = [""]
        c.print_config("mutated config", "\n".join(lines) + "\n", expect=(0, 2))


def valid_cases(c: Cases, sample: str) -> None:
    c.print_config("valid", sample, expect=(0,))
    c.print_config("valid", BASE, "--epochs=3", "--optimizer.lr=3e-4", "--slurm.time=1-00", expect=(0,))
    c.print_config("valid", BASE, "--modify", "model_parameters", "{hidden_size: 8, num_layers: 1}", expect=(0,))
    c.add("valid (build and train)", [c.config(sample), *BUILD_FLAGS, "--model_parameters.hidden_size=8"], (0,), BUILD)


def generate(directory: Path, project_root: Path) -> list[dict]:
    cases = Cases(directory, random.Random(SEED))
    sample = (project_root / "sample_runconfig.yaml").read_text()
    scratch = directory / "scratch"
    scratch.mkdir()
    yaml_growth_cases(cases)
    key_and_integer_cases(cases)
    schema_cases(cases)
    flag_cases(cases, scratch)
    name_and_build_cases(cases)
    sweep_cases(cases)
    config_file_cases(cases, scratch)
    mutation_cases(cases, sample)
    valid_cases(cases, sample)
    return cases.cases


# ---------------------------------------------------------------------------------------
# The child: many cases in one process


def _address_space() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmSize:"))
    return int(line.split()[1]) * 1024


def _peak_resident() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _on_alarm(*_):
    raise TimeoutError("the case ran past its hard time limit")


def run_cases(cases_file: str, results_file: str) -> None:
    import torch

    torch.set_num_threads(1)  # the machine is shared; the cases do not depend on it
    import run

    limit = _address_space() + MEMORY_LIMIT
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGALRM, _on_alarm)
    start_resident = _peak_resident()
    cases = json.loads(Path(cases_file).read_text())
    with open(results_file, "a", encoding="utf-8") as results:
        for case in cases:
            output = io.StringIO()
            signal.alarm(int(case["seconds"] * 3) + 5)  # a hang becomes a failed case, not a stuck test
            started = time.perf_counter()
            try:
                with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                    code = run.main(case["argv"])
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException:  # what escaped main: the failure this test looks for
                code = "escaped"
                output.write(traceback.format_exc())
            finally:
                signal.alarm(0)
            seconds = time.perf_counter() - started
            text = output.getvalue()
            record = {
                "id": case["id"],
                "code": code,
                "seconds": seconds,
                "growth": _peak_resident() - start_resident,
                "traceback": "Traceback" in text,
                "output": text[-1500:],
            }
            results.write(json.dumps(record) + "\n")
            results.flush()


# ---------------------------------------------------------------------------------------
# The test


def run_in_children(project, tmp_path: Path, cases: list[dict]) -> dict[int, dict]:
    """Split the cases over CHILDREN processes running in the project; their results by case id."""
    children = []
    for index in range(CHILDREN):
        part = cases[index::CHILDREN]
        cases_file, results_file = tmp_path / f"cases-{index}.json", tmp_path / f"results-{index}.jsonl"
        cases_file.write_text(json.dumps(part))
        command = [sys.executable, "tests/test_fuzz.py", str(cases_file), str(results_file)]
        environment = {**os.environ, "PYTHONPATH": str(project.root), "PYTHONHASHSEED": "0"}
        children.append(
            (subprocess.Popen(command, cwd=project.root, env=environment, stdin=subprocess.DEVNULL), results_file)
        )
    deadline = time.monotonic() + 600
    for child, _ in children:
        try:
            child.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # its unfinished cases are reported as such
            child.kill()
            child.wait()
    results = {}
    for _, results_file in children:
        if results_file.exists():
            for line in results_file.read_text().splitlines():
                record = json.loads(line)
                results[record["id"]] = record
    return results


def failures_of(cases: list[dict], results: dict[int, dict]) -> list[str]:
    failures = []
    for case in cases:
        result = results.get(case["id"])
        where = f"case {case['id']} ({case['kind']}): {' '.join(case['argv'])[:300]}"
        if result is None:
            failures.append(f"{where}\n    never finished: its child process died (memory limit?) or hung")
            continue
        problems = []
        if result["code"] not in case["expect"]:
            problems.append(f"exit {result['code']}, expected {' or '.join(map(str, case['expect']))}")
        if result["traceback"]:
            problems.append("a traceback")
        if result["seconds"] > case["seconds"]:
            problems.append(f"took {result['seconds']:.2f} s, bound {case['seconds']} s")
        if result["growth"] > MEMORY_GROWTH:
            problems.append(f"peak memory grew {result['growth'] / 2**20:.0f} MiB, bound {MEMORY_GROWTH / 2**20:.0f}")
        if case["says"] and result["code"] == 2 and case["says"] not in result["output"]:
            problems.append(f"the message lacks {case['says']!r}")
        if result["code"] == 2 and not (
            result["output"].startswith("error: ") and result["output"].count("error: ") == 1
        ):
            problems.append("not one 'error: ' message")
        if problems:
            failures.append(f"{where}\n    {'; '.join(problems)}\n    output: {result['output'][-600:]!r}")
    return failures


def test_fuzzed_configs_and_command_lines_end_cleanly(project, tmp_path):
    cases_directory = tmp_path / "cases"
    cases_directory.mkdir()
    cases = generate(cases_directory, project.root)
    kinds = {case["kind"] for case in cases}
    assert len(cases) >= 300 and len(kinds) >= 20
    results = run_in_children(project, tmp_path, cases)
    failures = failures_of(cases, results)
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:25])
    assert project.written_files() == []  # every case only printed, or was refused


if __name__ == "__main__":
    run_cases(sys.argv[1], sys.argv[2])


def test_fuzzed_run_directories_end_cleanly(project, tmp_path):
    head = project.git("rev-parse", "HEAD")
    saved = (project.root / "sample_runconfig.yaml").read_text() + f"git: {{commit: {head}}}\nflags: {{mini: true}}\n"
    bad_config = [
        "description: [",
        "- a list\n",
        "",
        "description: x\n",
        "a: &a [*a]\n",
        flow_bomb(random.Random(SEED)),
    ]
    bad_metadata = ["status: [running", "just text\n", "m: &m {a: *m}\n"]
    cases = Cases(tmp_path, random.Random(SEED))
    for index, text in enumerate(bad_config):
        run = tmp_path / f"config-{index}"
        run.mkdir()
        (run / "config.yaml").write_text(text)
        (run / "metadata.yaml").write_text("status: running\n")
        for flag in ("--resume", "--evaluate"):
            cases.add("run directory: config.yaml", [flag, str(run)], says="config.yaml")
    for index, text in enumerate(bad_metadata):
        run = tmp_path / f"metadata-{index}"
        run.mkdir()
        (run / "config.yaml").write_text(saved)
        (run / "metadata.yaml").write_text(text)
        for flag in ("--resume", "--evaluate"):
            cases.add("run directory: metadata.yaml", [flag, str(run)], says="metadata.yaml")
    (tmp_path / "a-file").write_text("x")
    for flag in ("--resume", "--evaluate"):
        cases.add("run directory: not one", [flag, str(tmp_path / "a-file")])
        cases.add("run directory: not one", [flag, str(tmp_path / "missing")])
    failures = failures_of(cases.cases, run_in_children(project, tmp_path, cases.cases))
    assert not failures, f"{len(failures)} of {len(cases.cases)} cases failed:\n" + "\n".join(failures[:25])
