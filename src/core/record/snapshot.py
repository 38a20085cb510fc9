"""`--snapshot`: log a run from a dirty working tree by committing the tree, as it is, to a
hidden ref (`refs/runs/<project>/<run>`) instead of refusing.

The commit is built without touching the user's index: git computes the ids of the paths git
status named in a temporary index of their own (GIT_INDEX_FILE), and their blobs (git writes
those it stores otherwise than as they are), the base's trees on their way with them changed,
and the commit go into the repository as one pack, or loose objects when few (see
record/commit_builder.py). HEAD, the branch, the real index, the stash and the working tree are
left exactly as they were. It holds what the gate complains about: tracked files modified,
deleted or renamed, untracked files that .gitignore does not exclude, executable bits, symbolic
links, and files marked assume-unchanged or skip-worktree (by content, as the gate reads them).

The commit's author, dates and message depend only on the tree and its base, so the same
tree on the same base is the same commit: sweep members, repeated runs, a torchrun restart
and a `--resume --snapshot` of an unchanged tree all find the one snapshot.
"""

import errno
import os
import re
import stat
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from src.core.errors import Refusal
from src.core.record.commit_builder import CommitBuilder
from src.core.record.git import (
    GIT_LOCATION_VARIABLES,
    MAX_LISTED_PATHS,
    PROJECT_ROOT,
    NotARepository,
    RepositoryState,
    check_clean,
    finish_git,
    gate,
    git_provenance,
    repository_state,
    run_git,
    start_git,
)

REF_PREFIX = "refs/runs"
BUNDLE_FILE = "snapshot.bundle"  # in a snapshot run's directory: the snapshot, as a git bundle
PENDING_PREFIX = "refs/runs-pending"  # a snapshot made, its run not yet named (see pin_snapshot)
ENVIRONMENT_VARIABLE = "TEMPLATE_SNAPSHOT"
AUTHOR = "run.py --snapshot <snapshot@run.invalid>"  # the snapshots' author and committer
UNSAFE_REF_CHARACTERS = re.compile(r"[^A-Za-z0-9._=,+-]")
GITLINK, TREE = "160000", "040000"  # the modes of a submodule's commit and of a directory
# Changed files' bytes held in memory for the snapshot's pack, at most; git writes the rest itself.
INLINE_BYTES = 32 * 1024 * 1024
SEED_ARGUMENT_BYTES = 256 * 1024  # index entries given to git on its command line, at most


@dataclass(frozen=True)
class Snapshot:
    commit: str  # the snapshot commit
    base: str | None  # HEAD when it was taken (None: a branch without commits)
    files: list[str]  # the paths that differ from the base
    referenced: bool  # by a ref already (else it wants its pending ref: see snapshot_gate)


def snapshot_requested(flag: bool) -> bool:
    """--snapshot, or TEMPLATE_SNAPSHOT=1 in the environment."""
    return flag or os.environ.get(ENVIRONMENT_VARIABLE, "").strip() in ("1", "true", "yes")


def _list(paths: list[str]) -> str:
    listed = paths[:MAX_LISTED_PATHS]
    more = len(paths) - len(listed)
    return "\n  ".join(listed + ([f"... and {more} more"] if more else []))


def untracked_files(state: RepositoryState) -> list[str]:
    """The untracked paths of a `git status --untracked-files=all`: each file, and each git
    repository inside the tree (not a submodule) as its directory, with a slash."""
    return [change[len("untracked: ") :] for change in state.changes if change.startswith("untracked: ")]


def check_snapshot_allowed(state: RepositoryState, untracked: list[str], max_file_mb: float) -> None:
    """Refuse (exit 3, one message) what a snapshot should not hold: an unconcluded merge or
    rebase (as the gate does), a submodule with uncommitted content (its own commit would be
    needed), a git repository inside the tree that is not a submodule (`git add -A` would record
    its commit, and nothing of where to get it), or untracked files over the size limit (data
    and checkpoints belong in .gitignore)."""
    if state.in_progress:  # a merge's conflicts would be snapshotted with their markers
        check_clean(state)
    submodules = [c for c in state.changes if c.startswith("submodule (") and "content" in c.split(":")[0]]
    if submodules:
        raise Refusal(
            f"--snapshot: cannot snapshot submodules with uncommitted changes (a snapshot records "
            f"a submodule's commit only):\n  {_list(submodules)}\n"
            "Commit (or discard) the changes inside each submodule first, then run again."
        )
    check_no_repositories([path for path in untracked if path.endswith("/")])
    limit = max_file_mb * 1024 * 1024
    large = []
    for path in untracked:
        size = os.lstat(os.path.join(state.root, path)).st_size
        if size > limit:
            large.append(f"{path} ({size / 1024 / 1024:.1f} MB)")
    if large:
        raise Refusal(
            f"--snapshot: untracked files over snapshot_max_file_mb ({max_file_mb:g} MB) would go "
            f"into the repository:\n  {_list(large)}\n"
            "Add them to .gitignore (data, checkpoints and outputs belong outside git), or raise "
            "snapshot_max_file_mb in the config."
        )


def check_no_repositories(paths: list[str]) -> None:
    """Refuse git repositories inside the working tree that are not its submodules: `git add -A`
    would record a commit of theirs, and nothing of where to fetch it."""
    if paths:
        raise Refusal(
            f"--snapshot: cannot snapshot git repositories inside the working tree that are not its "
            f"submodules (git would record a commit of theirs, and nothing of where it comes from):\n  "
            f"{_list(paths)}\n"
            "Add each as a submodule (git submodule add <url> <path>) or to .gitignore, then run again."
        )


def build_snapshot(state: RepositoryState, untracked: list[str], builder: CommitBuilder) -> Snapshot:
    """Commit the working tree of `state` (not referenced yet: see pin_snapshot) and return it.

    Only what git status named is read again: git computes those files' ids in a temporary
    index of them alone (content, executable bit, symbolic link, submodule commit, as `git add`
    reads them), and the commit is made of the base's tree with those paths changed (see
    CommitBuilder), writing their blobs and, again, only the trees on their way. The index and
    the rest of the tree are not read, so the cost follows the number of changed paths, not the
    size of the repository."""
    root, base = state.root, state.commit
    read = {*state.paths, *(path for path, letter in state.staged.items() if letter != "D"), *untracked}
    removed = {path for path, letter in state.staged.items() if letter == "D" and path not in read}
    builder.begin(base, read | removed, state.in_head)  # reads the base's trees meanwhile
    # Beyond a symbolic link (a tracked directory replaced by a link to scratch space, say), a path
    # is gone: git records the link, and reads nothing through it.
    through_links = _beyond_links(root, read)
    # A tracked file that became a directory (an untracked path is a file), or a repository (refused, as
    # a new one is, unless the index has it as a submodule).
    kinds = {path: _file_kind(os.path.join(root, path)) for path in read - set(untracked) - through_links}
    became = {path for path, kind in kinds.items() if kind is not None and stat.S_ISDIR(kind)}
    repositories = {path for path in became if os.path.exists(os.path.join(root, path, ".git"))}
    check_no_repositories(sorted(path for path in repositories if state.indexed.get(path, ("",))[0] != GITLINK))
    directories = became - repositories  # removed first; git status named the files in them as untracked
    # The index entries of tracked files still there (a deleted one's could clash with a file where its
    # directory was), for git to read each file against, as `git add` does.
    seed = {
        path: state.indexed[path]
        for path, kind in kinds.items()
        if kind is not None and path in state.indexed and path not in directories
    }
    hashed = _hash_files(root, sorted(read - directories - through_links), seed, builder)
    changes = {path: hashed.get(path) for path in read - directories}  # None: gone from the working tree
    changes |= dict.fromkeys(removed | directories)
    message = f"snapshot of the working tree on {base or 'an unborn branch'}\n"
    commit, before = builder.commit(changes, AUTHOR, message)  # dated as its base: see CommitBuilder
    # Whether a ref holds it already: its run's (a resume, a torchrun restart, a sweep's next member),
    # or a pending one. (Refs are asked, not objects: in a partial clone, asking git for an object it
    # lacks fetches it from the remote.)
    held = start_git(["for-each-ref", "--count=1", "--points-at", commit, REF_PREFIX, PENDING_PREFIX], cwd=root)
    try:
        builder.write()  # meanwhile; writing objects git has already changes nothing
    except BaseException:
        finish_git(held, root, check=False)
        raise
    referenced = bool(finish_git(held, root).stdout)
    # The files that differ (a directory of the base, removed to be written again, is not one).
    files = sorted(
        path for path, change in changes.items() if change != before[path] and (change or before[path])[0] != TREE
    )
    return Snapshot(commit, base, files, referenced)


def _is_top_level(root: Path) -> bool:
    """Whether `root` is its working tree's top level, as far as can be told without asking git."""
    return (root / ".git").exists() and not any(name in os.environ for name in GIT_LOCATION_VARIABLES)


def _beyond_links(root: Path, paths: set[str]) -> set[str]:
    """The paths with a symbolic link among their leading directories (each directory looked at once)."""
    linked: dict[str, bool] = {"": False}

    def is_beyond(directory: str) -> bool:
        if directory not in linked:
            linked[directory] = is_beyond(os.path.dirname(directory)) or os.path.islink(os.path.join(root, directory))
        return linked[directory]

    directories = {path: os.path.dirname(path) for path in paths}
    linked_directories = {directory for directory in set(directories.values()) if is_beyond(directory)}
    return {path for path, directory in directories.items() if directory in linked_directories}


def _file_kind(path: str) -> int | None:
    """The mode of what is at `path`, a link's own (None: nothing)."""
    try:
        return os.lstat(path).st_mode
    except OSError:
        return None


def _hash_files(
    root: Path, paths: list[str], seed: dict[str, tuple[str, str]], builder: CommitBuilder
) -> dict[str, tuple[str, str]]:
    """path -> (mode, object id) of each path that exists, as `git add` reads it (content,
    executable bit, symbolic link, submodule commit, filters and line endings, against its
    index entry in `seed`, if any).

    Git computes every id without writing anything (a loose object per file is what made a first
    snapshot slow), while the files are read here and made ready as blobs for the snapshot's pack
    (`builder`). A file that git stores otherwise than as it is (a clean filter, converted line
    endings; or changed meanwhile) gets another id: git writes that one itself."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        computing = pool.submit(_index_entries, root, paths, seed, False)
        read, budget = {}, INLINE_BYTES
        for path in paths:
            data = _blob_bytes(os.path.join(root, path), budget)
            if data is not None:
                read[path] = data
                budget -= len(data)
        as_they_are = builder.add_blobs(read)
        entries = computing.result()
    written = {
        path for path, (mode, object_id) in entries.items() if mode != GITLINK and as_they_are.get(path) != object_id
    }
    if written:  # git's own objects; a path gone since is simply not added
        kept = {path: entry for path, entry in entries.items() if path not in written}
        written_seed = {path: entry for path, entry in seed.items() if path in written}
        entries = kept | _index_entries(root, sorted(written), written_seed, write=True)
    return entries


def _index_entries(
    root: Path, paths: list[str], seed: dict[str, tuple[str, str]], write: bool
) -> dict[str, tuple[str, str]]:
    """`update-index --add` of `paths` on a temporary index of them alone, holding first the
    user's index entries `seed` of some of them (path -> (mode, blob)): path -> (mode, id). Without
    `write`, git computes each id but writes no object (--info-only). `seed` holds no more paths
    than `paths`."""
    handle, temporary = tempfile.mkstemp(prefix="snapshot-index-")
    os.close(handle)
    os.unlink(temporary)  # git starts an empty index where none exists
    index_env = {"GIT_INDEX_FILE": temporary}
    try:
        # The seed, without stat data (every file is read again): on git's command line where it is
        # short enough, sparing a process of its own.
        seeded = [
            argument for path, (mode, blob) in seed.items() for argument in ("--cacheinfo", f"{mode},{blob},{path}")
        ]
        if sum(map(len, seeded)) > SEED_ARGUMENT_BYTES:
            listed = "".join(f"{mode} {blob} 0\t{path}\0" for path, (mode, blob) in seed.items())
            run_git(["update-index", "-z", "--index-info"], cwd=root, env=index_env, input=listed)
            seeded = []
        if paths:  # --remove: a path gone from the working tree is simply not added
            options = [] if write else ["--info-only"]
            adding = run_git(
                ["update-index", "--add", *seeded, "--remove", *options, "-z", "--stdin"],
                cwd=root,
                env=index_env,
                input="".join(f"{path}\0" for path in paths),
                check=False,
            )
            if adding.returncode != 0:  # what `git add -A` would fail on too: a pipe, a socket
                raise Refusal(
                    f"--snapshot: git cannot store the working tree as it is:\n  {adding.stderr.strip()}\n"
                    "Remove (or add to .gitignore) what git names, then run again."
                )
        listing = run_git(["ls-files", "-s", "-z"], cwd=root, env=index_env).stdout  # "mode id stage\tpath"
    finally:
        Path(temporary).unlink(missing_ok=True)
    entries = {}
    for record in filter(None, listing.split("\0")):
        info, _, path = record.partition("\t")
        mode, object_id, _ = info.split(" ")
        entries[path] = (mode, object_id)
    return entries


def _blob_bytes(path: str, limit: int) -> bytes | None:
    """What a blob of `path` holds if git stores it as it is (a file's bytes, a link's target),
    or None: a file over `limit` bytes, or what is not a regular file or a link (a submodule's
    directory, a pipe: opened without following or waiting), or cannot be read."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        if error.errno != errno.ELOOP:  # gone, unreadable: git's own reading decides
            return None
        try:  # a symbolic link: its target
            return os.fsencode(os.readlink(path))
        except OSError:
            return None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode) or status.st_size > limit:
            return None
        # One read (a byte more tells of a file that grew since): bytes that are not the whole file
        # do not give git's id, and git writes the file instead.
        return os.read(descriptor, status.st_size + 1)
    except OSError:
        return None
    finally:
        os.close(descriptor)


def snapshot_ref(project: str, run: str) -> str:
    """`refs/runs/<project>/<run>`, with characters a ref cannot hold replaced."""
    parts = [UNSAFE_REF_CHARACTERS.sub("_", part).lstrip(".").removesuffix(".lock") or "_" for part in (project, run)]
    return "/".join([REF_PREFIX, *parts])


def pin_snapshot(root: Path, commit: str, ref: str) -> str:
    """Point `ref` at `commit` so that git keeps it (gc, prune). An existing ref is never moved:
    a name another commit holds gets a `-2`, `-3`... suffix. Returns the ref used."""
    zero = "0" * len(commit)  # update-ref's "this ref must not exist yet"
    for attempt in range(1, 100):
        name = ref if attempt == 1 else f"{ref}-{attempt}"
        update = run_git(["update-ref", name, commit, zero], cwd=root, check=False)
        existing = run_git(["rev-parse", "--verify", "-q", name], cwd=root, check=False).stdout.strip()
        if existing == commit:
            run_git(["update-ref", "-d", f"{PENDING_PREFIX}/{commit}"], cwd=root, check=False)
            return name
        if not existing:
            raise RuntimeError(f"'git update-ref {name}' failed in {root}: {update.stderr.strip()}")
    raise RuntimeError(f"could not find a free ref name for {ref} in {root}")


def pin_run_snapshot(git: dict, directory: Path, root: Path = PROJECT_ROOT) -> dict:
    """A snapshot run's `git` section, its snapshot now kept by `refs/runs/<project>/<run>`
    (named after the run's, or sweep's, directory); any other run's as it is."""
    snapshot = git.get("snapshot")
    if not snapshot or snapshot.get("ref"):
        return git
    ref = pin_snapshot(root, git["commit"], snapshot_ref(directory.parent.name, directory.name))
    print(f"snapshot of the working tree: commit {git['commit'][:12]} ({len(snapshot['files'])} files), kept as {ref}")
    write_bundle(root, ref, snapshot["base"], directory / BUNDLE_FILE)
    return {**git, "snapshot": {**snapshot, "ref": ref}}


def write_bundle(root: Path, ref: str, base: str | None, path: Path) -> None:
    """The snapshot as a `git bundle` in the run directory, so that it travels with the run
    (archives, copies): only what the base lacks when a remote has the base, whole otherwise."""
    on_remote = base and run_git(["for-each-ref", "--count=1", "--contains", base, "refs/remotes"], cwd=root).stdout
    run_git(["bundle", "create", "-q", str(path), ref, *([f"^{base}"] if on_remote else [])], cwd=root)


def fetch_from_bundle(run_directory: Path, git: dict, root: Path = PROJECT_ROOT) -> None:
    """Before a snapshot run is re-made: a repository without its commit (a fresh clone, a
    restored archive) fetches it, under its ref, from the bundle in the run directory."""
    commit, snapshot = git.get("commit"), git.get("snapshot") or {}
    bundle = run_directory / BUNDLE_FILE
    if not snapshot or not bundle.is_file():
        return
    if run_git(["cat-file", "-e", f"{commit}^{{commit}}"], cwd=root, check=False).returncode == 0:
        return
    refspec = f"+{snapshot['ref']}:{snapshot['ref']}"
    fetched = run_git(["fetch", "-q", str(bundle.resolve()), refspec], cwd=root, check=False)
    if fetched.returncode != 0:
        raise Refusal(
            f"{run_directory}: its snapshot {commit[:12]} is not in this repository, and its {BUNDLE_FILE} "
            f"could not be fetched ({fetched.stderr.strip()}). The bundle holds only what its base "
            f"{str(snapshot.get('base'))[:12]} lacks: fetch the base (git fetch --all), then try again."
        )
    print(f"fetched snapshot {commit[:12]} from {bundle} as {snapshot['ref']}")


def snapshot_gate(root: Path, max_file_mb: float) -> dict:
    """The `git` provenance of a run with --snapshot: a clean tree's as usual; a dirty tree's
    snapshot commit, with `snapshot: {base, ref, files}` (`ref` is filled in when the run
    directory, which names it, is made: see pin_snapshot)."""
    try:
        state = repository_state(root, untracked="all")  # each new file named, not its new directory
    except NotARepository:  # a container built from a commit ($PROVENANCE_GIT_COMMIT), or a refusal
        return gate(root)
    if not state.changes:
        check_clean(state)  # a repository without commits
        return git_provenance(state)
    if not _is_top_level(Path(root)):  # git status names paths from where it runs: read it at the top
        top_level = Path(run_git(["rev-parse", "--show-toplevel"], cwd=root).stdout.strip())
        state = repository_state(top_level, untracked="all")
    untracked = untracked_files(state)
    with CommitBuilder(state.root) as builder:  # git's object reader starts while the tree is checked
        check_snapshot_allowed(state, untracked, max_file_mb)
        snapshot = build_snapshot(state, untracked, builder)
    # Referenced at once (if no ref holds it yet), so that a `git gc --prune=now` before the run pins it
    # loses nothing.
    pending = f"{PENDING_PREFIX}/{snapshot.commit}"
    pinning = None if snapshot.referenced else start_git(["update-ref", pending, snapshot.commit], cwd=state.root)
    try:
        provenance = git_provenance(RepositoryState(state.root, snapshot.commit, state.branch))  # meanwhile
    except BaseException:
        if pinning:
            finish_git(pinning, state.root, check=False)
        raise
    if pinning:
        finish_git(pinning, state.root)
    provenance["snapshot"] = {"base": snapshot.base, "ref": None, "files": snapshot.files}
    return provenance


def logging_gate(snapshot: bool, max_file_mb: float, root: Path = PROJECT_ROOT) -> dict:
    """The gate of a logged run: with --snapshot (or TEMPLATE_SNAPSHOT=1) a dirty tree is
    snapshotted, without it refused."""
    return snapshot_gate(root, max_file_mb) if snapshot_requested(snapshot) else gate(root)


def resume_hint(saved_git: dict) -> str:
    """What to add to a refused --resume of a snapshot run: how such a run continues."""
    snapshot = saved_git.get("snapshot")
    if not snapshot:
        return ""
    ref = snapshot.get("ref") or saved_git["commit"]
    return (
        f"\nThis run was logged from a snapshot of uncommitted work ({ref}). Resume it with --snapshot "
        "while the working tree holds the same changes on the same commit, or from a checkout of the "
        f"snapshot: git worktree add ../snapshot {ref} && cd ../snapshot && python run.py --resume RUN_DIR"
    )
