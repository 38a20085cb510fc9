"""Where the code came from: the git gate, the commit, and clean checkouts of a commit.

The gate is the template's promise: nothing is logged from a working tree that
differs from a commit. One `git status --porcelain=v2` call answers both "is it
clean?" and "which commit?", so the gate costs about as much as `git status`.
(GitPython is not used: it would add a dependency and several processes for what
one call answers.)

`git status` trusts two index bits, assume-unchanged and skip-worktree, and does not
look at such files at all. While it runs, the gate reads the index file itself for
those bits; only where one is set (or the index format is one it does not read) does
it ask git for the marked paths and compare their contents by hash.
"""

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from src.core.errors import Refusal

# The project's root: the checkout whose code is running.
PROJECT_ROOT = Path(__file__).resolve().parents[3]

# A Docker image built without `.git` can say which commit it was built from (see the Dockerfile).
COMMIT_ENV_VARIABLE = "PROVENANCE_GIT_COMMIT"

MAX_LISTED_PATHS = 20
# Set, they move the repository, its index or its working tree away from where .git is found.
GIT_LOCATION_VARIABLES = ("GIT_DIR", "GIT_INDEX_FILE", "GIT_WORK_TREE", "GIT_COMMON_DIR")


class GitProcess(subprocess.Popen):
    """A git command started by start_git; `text`: whether finish_git decodes what it printed."""

    text = True


def start_git(
    args: list[str],
    cwd: Path | str = PROJECT_ROOT,
    stdin: int | None = None,
    env: dict | None = None,
    text: bool = True,
) -> GitProcess:
    """Start a git command (output captured as text, or bytes with `text=False`; `env` added to
    the environment); a missing git binary is a refusal."""
    if shutil.which("git") is None:
        raise Refusal(
            "git is not installed (no 'git' on PATH): the template records the commit of "
            "every logged run and needs git to do so. Install git, or run with --no-logging."
        )
    # Git's messages in English whatever the user's locale: the gate reads some of them.
    environment = {**os.environ, **(env or {}), "LC_ALL": "C", "LANGUAGE": "C"}
    process = GitProcess(
        ["git", *args], cwd=cwd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment
    )
    process.text = text
    return process


def finish_git(
    process: GitProcess, cwd: Path | str, check: bool = True, input: str | bytes | None = None
) -> subprocess.CompletedProcess:
    """Wait for a git command started by start_git; with `check`, a failure raises.

    Text goes both ways as file names do (os.fsencode, os.fsdecode: the file system's encoding,
    bytes it cannot decode kept as surrogates, no newline translated), so that a path git
    prints, whatever its bytes (a `\r` in it, a Latin-1 name), names the same file again."""
    stdout, stderr = process.communicate(os.fsencode(input) if isinstance(input, str) else input)
    if process.text:
        stdout, stderr = os.fsdecode(stdout), os.fsdecode(stderr)
    if check and process.returncode != 0:
        message = stderr if isinstance(stderr, str) else stderr.decode(errors="replace")
        raise RuntimeError(f"'{' '.join(process.args)}' failed in {cwd}: {message.strip()}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_git(
    args: list[str],
    cwd: Path | str = PROJECT_ROOT,
    check: bool = True,
    input: str | bytes | None = None,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run a git command; a missing git binary is a refusal with a clear message. Bytes in
    (`input`) mean bytes out."""
    stdin = None if input is None else subprocess.PIPE
    process = start_git(args, cwd, stdin=stdin, env=env, text=not isinstance(input, bytes))
    return finish_git(process, cwd, check, input)


@dataclass
class RepositoryState:
    """What one `git status` says: the commit, the branch and every uncommitted change."""

    root: Path
    commit: str | None  # None: the repository has no commits yet
    branch: str | None  # None: detached HEAD
    changes: list[str] = field(default_factory=list)  # "modified: src/model.py", ...
    # The paths whose working-tree file differs from the index (what `git add` would change).
    paths: list[str] = field(default_factory=list)
    # The paths whose index entry differs from HEAD: path -> git status's letter (M, A, D, R,
    # C, T; a rename's old path: D), for a snapshot (record/snapshot.py), which starts at HEAD.
    staged: dict[str, str] = field(default_factory=dict)
    # The index entry (mode, blob) of each tracked path git status names: `git add` reads a file
    # against it (core.fileMode=false keeps its mode, core.autocrlf a committed CRLF), and so does a snapshot.
    indexed: dict[str, tuple[str, str]] = field(default_factory=dict)
    # The entry (mode, object id) in HEAD of each path git status names as changed and in HEAD:
    # where a snapshot finds it in HEAD's tree without reading all of the tree.
    in_head: dict[str, tuple[str, str]] = field(default_factory=dict)
    in_progress: str | None = None  # "a merge", "a rebase"...: an operation git has not concluded


# What git leaves in its directory while an operation waits for the user: (what, how to conclude it).
OPERATIONS = {
    "MERGE_HEAD": ("a merge", "git commit (or git merge --abort)"),
    "rebase-merge": ("a rebase", "git rebase --continue (or --abort)"),
    "rebase-apply": ("a rebase (or git am)", "git rebase --continue (or git rebase --abort, git am --abort)"),
    "CHERRY_PICK_HEAD": ("a cherry-pick", "git cherry-pick --continue (or --abort)"),
    "REVERT_HEAD": ("a revert", "git revert --continue (or --abort)"),
}


def operation_in_progress(root: Path, index: Path | None) -> str | None:
    """Which of OPERATIONS git is in the middle of for `root` (its files in the git directory,
    next to the index), or None."""
    if index is not None:
        git_directory = index.parent
    else:
        found = run_git(["rev-parse", "--absolute-git-dir"], cwd=root, check=False)
        if found.returncode != 0:
            return None
        git_directory = Path(found.stdout.strip())
    return next((name for name in OPERATIONS if (git_directory / name).exists()), None)


_CHANGE_NAMES = {"M": "modified", "A": "added", "D": "deleted", "R": "renamed", "C": "copied", "T": "type changed"}


def _describe_change(xy: str, submodule: str, path: str, original: str | None) -> str:
    if submodule.startswith("S") and submodule != "S...":
        what = [
            text
            for flag, text in zip(submodule[1:], ("new commits", "modified content", "untracked content"), strict=True)
            if flag != "."
        ]
        return f"submodule ({', '.join(what)}): {path}"
    staged, unstaged = xy[0], xy[1]
    if staged != ".":
        name = _CHANGE_NAMES.get(staged, staged)
        source = f" (from {original})" if original else ""
        return f"staged, {name}: {path}{source}"
    return f"{_CHANGE_NAMES.get(unstaged, unstaged)}: {path}"


def repository_state(root: Path | str = PROJECT_ROOT, untracked: str = "normal") -> RepositoryState:
    """Read the commit, branch and uncommitted changes of the repository holding `root`.
    `untracked`: "normal" names a new directory once (what the gate lists), "all" each of its
    files (what a snapshot holds)."""
    # --no-optional-locks: git status would otherwise write the index back (under index.lock), and
    # a `git add` or `git commit` of the user's at that moment would fail.
    status = start_git(
        [
            "--no-optional-locks",
            "status",
            "--porcelain=v2",
            "--branch",
            "-z",
            "--ignore-submodules=none",
            f"--untracked-files={untracked}",
        ],
        cwd=root,
    )
    # Read the index while git status runs (on another core), so the check costs almost nothing.
    index = _index_file(Path(root))
    maybe_marked = index is None or index_may_mark_files(index)
    result = finish_git(status, root, check=False)
    if result.returncode != 0:
        if "not a git repository" in result.stderr:
            raise NotARepository(root)
        if "dubious ownership" in result.stderr:  # a checkout owned by another user (a mounted volume)
            raise Refusal(
                f"git refuses to read {root}: it belongs to another user ('dubious ownership'). If you "
                f"trust it, run: git config --global --add safe.directory {Path(root).resolve()}"
            )
        raise RuntimeError(f"'git status' failed in {root}: {result.stderr.strip()}")
    state = RepositoryState(root=Path(root), commit=None, branch=None)
    state.in_progress = operation_in_progress(Path(root), index)
    _read_status(state, result.stdout)
    if maybe_marked and state.commit is not None:
        marked = marked_file_changes(Path(root))
        state.changes.extend(marked)
        state.paths += [change.partition("): ")[2] for change in marked]
    return state


def _read_status(state: RepositoryState, output: str) -> None:
    """Fill `state` from `git status --porcelain=v2 --branch -z`."""
    records = iter(output.split("\0"))
    for record in records:
        if record.startswith("# branch.oid "):
            oid = record.split(" ", 2)[2]
            state.commit = None if oid == "(initial)" else oid
        elif record.startswith("# branch.head "):
            head = record.split(" ", 2)[2]
            state.branch = None if head == "(detached)" else head
        elif record.startswith(("1 ", "u ", "2 ")):
            fields = record.split(" ", {"1": 8, "u": 10, "2": 9}[record[0]])
            origin = next(records) if record[0] == "2" else None  # a rename's or copy's old path
            state.changes.append(_describe_change(fields[1], fields[2], fields[-1], origin))
            if fields[1][1] != ".":
                state.paths.append(fields[-1])
                if fields[1][1] == "R":  # a rename in the working tree (git add -N): the old path left it too
                    state.paths.append(origin)
            if record[0] != "u" and fields[4] != "000000":  # "1 XY sub mH mI mW hH hI path"
                state.indexed[fields[-1]] = (fields[4], fields[7])
            if record[0] == "1" and fields[3] != "000000":
                state.in_head[fields[-1]] = (fields[3], fields[6])
            if fields[1][0] != ".":
                state.staged[fields[-1]] = fields[1][0]
                if fields[1][0] == "R":  # the old path left the index (a copy keeps it)
                    state.staged.setdefault(origin, "D")
        elif record.startswith("? "):
            state.changes.append(f"untracked: {record[2:]}")
            state.paths.append(record[2:])


# An index entry (git's Documentation/gitformat-index.txt, versions 2 and 3) is 40 bytes of
# stat data, a 20-byte SHA-1, 2 bytes of flags, the path, and 1 to 8 NULs up to a multiple of
# 8 bytes. The flags' high byte holds assume-valid (0x80: what --assume-unchanged sets),
# "extended flags follow" (0x40: skip-worktree or intent-to-add), the merge stage (0x30) and
# the path length's top 4 bits. Above 0x0E: a mark, a conflict, or a path of 3,840 bytes or more.
_FLAGS_OFFSET = 60
_PLAIN_ENTRY_HIGH_BYTE_MAX = 0x0E
_SHA1_BYTES = 20


def _index_file(root: Path) -> Path | None:
    """The index file git reads for `root`, found as git finds it; None where that is not
    plain (GIT_DIR and friends set, no .git found), so that the caller asks git instead."""
    if any(name in os.environ for name in GIT_LOCATION_VARIABLES):
        return None
    for directory in (root.resolve(), *root.resolve().parents):
        dot_git = directory / ".git"
        if dot_git.is_dir():
            return dot_git / "index"
        if dot_git.is_file():  # a linked worktree or a submodule: "gitdir: <path>"
            text = dot_git.read_text(errors="replace").strip()
            return (directory / text[len("gitdir: ") :]) / "index" if text.startswith("gitdir: ") else None
    return None


def index_may_mark_files(index: Path) -> bool:
    """Whether any entry of a git index may be marked assume-unchanged or skip-worktree.

    Reads index formats 2 and 3 with SHA-1 (git's default), about 5 ms per 50,000 files,
    while git status runs. Answers True when unsure (another format, a split index, a
    conflict, an unreadable file): the caller then asks git, which is right, only slower.
    """
    try:
        data = index.read_bytes()
    except OSError:
        return True
    if data[:4] != b"DIRC" or int.from_bytes(data[4:8], "big") not in (2, 3):
        return True
    end = len(data) - _SHA1_BYTES
    position = 12 + _FLAGS_OFFSET  # the first entry's flags; the loop walks from flags to flags
    try:
        for _ in range(int.from_bytes(data[8:12], "big")):
            high = data[position]
            if high > _PLAIN_ENTRY_HIGH_BYTE_MAX:
                return True
            path_length = high << 8 | data[position + 1]
            position += (_FLAGS_OFFSET + 2 + path_length + 8) & ~7
        position -= _FLAGS_OFFSET  # the end of the last entry
        while position < end:  # extensions: signature, size, data
            if data[position : position + 4] == b"link":  # a split index: entries live elsewhere too
                return True
            position += 8 + int.from_bytes(data[position + 4 : position + 8], "big")
    except IndexError:
        return True
    return position != end  # anything else than landing on the trailer: not a format read here


def marked_file_changes(root: Path) -> list[str]:
    """Files marked assume-unchanged or skip-worktree whose content differs from the index
    ("modified (skip-worktree): src/model.py") or that are missing ("deleted (assume-unchanged)");
    a missing skip-worktree file is no change: a sparse checkout leaves such files out of the
    working tree, and `git add -A` keeps them as the index has them."""
    listing = run_git(["ls-files", "-v", "-s", "-z"], cwd=root).stdout  # "h 100644 <blob> 0\tpath"
    marked = []
    for record in filter(None, listing.split("\0")):
        info, _, path = record.partition("\t")
        tag, mode, blob, _stage = info.split(" ")
        assume_unchanged, skip_worktree = tag.islower(), tag in "Ss"
        if assume_unchanged or skip_worktree:
            marks = ["assume-unchanged"] * assume_unchanged + ["skip-worktree"] * skip_worktree
            marked.append((path, mode, blob, ", ".join(marks)))
    changes, files = [], []
    for path, mode, blob, marks in marked:
        file = root / path
        if mode == "160000":  # a submodule: git status checks its commit
            continue
        if not file.is_symlink() and not file.is_file():
            if "skip-worktree" not in marks:
                changes.append(f"deleted ({marks}): {path}")
        elif mode == "120000":  # a symbolic link's blob is its target; git hash-object would follow it
            if not file.is_symlink() or blob_id(os.fsencode(os.readlink(file)), blob) != blob:
                changes.append(f"modified ({marks}): {path}")
        else:
            files.append((path, blob, marks))
    if files:  # one call for all of them, with git's own filters (line endings, LFS) applied
        hashes = run_git(["hash-object", "--stdin-paths"], cwd=root, input="".join(f"{p}\n" for p, _, _ in files))
        for (path, blob, marks), current in zip(files, hashes.stdout.split(), strict=True):
            if current != blob:
                changes.append(f"modified ({marks}): {path}")
    return changes


def blob_id(content: bytes, like: str) -> str:
    """Git's object id of a blob holding `content`, in the hash of the id `like` (SHA-1, or
    SHA-256 for 64 hex digits)."""
    digest = hashlib.sha256() if len(like) == 64 else hashlib.sha1(usedforsecurity=False)
    digest.update(b"blob %d\0" % len(content))
    digest.update(content)
    return digest.hexdigest()


class NotARepository(Refusal):
    def __init__(self, root):
        super().__init__(
            f"{root} is not inside a git repository, so a logged run could not record its commit. "
            f"Run 'git init && git add -A && git commit', set {COMMIT_ENV_VARIABLE} (in a container "
            "built from a commit, see the Dockerfile), or run with --no-logging."
        )


def check_clean(state: RepositoryState) -> None:
    """The gate: refuse (exit 3) unless the tree is exactly a commit."""
    if state.commit is None:
        raise Refusal(
            f"the git repository at {state.root} has no commits yet, so a logged run could not "
            "record its commit. Commit your code first (git add -A && git commit), or run with --no-logging."
        )
    if state.in_progress:
        what, conclude = OPERATIONS[state.in_progress]
        raise Refusal(
            f"the git repository at {state.root} is in the middle of {what} ({state.in_progress} in its git "
            f"directory), so HEAD is not yet the commit its files belong to. Conclude it first: {conclude}; "
            "or run with --no-logging."
        )
    if state.changes:
        listed = state.changes[:MAX_LISTED_PATHS]
        more = len(state.changes) - len(listed)
        lines = "\n  ".join(listed + ([f"... and {more} more"] if more else []))
        raise Refusal(
            f"refusing to log a run from a working tree with uncommitted changes "
            f"({len(state.changes)} in {state.root}):\n  {lines}\n"
            "Commit them (or add them to .gitignore) so the run can record the exact code, or run "
            "with --allow-dirty-repo (asks first, then runs with logging off), or --no-logging."
        )


def git_provenance(state: RepositoryState) -> dict:
    """The `git` section of a run's config.yaml (the tree is known to be clean)."""
    # Both asked at once (two processes).
    listing = start_git(["config", "--get-regexp", r"^remote\..*\.url$"], cwd=state.root)
    containing = start_git(["for-each-ref", "--count=1", "--contains", state.commit, "refs/remotes"], cwd=state.root)
    remotes = {}
    for line in finish_git(listing, state.root, check=False).stdout.splitlines():
        key, _, url = line.partition(" ")
        remotes[key[len("remote.") : -len(".url")]] = url
    on_remote = bool(finish_git(containing, state.root, check=False).stdout.strip())
    submodules = {}
    if (state.root / ".gitmodules").exists():
        for line in run_git(["submodule", "status", "--recursive"], cwd=state.root).stdout.splitlines():
            commit, path = line[1:].split()[:2]
            submodules[path] = commit
    return {
        "commit": state.commit,
        "branch": state.branch,
        "detached": state.branch is None,
        "remotes": remotes,
        "commit_on_remote": on_remote,
        "submodules": submodules,
        "source": "git repository",
    }


def commit_from_environment() -> dict | None:
    """The `git` section for a container without `.git`, from PROVENANCE_GIT_COMMIT."""
    commit = os.environ.get(COMMIT_ENV_VARIABLE, "").strip()
    if not commit:
        return None
    return {
        "commit": commit,
        "branch": None,
        "detached": None,
        "remotes": {},
        "commit_on_remote": None,
        "submodules": {},
        "source": f"environment variable {COMMIT_ENV_VARIABLE} (no .git; cleanliness not checked)",
    }


def gate(root: Path | str = PROJECT_ROOT) -> dict:
    """Refuse unless the code is a clean commit; return the `git` provenance section."""
    try:
        state = repository_state(root)
    except NotARepository:
        from_environment = commit_from_environment()
        if from_environment is None:
            raise
        return from_environment
    check_clean(state)
    return git_provenance(state)


def add_worktree(commit: str, path: Path, purpose: str) -> None:
    """A clean checkout of `commit` at `path` (submodules included), sharing this repository's
    objects: code that later edits, checkouts or commits in the working tree cannot change."""
    if run_git(["cat-file", "-e", f"{commit}^{{commit}}"], check=False).returncode != 0:
        raise Refusal(
            f"{purpose}: commit {commit[:12]} is not in this repository (not fetched, or history was "
            "rewritten). Fetch it (git fetch --all) and try again."
        )
    run_git(["worktree", "add", "--detach", "--quiet", str(path), commit])
    if (path / ".gitmodules").exists():
        run_git(["submodule", "update", "--init", "--recursive", "--quiet"], cwd=path)


def remove_worktree(path: Path) -> None:
    run_git(["worktree", "remove", "--force", str(path)], check=False)
    run_git(["worktree", "prune"], check=False)


def check_same_commit(recorded: str, current: str, flag: str, run_directory: Path, what: str = "the run") -> None:
    """A run continues (or is evaluated) only with the code that made it: refuse another commit."""
    if current != recorded:
        raise Refusal(
            f"{flag} {run_directory}: {what} was made at commit {str(recorded)[:12]}, but HEAD is "
            f"{current[:12]}. Check out its commit first: git checkout {str(recorded)[:12]}"
        )
