"""A token cache's data files: fixed-size slots, one item's array per slot, and their stamps.

Two files per generation of a cache (the map, :mod:`.slotmap`, names the live generation)::

    <stem>.g<N>.slots    header (HEADER_BYTES), then slot 0, slot 1, ... (each one array's bytes)
    <stem>.g<N>.stamps   header (HEADER_BYTES), then one u64 stamp per slot

A header is MAGIC, a u32 length and JSON {format, part, fingerprint, generation, dtype, shape,
slot_bytes}. Slots hold nothing but the arrays, so the candidates' slots are gathered from a
read-only ``numpy.memmap`` into one contiguous array in one pass.

A slot's *stamp* is a random nonzero 63-bit number, written after the array and recorded in the
map row that points at the slot. Readers read the stamps before and after copying and check them
against the map's: a slot being rewritten (reused after a delete), damaged, or from another file
is never served as an id's tokens. The one writer writes with ``pwrite`` and ``fsync``s both
files before the map commits the rows that point at them.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from .. import failpoints
from ..errors import IncompatibleError

MAGIC = b"MMRSLOT\x00"
VERSION = 1
HEADER_BYTES = 4096  # one page: slot 0 starts page-aligned
_LOOP_FROM = 64 << 10  # slots this big are copied one by one (numpy.take's overhead shows below it)


def fsync_dir(path: Path) -> None:
    """Make a file's creation, rename or removal in ``path``'s folder durable."""
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fix(path: Path) -> str:
    return f"delete the cache's files ({Path(path).name.split('.g')[0]}.*) and run `mmr cache build`"


class SlotFile:
    """One generation of a cache's data (``<base>.slots`` + ``<base>.stamps``), opened and
    checked against what its map expects.

    ``expect``: header fields the map implies (fingerprint, generation, dtype, shape); files that
    disagree belong to another cache and raise IncompatibleError. ``writable``: open them for the
    one writer as well. A missing file raises FileNotFoundError (the caller decides what it means).
    """

    def __init__(self, base: Path, expect: dict, *, writable: bool = False):
        self.base = Path(base)
        self.path, self.stamps_path = _paths(self.base)
        flags = os.O_RDWR if writable else os.O_RDONLY
        self.fd = os.open(self.path, flags)
        try:
            self.sfd = os.open(self.stamps_path, flags)
        except BaseException:
            os.close(self.fd)
            raise
        try:
            self.header = read_header(self.fd, self.path, "slots")
            stamps_header = read_header(self.sfd, self.stamps_path, "stamps")
            for key in ("fingerprint", "generation"):
                if stamps_header.get(key) != self.header.get(key):
                    raise IncompatibleError(f"{self.stamps_path} belongs to another cache than {self.path.name} ({key}); {_fix(self.path)}")
            for key, want in expect.items():
                if self.header.get(key) != want:
                    raise IncompatibleError(
                        f"token data file {self.path} has {key}={self.header.get(key)!r}, but its slot map expects {want!r}: "
                        f"the file was replaced or belongs to another cache; {_fix(self.path)}"
                    )
        except BaseException:
            self.close()
            raise
        self.dtype = np.dtype(self.header["dtype"])
        self.shape = tuple(self.header["shape"])
        self.slot_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        if self.header.get("slot_bytes") != self.slot_bytes:
            self.close()
            raise IncompatibleError(f"token data file {self.path} has a damaged header (slot_bytes); {_fix(self.path)}")
        self._mm: np.memmap | None = None
        self._stamps: np.memmap | None = None

    @classmethod
    def create(cls, base: Path, header: dict) -> SlotFile:
        """New, empty data files (replacing stray ones of those names), durable before it returns."""
        shape = [int(x) for x in header["shape"]]
        slot = int(np.prod(shape)) * np.dtype(header["dtype"]).itemsize
        for path, part in zip(_paths(Path(base)), ("slots", "stamps")):
            doc = json.dumps({"format": VERSION, "part": part, **header, "shape": shape, "slot_bytes": slot}).encode()
            head = MAGIC + struct.pack("<I", len(doc)) + doc
            if len(head) > HEADER_BYTES:
                raise ValueError(f"token file header of {len(head)} bytes exceeds {HEADER_BYTES}")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.pwrite(fd, head.ljust(HEADER_BYTES, b"\0"), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(base))
        return cls(base, {}, writable=True)

    # ---- writing (only under the map's write lock) ---------------------------------------------
    def write(self, slot: int, stamp: int, payload: bytes | memoryview) -> None:
        """Write one slot: its stamp zeroed, the array, then the stamp (a slot caught half-written
        never carries a valid stamp). Durable only after :meth:`sync`."""
        data = memoryview(payload).cast("B")
        if len(data) != self.slot_bytes:
            raise ValueError(f"a slot of {self.path.name} holds {self.slot_bytes} bytes, not {len(data)}")
        stamp_at, at, half = HEADER_BYTES + 8 * slot, HEADER_BYTES + slot * self.slot_bytes, len(data) // 2
        _pwrite_all(self.sfd, memoryview(b"\0" * 8), stamp_at)
        _pwrite_all(self.fd, data[:half], at)
        failpoints.hit("mid_slot")  # a kill here leaves half a slot that no map row points at
        _pwrite_all(self.fd, data[half:], at + half)
        _pwrite_all(self.sfd, memoryview(struct.pack("<Q", stamp)), stamp_at)

    def sync(self) -> None:
        """Make every slot written so far durable (both files)."""
        os.fsync(self.fd)
        os.fsync(self.sfd)

    # ---- reading ------------------------------------------------------------------------------
    def slots_on_disk(self) -> int:
        """How many whole slots (with their stamps) the files hold now."""
        data = (os.fstat(self.fd).st_size - HEADER_BYTES) // self.slot_bytes if self.slot_bytes else 0
        stamps = (os.fstat(self.sfd).st_size - HEADER_BYTES) // 8
        return max(0, min(data, stamps))

    def covers(self, need: int) -> bool:
        """Map the files (again, when they grew) so that slots ``< need`` can be read; False when
        the files hold fewer slots than that (truncated)."""
        if self._mm is None or self._mm.shape[0] < need:
            n = self.slots_on_disk()
            if n < need:
                return False
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=HEADER_BYTES, shape=(n, self.slot_bytes))
            self._stamps = np.memmap(self.stamps_path, dtype="<u8", mode="r", offset=HEADER_BYTES, shape=(n,))
        return True

    def gather(self, slots: np.ndarray, stamps: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Copy slots ``slots`` into ``out`` [len(slots), slot_bytes] uint8 (C-contiguous); returns a
        bool mask of the rows whose stamp was not ``stamps`` before or after the copy (those rows
        hold nothing to trust). The caller checked :meth:`covers` for ``max(slots) + 1``."""
        mm, st = self._mm, self._stamps
        assert mm is not None and st is not None
        before = st[slots]
        if self.slot_bytes >= _LOOP_FROM:
            for row, s in zip(out, slots.tolist()):
                row[...] = mm[s]
        else:
            np.take(mm, slots, axis=0, out=out, mode="clip")  # "clip": no buffered out; slots are checked
        after = st[slots]
        want = np.asarray(stamps, dtype="<u8")
        return (before != want) | (after != want)

    def __del__(self) -> None:  # a reader's replaced generation: closed when the last copy from it is done
        with contextlib.suppress(OSError):
            self.close()

    def close(self) -> None:
        self._mm = self._stamps = None
        for name in ("fd", "sfd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


def _paths(base: Path) -> tuple[Path, Path]:
    return base.with_name(base.name + ".slots"), base.with_name(base.name + ".stamps")


def data_files(base: Path) -> list[Path]:
    """The two files of generation ``base`` (``<stem>.g<N>``)."""
    return list(_paths(Path(base)))


def read_header(fd: int, path: Path, part: str) -> dict:
    """The JSON header of a data file; IncompatibleError for a file that is not one (or is cut short)."""
    head = os.pread(fd, HEADER_BYTES, 0)
    if len(head) < len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
        raise IncompatibleError(f"{path} is not an mm_retrieval token data file (it does not start with {MAGIC!r}); {_fix(path)}")
    (n,) = struct.unpack("<I", head[len(MAGIC) : len(MAGIC) + 4])
    try:
        doc = json.loads(head[len(MAGIC) + 4 : len(MAGIC) + 4 + n])
    except ValueError as e:
        raise IncompatibleError(f"token data file {path} has a damaged header ({e}); {_fix(path)}") from e
    if doc.get("format") != VERSION:
        raise IncompatibleError(f"token data file {path} is format {doc.get('format')}, this mm_retrieval reads {VERSION}: "
                                f"upgrade mm_retrieval, or {_fix(path)}")
    if doc.get("part") != part:
        raise IncompatibleError(f"{path} holds a token cache's {doc.get('part')}, not its {part}; {_fix(path)}")
    return doc


def _pwrite_all(fd: int, data: memoryview, at: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, at)
        data, at = data[n:], at + n


def new_stamp() -> int:
    """A slot stamp: random, nonzero, fits SQLite's signed 64-bit INTEGER."""
    import secrets

    return secrets.randbits(63) | 1
