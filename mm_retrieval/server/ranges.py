"""HTTP range requests (RFC 9110 section 14) for the video route: parse ``Range``, answer 200, 206
or 416, and stream the bytes from an open file in chunks (never the whole file in memory).

A ``<video>`` element asks for ``bytes=0-`` first, then seeks with ``bytes=N-``; Safari probes
with ``bytes=0-1``. One range per request is served; a request for several ranges gets the whole
file (200), which RFC 9110 allows (a server may ignore ``Range``) and every player handles.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

CHUNK_BYTES = 256 * 1024  # read and sent per step: a seek's first bytes go out at once
_SPEC = re.compile(r"(\d*)-(\d*)")


class RangeNotSatisfiable(Exception):
    """The ``Range`` header is a bytes range the file cannot satisfy, or malformed (416)."""


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive, as in Content-Range

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one byte range ``header`` asks of a ``size``-byte file; None for the whole file (no
    header, another unit, or several ranges). Raises :class:`RangeNotSatisfiable` for a bytes
    range that is malformed or starts past the end (``bytes=-N`` asks for the last N bytes)."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes":
        return None  # a unit we don't know: ignored, as RFC 9110 says
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) > 1 and all(_SPEC.fullmatch(p) for p in parts):
        return None  # several ranges: the whole file
    m = _SPEC.fullmatch(parts[0])
    if m is None or len(parts) > 1 or m.group(1) == m.group(2) == "":
        raise RangeNotSatisfiable(f"malformed Range header {header[:80]!r} (expected bytes=START-END, bytes=START- or bytes=-LENGTH)")
    first, last = m.group(1), m.group(2)
    if first == "":  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(f"range {header[:80]!r}: an empty suffix of a {size}-byte file")
        return ByteRange(max(0, size - n), size - 1)
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if last != "" and int(last) < start:
        raise RangeNotSatisfiable(f"range {header[:80]!r}: the end is before the start")
    if start >= size:
        raise RangeNotSatisfiable(f"range {header[:80]!r} starts past the end of the {size}-byte file")
    return ByteRange(start, end)


class FileChunks:
    """``length`` bytes of ``fd`` from ``start``, ``chunk`` at a time (``os.pread``: no shared
    offset). Owns ``fd``: closed when the body has been sent, or by :meth:`close` (the response's
    background task), which also covers a client that went away before the first byte."""

    def __init__(self, fd: int, start: int, length: int, chunk: int = CHUNK_BYTES):
        self.fd: int | None = fd
        self.start, self.length, self.chunk = start, length, chunk

    def __iter__(self) -> Iterator[bytes]:
        try:
            pos, end = self.start, self.start + self.length
            while pos < end and self.fd is not None:
                data = os.pread(self.fd, min(self.chunk, end - pos), pos)
                if not data:  # the file shrank since it was opened: the body ends short (the client sees it)
                    return
                pos += len(data)
                yield data
        finally:
            self.close()

    def close(self) -> None:
        """Idempotent: an fd number is never closed twice (it may belong to another file by then)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)
