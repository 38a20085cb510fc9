"""--diff RUN_A RUN_B: what differs between two real runs, section by section, and whether
it can change results (exit 4) or not (exit 0)."""

import json
import shutil

import numpy as np
import pytest
from helpers import NOISY, QUICK_RUN, run_directory

from src.core.commands.cli import parse_command_line
from src.core.errors import UserError

RUN = (*QUICK_RUN, "--epochs=1")


def diff(project, first, second, *flags):
    return project.run("--diff", str(first), str(second), *flags)


def test_a_result_affecting_key_is_named_with_both_values_and_exits_4(project):
    assert project.run(*RUN, "--run_name=a").returncode == 0
    assert project.run(*RUN, "--run_name=b", "--optimizer.lr=0.001").returncode == 0
    result = diff(project, run_directory(project, "a"), run_directory(project, "b"))
    assert result.returncode == 4, result.stdout + result.stderr
    config = result.stdout.split("config:")[1].split("\nresults")[0]
    assert "affects results:\n    optimizer.lr: 0.003 | 0.001" in config
    assert "run_name" not in result.stdout  # the run's name is not a difference
    assert "code:" not in result.stdout and "environment:" not in result.stdout and "data:" not in result.stdout
    assert "final values:" in result.stdout and "val/loss" in result.stdout
    assert "parts at" not in result.stdout  # the config differs: parting is expected, not news
    assert result.stdout.rstrip().endswith("differs in what affects results: config, results")


def test_a_neutral_key_is_shown_but_exits_0(project):
    assert project.run(*RUN, "--run_name=a").returncode == 0
    assert project.run(*RUN, "--run_name=b", "--checkpoint.keep_recent=5").returncode == 0
    result = diff(project, run_directory(project, "a"), run_directory(project, "b"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "config: (nothing here affects results)\n  does not affect results:\n    checkpoint.keep_recent: 2 | 5" in (
        result.stdout
    )
    assert "\nresults:" not in result.stdout
    assert result.stdout.rstrip().endswith("nothing that affects results differs")


def test_two_commits_give_their_relation_and_the_stat_names_the_changed_file(project):
    assert project.run(*RUN, "--run_name=a").returncode == 0
    first = project.git("rev-parse", "HEAD")
    model = project.root / "src" / "model.py"
    model.write_text(model.read_text().replace("state + 0.1 * self.net(state)", "state + 0.2 * self.net(state)"))
    second = project.commit("a change that alters training")
    assert project.run(*RUN, "--run_name=b").returncode == 0
    result = diff(project, run_directory(project, "a"), run_directory(project, "b"))
    assert result.returncode == 4, result.stdout + result.stderr
    assert f"commits: {first[:12]} | {second[:12]}: A's commit is an ancestor of B's" in result.stdout
    assert "src/model.py | 2 +-" in result.stdout and "--full-diff" in result.stdout
    assert "config:" not in result.stdout
    full = diff(project, run_directory(project, "b"), run_directory(project, "a"), "--full-diff")
    assert "B's commit is an ancestor of A's" in full.stdout
    added = [line for line in full.stdout.splitlines() if line.startswith("+") and "self.net(state)" in line]
    assert added and "0.1 * self.net(state)" in added[0]  # B to A: 0.2 back to 0.1


def test_a_package_version_faked_in_a_copy_is_named(project):
    assert project.run(*RUN, "--run_name=a").returncode == 0
    original = run_directory(project, "a")
    copy = original.with_name("copy")
    shutil.copytree(original, copy)
    packages = (copy / "packages.txt").read_text().splitlines()
    (numpy_line,) = [line for line in packages if line.lower().startswith("numpy==")]
    faked = [line if line != numpy_line else "numpy==0.0.1" for line in packages]
    (copy / "packages.txt").write_text("\n".join(faked) + "\n")
    result = diff(project, original, copy)
    assert result.returncode == 4, result.stdout + result.stderr
    assert f"environment:\n  packages:\n    numpy: {numpy_line.split('==')[1]} | 0.0.1\n" in result.stdout
    assert "\nresults:" not in result.stdout  # the copy's metrics are the original's


def test_a_changed_data_file_is_named(project):
    assert project.run(*RUN, "--run_name=a").returncode == 0
    data_file = project.root / "data" / "pendulum" / "test" / "trajectories.npy"
    trajectories = np.load(data_file)
    trajectories[0, 0] += 0.5
    np.save(data_file, trajectories)  # the same size, other contents
    assert project.run(*RUN, "--run_name=b").returncode == 0
    result = diff(project, run_directory(project, "a"), run_directory(project, "b"))
    assert result.returncode == 4, result.stdout + result.stderr
    data = result.stdout.split("data:")[1]
    assert "same file names and sizes; other contents" in data
    assert "contents changed: test/trajectories.npy (same size)" in data
    assert "train/trajectories.npy" not in data and "params.json" not in data


def test_a_run_recorded_without_per_file_detail_says_so(project):
    assert project.run(*RUN, "--run_name=a").returncode == 0
    original = run_directory(project, "a")
    copy = original.with_name("copy")
    shutil.copytree(original, copy)
    config = (copy / "config.yaml").read_text()
    start = config.index("  per_file:")  # as a run recorded before the per-file listing existed
    config = config[:start] + "  per_file: null\n"
    (copy / "config.yaml").write_text(config.replace("content_sha256: ", "content_sha256: 0", 1))
    result = diff(project, original, copy)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "per-file detail not recorded" in result.stdout


def test_two_bitwise_identical_runs_print_only_identical(project):
    assert project.run(*RUN, "--run_name=a").returncode == 0
    assert project.run(*RUN, "--run_name=b").returncode == 0
    result = diff(project, run_directory(project, "a"), run_directory(project, "b"))
    assert (result.returncode, result.stdout, result.stderr) == (0, "identical\n", "")
    by_name = diff(project, "a", "b")  # runs named as under logs/
    assert (by_name.returncode, by_name.stdout) == (0, "identical\n"), by_name.stderr
    member = run_directory(project, "a").parent / "sweep-x" / "a"  # a sweep member of the same name
    shutil.copytree(run_directory(project, "a"), member)
    assert diff(project, "sweep-x/a", "b").returncode == 0
    ambiguous = diff(project, "a", "b")
    assert ambiguous.returncode == 2 and "2 runs have this name; give one by its path" in ambiguous.stderr
    assert str(member) in ambiguous.stderr


def test_a_run_and_its_kill_and_resume_twin_are_identical(project):
    run = (*QUICK_RUN, "--epochs=3", "--checkpoint.every_n_steps=5", *NOISY)
    assert project.run(*run, "--run_name=reference").returncode == 0
    assert project.run(*run, "--run_name=killed", env={"TEMPLATE_FAULT": "train_step:22"}).returncode == -9
    assert project.run("--resume", str(run_directory(project, "killed"))).returncode == 0
    result = diff(project, run_directory(project, "reference"), run_directory(project, "killed"))
    assert (result.returncode, result.stdout) == (0, "identical\n"), result.stderr


def test_one_changed_value_is_found_where_the_runs_part(project):
    # 100 pairs in batches of 10: validation at steps 10, 20, 30, 40.
    assert project.run(*QUICK_RUN, "--batch_size=10", "--epochs=4", "--run_name=a").returncode == 0
    original = run_directory(project, "a")
    copy = original.with_name("copy")
    shutil.copytree(original, copy)
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    (index,) = [i for i, r in enumerate(records) if (r["step"], r["phase"], r["name"]) == (40, "val", "loss")]
    records[index]["value"] = np.nextafter(records[index]["value"], 1.0)  # one bit
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = diff(project, original, copy)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "parts at step 40, val/loss" in result.stdout
    document = json.loads(diff(project, original, copy, "--json").stdout)  # one document
    assert document["results"]["parts"]["step"] == 40 and document["results"]["parts"]["metric"] == "val/loss"
    assert document["affects_results"] == ["results"] and document["identical"] is False


def test_archived_runs_are_compared_in_place_without_restoring(project, tmp_path):
    assert project.run(*RUN, "--run_name=a").returncode == 0
    assert project.run(*RUN, "--run_name=b", "--seed=1").returncode == 0
    archive = f"file://{tmp_path}/archive"
    for name in ("a", "b"):
        assert project.run("--archive", str(run_directory(project, name)), archive).returncode == 0
    before = sorted(path for path in (project.root / "logs").rglob("*"))
    archived_a, archived_b = (f"{archive}/PendulumModel/{name}" for name in ("a", "b"))
    same = diff(project, archived_a, run_directory(project, "a"))
    assert (same.returncode, same.stdout) == (0, "identical\n"), same.stderr
    other = diff(project, archived_a, archived_b, "--json")
    assert other.returncode == 4, other.stderr
    document = json.loads(other.stdout)
    assert document["config"]["affects_results"] == [{"key": "seed", "a": 0, "b": 1}]
    assert sorted(path for path in (project.root / "logs").rglob("*")) == before  # nothing restored


def test_bad_input_is_one_message_and_exit_2(project):
    assert project.run(*RUN, "--run_name=a").returncode == 0
    missing = diff(project, run_directory(project, "a"), project.root / "logs" / "nowhere")
    assert missing.returncode == 2 and "not a directory; expected a run directory" in missing.stderr
    assert "Traceback" not in missing.stderr and missing.stdout == ""
    no_run = diff(project, run_directory(project, "a"), "file:///nonexistent/archive/run")
    assert no_run.returncode == 2 and "Traceback" not in no_run.stderr, no_run.stderr
    stray = project.run("--runs", "--json")
    assert stray.returncode == 2 and "--json does nothing with --runs" in stray.stderr


def test_reproduce_says_where_it_differs_and_runs_shows_the_verdict_and_a_branch_parent(project):
    assert project.run(*RUN, "--run_name=original").returncode == 0
    original = run_directory(project, "original")
    assert project.run("--reproduce", str(original)).returncode == 0
    table = project.run("--runs", "--filter", "original")
    assert table.returncode == 0 and "reproduced" in table.stdout.splitlines()[0]
    (row,) = [line for line in table.stdout.splitlines() if line.startswith("PendulumModel/original ")]
    assert row.rstrip().endswith("identical")

    what_if = project.run("--reproduce", str(original), "--optimizer.lr=0.002")
    assert what_if.returncode == 4, what_if.stdout + what_if.stderr
    results = what_if.stdout.split("results (original | reproduction):\n")[1]
    assert "parts at step 2, train/" in results and "final values:" in results
    (row,) = [line for line in project.run("--runs").stdout.splitlines() if line.startswith("PendulumModel/original ")]
    assert "differs at step 2" in row  # the newest reproduction's verdict

    assert project.run("--resume", str(original), "--from-step", "13", "--epochs=2").returncode == 0
    table = project.run("--runs").stdout.splitlines()
    assert "parent" in table[0]
    (row,) = [line for line in table if line.startswith("PendulumModel/original-from-13 ")]
    assert "original@13" in row


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--diff", "a"], "expected 2 arguments"),
        (["--diff", "a", "b", "--cpu"], "--cpu does nothing with --diff"),
        (["--diff", "a", "b", "--runs"], "--runs and --diff cannot be combined"),
        (["--full-diff"], "--full-diff does nothing with a new run"),
        (["--resume", "r", "--run-parent", "x"], "--run-parent does nothing without --from-step"),
    ],
)
def test_misplaced_flags_are_refused_when_parsed(argv, message):
    with pytest.raises(UserError, match=message):
        parse_command_line(argv)
