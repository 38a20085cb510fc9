"""`--diff RUN_A RUN_B`: why two runs differ, from what each recorded.

Five sections, in the order a cause comes before its effect: config (split by the schema's
`affects_results` marks), code (the commits and `git diff --stat`), environment (versions,
device, packages), data (the fingerprints, file by file when recorded) and results (the
monitor, each metric's final value, and where two runs that should be identical part).
Only what differs is printed; two runs that agree on everything print "identical".
Exit code 0 when nothing that can change results differs, 4 when something does.
"""

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src.core.commands.cli import CommandLine
from src.core.config.loader import parse_yaml, split_provenance
from src.core.config.schema import project_schema
from src.core.config.uris import is_archive_uri
from src.core.config.validation import changed_keys, result_affecting_keys
from src.core.errors import UserError
from src.core.phases import WALL_CLOCK_METRICS
from src.core.record.git import PROJECT_ROOT, run_git
from src.core.record.rundir import CONFIG_FILE, METADATA_FILE, log_root, read_run_files
from src.core.tracking.metrics import METRICS_FILE

DIFFERS_EXIT_CODE = 4  # as --reproduce's
PACKAGES_FILE = "packages.txt"
IDENTITY_KEYS = ("run_name",)  # names a run, says nothing of what it computes
ABSENT = "(not set)"
# The environment's entries: whether a change of each can change results.
ENVIRONMENT_KEYS = {
    "python": True,
    "torch": True,
    "numpy": True,
    "cuda": True,
    "cudnn": True,
    "device": True,
    "gpus": True,
    "torch_threads": True,
    "world_size": True,
    "cpu_count": False,
    "platform": False,
    "hostname": False,
    "executable": False,
}


@dataclass
class RecordedRun:
    """What a run recorded, read from its directory or its archive (nothing restored)."""

    label: str
    saved: dict  # config.yaml, provenance included
    metadata: dict
    metrics: list[dict]
    packages: list[str] | None  # None: no packages.txt


@dataclass
class Section:
    name: str
    affects_results: bool = False
    lines: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------
# Reading the two runs


def _parse_metrics(text: str, where: str) -> list[dict]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records.append({key: record[key] for key in ("step", "phase", "name", "value")})
        except (ValueError, KeyError, TypeError):
            raise UserError(
                f"--diff: {where} line {number} is not a metrics record; expected the JSON a run writes"
            ) from None
    return records


def _packages(text: str | None) -> list[str] | None:
    return None if text is None else text.split()


def find_run(argument: str) -> Path:
    """A run directory given by its path, or by its name under logs/: a run's (`logs/<project>/NAME`)
    or a sweep member's (`logs/<project>/<sweep>/NAME`, or `<sweep>/NAME`). A name several
    runs share is refused, listing them."""
    path = Path(argument)
    if path.exists() or path.is_absolute():
        return path
    logs = log_root(None)
    found = sorted(
        candidate
        for pattern in (f"*/{argument}", f"*/*/{argument}")
        for candidate in logs.glob(pattern)
        if (candidate / CONFIG_FILE).is_file()
    )
    if len(found) > 1:
        listed = "\n  ".join(str(candidate) for candidate in found[:10])
        raise UserError(f"--diff {argument}: {len(found)} runs have this name; give one by its path:\n  {listed}")
    return found[0] if found else path  # none: read_run_files says what is missing


def read_recorded_run(argument: str) -> RecordedRun:
    """A run directory (a path, or a name under logs/) or an archive URI (read in place: config,
    metadata, metrics, packages)."""
    if is_archive_uri(argument):
        return _read_archived_run(argument)
    path = find_run(argument)
    saved, metadata = read_run_files(path, "--diff")
    metrics_file, packages_file = path / METRICS_FILE, path / PACKAGES_FILE
    metrics_text = metrics_file.read_text(encoding="utf-8") if metrics_file.exists() else ""
    packages = packages_file.read_text(encoding="utf-8") if packages_file.exists() else None
    shown = argument if path == Path(argument) else str(path)  # a name: where it was found
    return RecordedRun(shown, saved, metadata, _parse_metrics(metrics_text, str(metrics_file)), _packages(packages))


def _read_archived_run(uri: str) -> RecordedRun:
    from src.core.archive.store import Store, store_call

    store = Store(uri)
    with store_call("--diff", store.uri):
        store.refresh()
        files = {name: store.read(name) for name in (CONFIG_FILE, METADATA_FILE, METRICS_FILE, PACKAGES_FILE)}
    if files[CONFIG_FILE] is None:
        raise UserError(f"--diff {uri}: no {CONFIG_FILE} there; expected an archived run (list them with --runs URI)")
    texts = {name: None if data is None else data.decode("utf-8", "replace") for name, data in files.items()}
    saved = parse_yaml(texts[CONFIG_FILE], f"--diff {uri}: {CONFIG_FILE}")
    metadata = parse_yaml(texts[METADATA_FILE] or "", f"--diff {uri}: {METADATA_FILE}") or {}
    if not isinstance(saved, dict) or not isinstance(metadata, dict):
        raise UserError(f"--diff {uri}: {CONFIG_FILE} or {METADATA_FILE} is not the mapping a run writes")
    metrics = _parse_metrics(texts[METRICS_FILE] or "", f"{uri}/{METRICS_FILE}")
    return RecordedRun(uri, saved, metadata, metrics, _packages(texts[PACKAGES_FILE]))


# ---------------------------------------------------------------------------------
# The sections


def show(value: Any) -> str:
    """A value as the user would write it; floats in full, so that bitwise differences show."""
    text = repr(value) if isinstance(value, float) else json.dumps(value, default=str)
    return text if len(text) <= 70 else text[:67] + "..."


def flatten(document: Mapping, prefix: str = "") -> dict:
    flat = {}
    for key, value in document.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _pair(key: str, a: Any, b: Any) -> dict:
    return {"key": key, "a": a, "b": b}


def _pair_line(item: dict) -> str:
    return f"    {item['key']}: {show(item['a'])} | {show(item['b'])}"


def config_section(a: RecordedRun, b: RecordedRun, schema: dict) -> Section:
    """The config keys whose values differ, split by the schema's `affects_results` marks."""
    configs = []
    for run in (a, b):
        config = split_provenance(run.saved)[0]
        configs.append({key: value for key, value in config.items() if key not in IDENTITY_KEYS})
    affecting_keys = changed_keys(configs[0], configs[1], schema)
    values = [result_affecting_keys(config, schema) for config in configs]
    affecting = [_pair(key, values[0].get(key, ABSENT), values[1].get(key, ABSENT)) for key in affecting_keys]
    mini = [bool((run.saved.get("flags") or {}).get("mini")) for run in (a, b)]
    if mini[0] != mini[1]:  # --mini loads another dataset
        affecting.append(_pair("--mini", *mini))
    flat = [flatten(config) for config in configs]
    neutral = [
        _pair(key, flat[0].get(key, ABSENT), flat[1].get(key, ABSENT))
        for key in sorted(flat[0].keys() | flat[1].keys())
        if flat[0].get(key, ABSENT) != flat[1].get(key, ABSENT)
        and not any(key == other or key.startswith(other + ".") for other in affecting_keys)
    ]
    section = Section("config", bool(affecting), data={"affects_results": affecting, "neutral": neutral})
    if affecting:
        section.lines += ["  affects results:", *map(_pair_line, affecting)]
    if neutral:
        section.lines += ["  does not affect results:", *map(_pair_line, neutral)]
    return section


def _git(*args: str) -> tuple[int, str]:
    result = run_git(list(args), cwd=PROJECT_ROOT, check=False)
    return result.returncode, result.stdout


def commit_relation(first: str, second: str) -> str:
    """How two commits relate in this repository: same files, ancestor, descendant, diverged."""
    for commit in (first, second):
        if _git("cat-file", "-e", f"{commit}^{{commit}}")[0] != 0:
            return f"commit {commit[:12]} is not in this repository (fetch it to compare the code)"
    if _git("diff", "--quiet", first, second)[0] == 0:
        return "different commits with the same files"
    if _git("merge-base", "--is-ancestor", first, second)[0] == 0:
        return "A's commit is an ancestor of B's"
    if _git("merge-base", "--is-ancestor", second, first)[0] == 0:
        return "B's commit is an ancestor of A's"
    return "diverged (neither commit is an ancestor of the other)"


def code_section(a: RecordedRun, b: RecordedRun, full_diff: bool) -> Section:
    """The two commits, how they relate, and `git diff --stat` (the whole diff with --full-diff)."""
    commits = [(run.saved.get("git") or {}).get("commit") or "" for run in (a, b)]
    if commits[0] == commits[1]:
        return Section("code")
    if not all(commits):
        relation = "a run records no commit"
    else:
        relation = commit_relation(*commits)
    same_files = relation.startswith("different commits with the same files")
    known = same_files or relation.startswith(("A's", "B's", "diverged"))
    stat = _git("diff", "--stat", *commits)[1].rstrip() if known and not same_files else ""
    patch = _git("diff", *commits)[1] if full_diff and stat else None
    section = Section(
        "code",
        not same_files,
        [f"  commits: {commits[0][:12]} | {commits[1][:12]}: {relation}"],
        {"a": commits[0], "b": commits[1], "relation": relation, "stat": stat, "diff": patch},
    )
    section.lines += [f"  {line}" for line in stat.splitlines()]
    if patch is not None:
        section.lines.append(patch.rstrip())
    elif stat:
        section.lines.append("  (the whole diff: add --full-diff)")
    return section


def _environment(run: RecordedRun) -> dict:
    recorded = dict(run.saved.get("environment") or {})
    cpu = bool((run.saved.get("flags") or {}).get("cpu"))
    recorded["device"] = "cpu" if cpu or not recorded.get("gpus") else "cuda"
    return recorded


def _versions(packages: list[str]) -> dict[str, str]:
    versions = {}
    for line in packages:
        name, _, version = line.partition("==")
        versions[name.lower()] = version
    return versions


def environment_section(a: RecordedRun, b: RecordedRun) -> Section:
    """Python, torch, CUDA, cuDNN, device, threads; and the packages whose versions differ."""
    environments = [_environment(a), _environment(b)]
    section = Section("environment")
    entries = []
    for key, affects in ENVIRONMENT_KEYS.items():
        first, second = (environment.get(key, ABSENT) for environment in environments)
        if first != second:
            entries.append({**_pair(key, first, second), "affects_results": affects})
            section.affects_results |= affects
            section.lines.append(_pair_line(entries[-1]) + ("" if affects else "  (does not affect results)"))
    packages = []
    if a.packages is None or b.packages is None:
        missing = [run.label for run in (a, b) if run.packages is None]
        section.lines.append(f"  packages: {', '.join(missing)} recorded no {PACKAGES_FILE}; not compared")
    else:
        versions = [_versions(a.packages), _versions(b.packages)]
        for name in sorted(versions[0].keys() | versions[1].keys()):
            first, second = versions[0].get(name, "(not installed)"), versions[1].get(name, "(not installed)")
            if first != second:
                packages.append(_pair(name, first, second))
        if packages:
            section.affects_results = True
            section.lines += ["  packages:", *(f"    {p['key']}: {p['a']} | {p['b']}" for p in packages)]
    section.data = {"entries": entries, "packages": packages}
    return section


def _per_file_changes(first: dict | None, second: dict | None) -> list[str]:
    """The files added, removed, resized or changed, from the fingerprints' per-file listings."""
    if first is None or second is None:
        return ["per-file detail not recorded (a run before it was, or over the listing's file limit)"]
    lines = [f"added in B: {name} ({second[name]['bytes']} bytes)" for name in sorted(second.keys() - first.keys())]
    lines += [f"removed in B: {name}" for name in sorted(first.keys() - second.keys())]
    for name in sorted(first.keys() & second.keys()):
        if first[name]["bytes"] != second[name]["bytes"]:
            lines.append(f"resized: {name}: {first[name]['bytes']} | {second[name]['bytes']} bytes")
        elif (
            None not in (first[name]["sha256"], second[name]["sha256"])
            and first[name]["sha256"] != second[name]["sha256"]
        ):
            lines.append(f"contents changed: {name} (same size)")
    return lines


def data_section(a: RecordedRun, b: RecordedRun) -> Section:
    """The data fingerprints: names and sizes always, contents when hashed; file by file when recorded."""
    first, second = (run.saved.get("data_fingerprint") or {} for run in (a, b))
    listing_differs = first.get("listing_sha256") != second.get("listing_sha256")
    hashed = first.get("content_sha256") is not None and second.get("content_sha256") is not None
    contents_differ = hashed and first.get("content_sha256") != second.get("content_sha256")
    section = Section("data", listing_differs or contents_differ)
    if first.get("directory") != second.get("directory"):
        section.lines.append(f"    directory: {first.get('directory')} | {second.get('directory')}")
    changes = []
    if section.affects_results:
        for key in ("files", "bytes"):
            if first.get(key) != second.get(key):
                section.lines.append(f"    {key}: {first.get(key)} | {second.get(key)}")
        if not listing_differs:
            section.lines.append("    same file names and sizes; other contents")
        changes = _per_file_changes(first.get("per_file"), second.get("per_file"))
        section.lines += [f"    {line}" for line in changes]
    elif not hashed and first and second:
        section.lines.append("    same names and sizes; contents not hashed (over the size limit), so not compared")
    keys = ("directory", "files", "bytes", "listing_sha256", "content_sha256")
    section.data = {"a": {k: first.get(k) for k in keys}, "b": {k: second.get(k) for k in keys}, "changes": changes}
    return section


def _keyed(records: list[dict]) -> dict[tuple[int, str], float]:
    """(step, phase/name) -> value, the machine's timings left out; a later record wins (a resume)."""
    keyed = {}
    for record in records:
        metric = f"{record['phase']}/{record['name']}"
        if metric not in WALL_CLOCK_METRICS:
            keyed[(record["step"], metric)] = record["value"]
    return keyed


def _same(first: Any, second: Any) -> bool:
    if isinstance(first, float) and isinstance(second, float) and math.isnan(first) and math.isnan(second):
        return True
    return first == second


def parting_point(first: dict, second: dict) -> dict | None:
    """The first step and metric where two runs' logged values differ (bitwise), over the steps both reached."""
    last = min(max((step for step, _ in keyed), default=-1) for keyed in (first, second))
    for key in sorted(key for key in first.keys() | second.keys() if key[0] <= last):
        if key not in first or key not in second or not _same(first[key], second[key]):
            return {"step": key[0], "metric": key[1], "a": first.get(key, ABSENT), "b": second.get(key, ABSENT)}
    return None


def _monitor(run: RecordedRun, finals: dict) -> dict:
    best = run.metadata.get("best") or {}
    metric = best.get("metric")
    return {
        "metric": metric,
        "mode": best.get("mode"),
        "best": best.get("value"),
        "best_step": best.get("step"),
        "final": finals.get(metric, (None, None))[1],
    }


def results_section(a: RecordedRun, b: RecordedRun, show_parting: bool) -> Section:
    """The monitor's best and final values, each metric's final value, and where the runs part."""
    keyed = [_keyed(a.metrics), _keyed(b.metrics)]
    finals = [{metric: (step, value) for (step, metric), value in sorted(k.items())} for k in keyed]
    monitors = [_monitor(a, finals[0]), _monitor(b, finals[1])]
    parting = parting_point(*keyed)
    last_steps = [max((step for step, _ in k), default=None) for k in keyed]
    section = Section("results", parting is not None)
    if (monitors[0]["best"], monitors[0]["final"]) != (monitors[1]["best"], monitors[1]["final"]):
        first, second = monitors
        section.lines.append(
            f"  monitor {first['metric']} ({first['mode']}): best {show(first['best'])} at step {first['best_step']}"
            f" | {show(second['best'])} at step {second['best_step']}; final {show(first['final'])} | "
            f"{show(second['final'])}"
        )
    final_values = [
        _pair(metric, finals[0].get(metric, (None, ABSENT))[1], finals[1].get(metric, (None, ABSENT))[1])
        for metric in sorted(finals[0].keys() | finals[1].keys())
    ]
    final_values = [item for item in final_values if not _same(item["a"], item["b"])]
    if final_values:
        section.lines += ["  final values:", *map(_pair_line, final_values)]
    if last_steps[0] != last_steps[1]:
        section.lines.append(f"  last logged step: {last_steps[0]} | {last_steps[1]}")
    if parting is not None and show_parting:
        section.lines.append(
            f"  parts at step {parting['step']}, {parting['metric']}: {show(parting['a'])} | {show(parting['b'])}"
        )
    section.data = {"monitor": monitors, "final_values": final_values, "last_steps": last_steps, "parts": parting}
    return section


# ---------------------------------------------------------------------------------
# The command


def compare_runs(a: RecordedRun, b: RecordedRun, full_diff: bool = False) -> list[Section]:
    """The five sections, in order."""
    upstream = [
        config_section(a, b, project_schema()),
        code_section(a, b, full_diff),
        environment_section(a, b),
        data_section(a, b),
    ]
    same_inputs = not any(section.affects_results for section in upstream)
    return [*upstream, results_section(a, b, show_parting=same_inputs)]


def report_lines(a: RecordedRun, b: RecordedRun, sections: list[Section]) -> list[str]:
    shown = [section for section in sections if section.lines]
    if not shown:
        return ["identical"]
    lines = [f"A: {a.label}", f"B: {b.label}"]
    for section in shown:
        mark = "" if section.affects_results else " (nothing here affects results)"
        lines += [f"{section.name}:{mark}", *section.lines]
    causes = [section.name for section in sections if section.affects_results]
    if causes:
        lines.append(f"differs in what affects results: {', '.join(causes)}")
    else:
        lines.append("nothing that affects results differs")
    return lines


def diff_runs(command: CommandLine) -> int:
    """`--diff RUN_A RUN_B [--json] [--full-diff]`."""
    a, b = (read_recorded_run(argument) for argument in command.diff)
    sections = compare_runs(a, b, command.full_diff)
    differs = any(section.affects_results for section in sections)
    if command.json:
        document = {
            "a": a.label,
            "b": b.label,
            "identical": not any(section.lines for section in sections),
            "affects_results": [section.name for section in sections if section.affects_results],
            **{section.name: section.data for section in sections},
        }
        print(json.dumps(document, indent=1, default=str))
    else:
        print("\n".join(report_lines(a, b, sections)))
    return DIFFERS_EXIT_CODE if differs else 0
