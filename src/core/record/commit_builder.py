"""The snapshot's commit: the base's tree with some paths changed, its new trees and blobs
written into the repository by record/pack.py.

Why here rather than by `git fast-import`: a snapshot of 1,000 files across 100 directories writes
every tree of the repository again, and fast-import's fixed work for each object (SHA-1 with
collision detection, a fresh zlib state of a quarter of a megabyte, the whole pack hashed again
at its end, every tree sorted again) took 1.4 times a `git status` on its own. Here each changed
entry is found in the base's tree by its bytes and replaced where it is (a tree that keeps its
names, with a few changes, is neither parsed nor sorted), trees and small blobs are stored as
they are (half of a tree is ids, which do not compress), and objects are hashed with OpenSSL's
SHA-1 (each blob's id is the one git computes for its file: see record/snapshot.py).
benchmarks/README.md has the figures.
"""

import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from src.core.record.git import finish_git, start_git
from src.core.record.pack import ObjectReader, ObjectWriter

TREE_MODE = b"40000"  # git writes a directory's mode without a leading zero
TREE_PREFIX = TREE_MODE + b" "  # how a directory's entry in a tree starts
# Changed names in one directory searched for one by one, at most; more read its tree whole.
SEARCHES_AT_MOST = 16
# A root commit (a branch without commits yet) needs some date: a fixed one keeps it reproducible.
ROOT_DATE = "946684800 +0000"  # 2000-01-01
Change = tuple[str, str] | None  # (mode, hex id), or None: nothing at the path


def _is_tree(entry: bytes) -> bool:
    """Whether a tree's entry ("<mode> <name>\\0<raw id>") is a directory's (old trees may write its
    mode "040000")."""
    return entry.startswith(TREE_PREFIX) or entry.startswith(b"0" + TREE_PREFIX)


def _entry_key(entry: bytes) -> bytes:
    """Git's order of a tree's entries: by name, a directory's as if it ended in a slash."""
    rest = entry.partition(b" ")[2]
    name = rest[: rest.index(b"\0")]
    return name + b"/" if _is_tree(entry) else name


class _Directory:
    """A directory on the way to changed paths: its changed entries, the directories below it
    that hold more, and its tree in the base.

    An entry of the base's tree is found without reading all of the tree where that is certain:
    an entry known to be there (its mode and id, from git status), or a directory known to be
    there ("40000 <name>\\0"), is where its bytes occur, if they occur once. Otherwise (a new
    name, a name that occurs twice, or many changes in one directory) the tree is read once, whole."""

    def __init__(self):
        self.changed: dict[bytes, str] = {}  # name -> the changed path
        self.below: dict[bytes, _Directory] = {}
        self.known: dict[bytes, bytes] = {}  # name -> its entry in the base, known beforehand
        self.in_base = False  # known to be a directory of the base
        self.tree = b""  # its tree in the base (b"": none)
        self.id_size = 0
        self._spans: dict[bytes, tuple[int, int]] | None = None  # every entry's, once read
        self._found: dict[bytes, tuple[int, int] | None] = {}  # span's answers

    def span(self, name: bytes) -> tuple[int, int] | None:
        """Where the entry called `name` is in the base's tree (start, end); None: not there."""
        if name not in self._found:
            self._found[name] = self._search(name)
        return self._found[name]

    def _search(self, name: bytes) -> tuple[int, int] | None:
        below, needle, size = self.below.get(name), None, 0
        if self._spans is not None or len(self.changed) + len(self.below) > SEARCHES_AT_MOST:
            needle = None  # one reading of the whole tree costs less than the searches
        elif name in self.known:
            needle = self.known[name]
        elif below is not None and below.in_base and name not in self.changed:
            needle, size = TREE_PREFIX + name + b"\0", self.id_size
        start = self.tree.find(needle) if needle else -1
        if start >= 0 and self.tree.find(needle, start + 1) < 0:
            return start, start + len(needle) + size
        return self.all_spans().get(name)

    def all_spans(self) -> dict[bytes, tuple[int, int]]:
        """Where each entry of the base's tree is: name -> (start, end)."""
        if self._spans is None:
            pattern = re.compile(rb"[0-7]+ ([^\0]*)\0.{%d}" % self.id_size, re.DOTALL)
            self._spans = {match[1]: match.span() for match in pattern.finditer(self.tree)}
        return self._spans

    def entry(self, name: bytes) -> bytes | None:
        """The entry called `name` in the base's tree, if any."""
        span = self.span(name)
        return None if span is None else self.tree[span[0] : span[1]]


class CommitBuilder:
    """A commit of the base's tree with some paths changed. git's object reader starts at once;
    the base's trees along the paths are read, on a thread of its own, from `begin`, while the
    caller finds out what the paths hold. Use it in a `with` block."""

    def __init__(self, root: Path):
        self.root, self.base, self.top = root, None, _Directory()
        self.writer: ObjectWriter | None = None  # once the repository's hash is known
        self.blobs: set[bytes] = set()  # the raw ids of add_blobs
        self.base_date = ROOT_DATE  # until the base's is read
        self.format = start_git(["rev-parse", "--show-object-format", "--git-path", "objects"], cwd=root)
        self.reader = ObjectReader(root)
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.reading = None

    def __enter__(self) -> "CommitBuilder":
        return self

    def __exit__(self, *exception) -> None:
        self.pool.shutdown()
        self.reader.close()
        if self.format.returncode is None:
            finish_git(self.format, self.root, check=False)

    def begin(self, base: str | None, paths: Iterable[str], in_base: dict[str, tuple[str, str]]) -> None:
        """Start reading the trees of `base` (None: a root commit) along `paths`. `in_base`: what
        some of the paths are in the base (path -> (mode, hex id)), as far as git status tells."""
        self.base = base
        self.reading = self.pool.submit(self._read_base, list(paths), in_base)

    def add_blobs(self, files: dict[str, bytes]) -> dict[str, str]:
        """The id of a blob of each file's bytes (path -> hex id), its blob made ready to be written
        with the commit if a change names it."""
        ids = {path: self._writer().add(b"blob", data) for path, data in files.items()}
        self.blobs |= set(ids.values())
        return {path: raw.hex() for path, raw in ids.items()}

    def _writer(self) -> ObjectWriter:
        """The object writer, once git has told the repository's hash and where its objects are."""
        if self.writer is None:
            hash_name, objects_directory = finish_git(self.format, self.root).stdout.splitlines()
            # A git too old to know the option prints it back: it knows SHA-1 alone.
            self.writer = ObjectWriter(hash_name if hash_name in ("sha1", "sha256") else "sha1")
            self.objects_directory = Path(self.root, objects_directory)
        return self.writer

    def commit(self, changes: dict[str, Change], author: str, message: str) -> tuple[str, dict[str, Change]]:
        """The commit with `changes` (each path given -> (mode, hex id), or None to remove it),
        made ready to be written (see write), with the blobs of add_blobs that it holds; and what
        each changed path was in the base (None: nothing there; a directory's mode is "040000",
        as git prints it).

        Only the base's trees along the changed paths are made again; a directory left empty goes,
        as git keeps none. Its author and committer are `author` ("name <email>") at the base's
        date, so that the same tree on the same base is the same commit."""
        writer = self._writer()
        named = {bytes.fromhex(change[1]) for change in changes.values() if change}
        writer.discard(self.blobs - named)  # files git stores otherwise than as they are (filters, line endings)
        self.reading.result()
        before: dict[str, Change] = dict.fromkeys(changes)
        tree = writer.add(b"tree", _build(self.top, changes, writer, before))
        parent = f"parent {self.base}\n" if self.base else ""
        signature = f"{author} {self.base_date}"
        header = f"tree {tree.hex()}\n{parent}author {signature}\ncommitter {signature}\n"
        return writer.add(b"commit", f"{header}\n{message}".encode()).hex(), before

    def write(self) -> None:
        """The commit and the objects it adds into the repository."""
        self.writer.write(self.objects_directory)

    def _add_paths(self, paths: list[str], in_base: dict[str, tuple[str, str]]) -> None:
        """The directories on the way to `paths`, with what they are known to hold in the base."""
        for path in paths:
            *directories, name = os.fsencode(path).split(b"/")
            directory, known = self.top, in_base.get(path)
            for part in directories:
                directory.in_base |= known is not None
                directory = directory.below.setdefault(part, _Directory())
            directory.in_base |= known is not None
            directory.changed[name] = path
            if known:
                directory.known[name] = b"%s %s\0%s" % (known[0].encode().lstrip(b"0"), name, bytes.fromhex(known[1]))

    def _read_commit(self, commit_id: str) -> tuple[bytes, bytes]:
        """A commit's content and its tree's."""
        (commit,) = self._read_present([commit_id])
        return commit, self._read_present([commit[len(b"tree ") : commit.index(b"\n")].decode()])[0]

    def _read_present(self, ids: list[str]) -> list[bytes]:
        """The content of objects of the base: one that is missing stops the snapshot, which would
        otherwise lose what it holds."""
        contents = self.reader.read(ids)
        missing = [object_id for object_id, content in zip(ids, contents, strict=True) if content is None]
        if missing:
            raise RuntimeError(
                f"objects of commit {self.base} are missing from the repository at {self.root} "
                f"({', '.join(missing[:3])}): run 'git fsck' (in a partial clone, fetch them first)"
            )
        return contents

    def _read_base(self, paths: list[str], in_base: dict[str, tuple[str, str]]) -> None:
        """The directories on the way to `paths`; and the base's date (its committer's, as "<seconds
        since 1970> +0000") and each directory's tree in it, a level at a time: one request for the
        trees of a level."""
        self._add_paths(paths, in_base)
        if self.base is None:
            return
        commit, tree = self._read_commit(self.base)
        committer = next(line for line in commit.split(b"\n") if line.startswith(b"committer "))
        self.base_date = f"{int(committer.rsplit(b'>', 1)[1].split()[0])} +0000"
        level: list[tuple[_Directory, bytes | None]] = [(self.top, tree)]
        while level:
            below = []
            for directory, content in level:
                directory.tree, directory.id_size = content or b"", self.reader.id_size
                for name, child in directory.below.items():
                    entry = directory.entry(name)
                    below.append((child, entry[-self.reader.id_size :].hex() if entry and _is_tree(entry) else None))
            contents = iter(self._read_present([tree_id for _, tree_id in below if tree_id]))
            level = [(directory, next(contents) if tree_id else None) for directory, tree_id in below]


def _build(
    directory: _Directory,
    changes: dict[str, Change],
    writer: ObjectWriter,
    before: dict[str, Change],
    removed: bool = False,
) -> bytes:
    """The content of `directory`'s tree with its `changes` (nothing of the base's if a change
    `removed` it), its new subtrees added to `writer` (b"": nothing is left, and it goes).
    Records each changed path's entry in the base in `before`."""
    new = _new_entries(directory, changes, writer, before, removed)
    for name, path in directory.changed.items():
        if (old := directory.entry(name)) is not None:
            before[path] = (old.partition(b" ")[0].decode().zfill(6), old[-writer.id_size :].hex())
    if removed:
        return b"".join(sorted(filter(None, new.values()), key=_entry_key))
    spans = {name: directory.span(name) for name in new}
    if all(_stays_in_place(directory.tree, new[name], span) for name, span in spans.items()):
        pieces, end = [], 0  # each changed entry replaced where it is
        for name, span in sorted(spans.items(), key=lambda item: item[1]):
            pieces += [directory.tree[end : span[0]], new[name] or b""]
            end = span[1]
        return b"".join([*pieces, directory.tree[end:]])
    # A new name, or a name that became a directory or stopped being one: the tree sorted again.
    entries = {name: directory.tree[start:end] for name, (start, end) in directory.all_spans().items()}
    for name, entry in new.items():
        entries.pop(name, None)
        if entry is not None:
            entries[name] = entry
    return b"".join(sorted(entries.values(), key=_entry_key))


def _stays_in_place(base: bytes, new: bytes | None, span: tuple[int, int] | None) -> bool:
    """Whether an entry of the tree `base` at `span` (None: not there) can be replaced by `new`
    (None: removed) where it is: it is there, and stays a directory or not one (its key in git's order)."""
    return span is not None and (new is None or _is_tree(new) == _is_tree(base[span[0] : span[1]]))


def _new_entries(
    directory: _Directory, changes: dict[str, Change], writer: ObjectWriter, before: dict[str, Change], removed: bool
) -> dict[bytes, bytes | None]:
    """name -> the new entry of each name that changes in `directory` (None: it goes), the trees
    below it built first."""
    new: dict[bytes, bytes | None] = {}
    for name, path in directory.changed.items():
        change = changes[path]
        mode = change and change[0].encode().lstrip(b"0")
        new[name] = None if change is None else b"%s %s\0%s" % (mode, name, bytes.fromhex(change[1]))
    for name, below in directory.below.items():
        replaced = name in directory.changed
        content = _build(below, changes, writer, before, removed or replaced)
        if replaced and new[name] is not None:
            continue  # a file (a link) where the directory was: only its entries in the base were wanted
        if not content:
            new[name] = None
        elif removed or replaced or content != below.tree:
            new[name] = b"%s %s\0%s" % (TREE_MODE, name, writer.add(b"tree", content))
    return new
