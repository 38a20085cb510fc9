"""git's object formats, as the snapshot reads and writes objects: `ObjectReader` asks one `git
cat-file --batch` for objects; `ObjectWriter` hashes and compresses new objects and writes them
into the repository, as one pack or, when they are few, as loose objects (record/commit_builder.py
says why the snapshot writes them itself).

The formats (git's Documentation/gitformat-pack.txt): a pack is "PACK", version 2 and the object
count, each object as a type-and-size header and its zlib stream, then the hash of all of it. Its
index (version 2) holds a fan-out table of the ids' first bytes, the sorted ids, the CRC-32 and
offset of each object, and the pack's hash and its own. The pack, then its index, is written
under a temporary name, flushed to disk and renamed into `objects/pack`, as git does: git reads a
pack once its index is there. A loose object is its type, size and content, compressed, at
objects/<2 hex digits>/<the rest>. The ids are SHA-1, or SHA-256 in a repository made so.
"""

import contextlib
import hashlib
import os
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from src.core.record.git import start_git

TYPES = {b"commit": 1, b"tree": 2, b"blob": 3}
STORED_BELOW = 1024  # bytes: a blob this small is stored as it is (see _compressed)

# Requests written to cat-file before its answers are read, in bytes: within the smallest pipe
# buffer Linux gives (a page), so that writing them never waits on cat-file, which waits on us.
REQUEST_BYTES = 4000
# Fewer objects than this go in as loose objects, as `git fast-import` and `git push` do: a pack
# for each small snapshot would soon make git repack the whole repository (gc.autoPackLimit).
LOOSE_BELOW = 100


class ObjectReader:
    """One `git cat-file --batch`, asked for objects a batch at a time."""

    def __init__(self, root: Path):
        self.process = start_git(["cat-file", "--batch"], cwd=root, stdin=subprocess.PIPE, text=False)
        self.id_size = 0  # bytes of a raw object id (SHA-1: 20, SHA-256: 32), known from the first answer

    def read(self, names: list[str]) -> list[bytes | None]:
        """The content of each object named (an id, or an expression such as `HEAD^{tree}`), or
        None where the repository lacks it."""
        contents = []
        for chunk in _chunks([f"{name}\n".encode() for name in names], REQUEST_BYTES):
            try:
                self.process.stdin.write(b"".join(chunk))
                self.process.stdin.flush()
            except BrokenPipeError:
                self._failed()
            for _ in chunk:
                header = self.process.stdout.readline().split()  # "<id> <type> <size>", or "<name> missing"
                if not header:
                    self._failed()
                if len(header) != 3:
                    contents.append(None)
                    continue
                self.id_size = len(header[0]) // 2
                contents.append(self.process.stdout.read(int(header[2]) + 1)[:-1])
        return contents

    def _failed(self) -> None:
        """cat-file has ended: not a repository, or a damaged one."""
        self.process.kill()
        message = self.process.stderr.read().decode(errors="replace").strip()
        raise RuntimeError(f"'git cat-file --batch' failed: {message or 'it ended unexpectedly'}")

    def close(self) -> None:
        self.process.communicate()  # closes its input: cat-file ends


def _chunks(requests: list[bytes], size: int) -> Iterator[list[bytes]]:
    """`requests` in runs of at most `size` bytes (one at least)."""
    chunk, length = [], 0
    for request in requests:
        if chunk and length + len(request) > size:
            yield chunk
            chunk, length = [], 0
        chunk.append(request)
        length += len(request)
    if chunk:
        yield chunk


class ObjectWriter:
    """The objects of a snapshot, hashed and compressed as they are added, written at the end."""

    def __init__(self, hash_name: str):
        self.hash_name = hash_name
        self.id_size = hashlib.new(hash_name).digest_size
        # raw id -> (type, content, its entry in a pack: type and size, then the zlib stream)
        self.objects: dict[bytes, tuple[bytes, bytes, bytes]] = {}

    def add(self, kind: bytes, content: bytes) -> bytes:
        """The raw id of an object of `kind` holding `content`, to be written with the others."""
        digest = hashlib.new(self.hash_name, b"%s %d\0" % (kind, len(content)), usedforsecurity=False)
        digest.update(content)
        raw = digest.digest()
        if raw not in self.objects:
            entry = b"".join([_entry_header(TYPES[kind], len(content)), *_compressed(TYPES[kind], content)])
            self.objects[raw] = (kind, content, entry)
        return raw

    def discard(self, ids: set[bytes]) -> None:
        """Not to write the objects of these raw ids after all."""
        for raw in ids:
            del self.objects[raw]

    def write(self, objects_directory: Path) -> None:
        """The objects into `objects_directory`: a few as loose objects, more as one pack. Files and
        directories get the permissions git gives them there: a directory those of `objects/` itself
        (which git sets for core.sharedRepository), a file the same, read-only."""
        mode = objects_directory.stat().st_mode & 0o7777
        if len(self.objects) < LOOSE_BELOW:
            for raw, (kind, content, _) in self.objects.items():
                _write_loose(objects_directory, raw.hex(), b"%s %d\0%s" % (kind, len(content), content), mode)
        else:
            self._write_pack(objects_directory / "pack", mode)

    def _write_pack(self, directory: Path, mode: int) -> None:
        """The pack, then its index (which makes git see the pack), each whole or not at all."""
        entries = {raw: entry for raw, (_, _, entry) in self.objects.items()}
        pack = b"".join([b"PACK" + struct.pack(">II", 2, len(entries)), *entries.values()])
        pack += hashlib.new(self.hash_name, pack, usedforsecurity=False).digest()
        offsets, position = {}, 12  # past the header
        for raw, entry in entries.items():
            offsets[raw], position = position, position + len(entry)
        trailer = pack[-self.id_size :]
        index = _pack_index(sorted(entries), offsets, entries, trailer, self.hash_name)
        name = directory / f"pack-{trailer.hex()}"
        if name.with_suffix(".idx").exists():  # the same objects, written before
            return
        _make_directory(directory, mode)
        there_before = name.with_suffix(".pack").exists()  # and its index lost since
        _write_durably(directory, name.with_suffix(".pack"), pack, mode & 0o444)
        written = name.with_suffix(".pack").stat().st_ino
        try:
            _write_durably(directory, name.with_suffix(".idx"), index, mode & 0o444)
        except BaseException:
            # A pack without its index would be left for good (unless another snapshot wrote it meanwhile).
            with contextlib.suppress(OSError):
                if not there_before and name.with_suffix(".pack").stat().st_ino == written:
                    name.with_suffix(".pack").unlink()
            raise


def _make_directory(directory: Path, mode: int) -> None:
    """`directory`, with `mode` (whatever the umask), unless it is there."""
    try:
        directory.mkdir()
    except FileExistsError:
        return
    os.chmod(directory, mode)


def _write_loose(objects_directory: Path, object_id: str, data: bytes, mode: int) -> None:
    """A loose object (`data`, compressed) at objects/<2 digits>/<the rest>, unless git has it."""
    directory = objects_directory / object_id[:2]
    path = directory / object_id[2:]
    if path.exists():
        return
    for attempt in (1, 2):  # a `git prune` meanwhile removes the directory once it is empty
        _make_directory(directory, mode)
        try:
            handle, temporary = tempfile.mkstemp(prefix="tmp_obj_", dir=directory)
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(zlib.compress(data, 1))
        os.chmod(temporary, mode & 0o444)
        try:
            os.link(temporary, path)  # as git does: an object written meanwhile is kept as it is
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links
            os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)  # a `git prune` may have removed it


def _compressed(kind: int, content: bytes) -> list[bytes]:
    """An object's zlib stream (git reads any), in pieces. Trees, and blobs under a kilobyte, are
    stored as they are: half of a tree is object ids, which do not compress (zlib's fastest level
    took 25 times as long for a third less), and setting up zlib for each small file took longer
    than storing it. Anything else at zlib's fastest level, with memory for its size."""
    if kind == TYPES[b"tree"] or len(content) < STORED_BELOW:
        return _stored(content)
    memory_level = min(8, len(content).bit_length() - 6)  # a buffer of 2**(6 + level) symbols
    compressor = zlib.compressobj(level=1, memLevel=memory_level)
    return [compressor.compress(content), compressor.flush()]


def _stored(content: bytes) -> list[bytes]:
    """A zlib stream (RFC 1950) of `content` in stored deflate blocks of up to 65,535 bytes (RFC 1951)."""
    blocks = [content[start : start + 65535] for start in range(0, len(content), 65535)] or [b""]
    if len(blocks) == 1:
        blocks = [content]  # not copied
    stream = [b"\x78\x01"]  # deflate with a 32 KiB window, no dictionary (a multiple of 31, as required)
    for number, block in enumerate(blocks, start=1):  # a block: "last?", its length and that length's complement
        stream += [struct.pack("<BHH", number == len(blocks), len(block), len(block) ^ 0xFFFF), block]
    return [*stream, struct.pack(">I", zlib.adler32(content))]


def _entry_header(kind: int, size: int) -> bytes:
    """A pack entry's type and size: 4 bits of the size in the first byte, 7 in each next."""
    header = bytearray([kind << 4 | size & 15])
    size >>= 4
    while size:
        header[-1] |= 0x80
        header.append(size & 0x7F)
        size >>= 7
    return bytes(header)


def _pack_index(ids: list[bytes], offsets: dict, entries: dict, trailer: bytes, hash_name: str) -> bytes:
    """A pack's index, version 2, of the sorted raw `ids` (their `offsets` and `entries` in the pack)."""
    fan_out = [0] * 256
    for raw in ids:
        fan_out[raw[0]] += 1
    for byte in range(1, 256):
        fan_out[byte] += fan_out[byte - 1]
    large = [offsets[raw] for raw in ids if offsets[raw] >= 2**31]  # an 8-byte table past 2 GiB
    small = [offsets[raw] if offsets[raw] < 2**31 else 2**31 | large.index(offsets[raw]) for raw in ids]
    index = b"".join(
        [
            b"\377tOc" + struct.pack(">I", 2),
            struct.pack(">256I", *fan_out),
            *ids,
            struct.pack(f">{len(ids)}I", *(zlib.crc32(entries[raw]) for raw in ids)),
            struct.pack(f">{len(ids)}I", *small),
            struct.pack(f">{len(large)}Q", *large),
            trailer,
        ]
    )
    return index + hashlib.new(hash_name, index, usedforsecurity=False).digest()


def _write_durably(directory: Path, path: Path, data: bytes, mode: int) -> None:
    """`data` as `path` (its permissions `mode`), whole or not at all: written to a temporary file,
    flushed to disk, renamed. (Not rundir.write_bytes_atomic: a temporary file a killed process
    leaves in objects/ must be called as git's are, `tmp_*`, for `git gc` to remove it.)"""
    handle, temporary = tempfile.mkstemp(prefix="tmp_snapshot_", dir=directory)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
