"""The web page's images: an indexed item's file, by item id, resized and re-encoded.

Only files the collection recorded are ever read, and only where they were recorded: the item id
is looked up in the store, and the stored path must resolve (``realpath``) to itself -- no symlink
on the way -- or lie under one of ``ServerConfig.media_roots`` (for collections indexed through
symlinked folders). A file swapped for a symlink to elsewhere after indexing is refused, the final
open does not follow symlinks, and what goes out is always an image Pillow decoded and re-encoded,
never the file's raw bytes.
"""

from __future__ import annotations

import io
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from .config import ServerConfig
from .documents import ITEM_ID
from .errors import ApiError

if TYPE_CHECKING:
    from ..stages.base import Store

MAX_FILE_BYTES = 512 * 1024 * 1024  # an indexed file larger than this is not previewed


@dataclass(frozen=True)
class MediaFile:
    """An indexed item's file, checked and ready to open."""

    id: str
    path: str  # as the store recorded it
    real: str  # its resolved real path (== path unless under a media root)


@dataclass(frozen=True)
class Rendered:
    body: bytes
    media_type: str
    etag: str


class MediaFiles:
    """Looks up, checks and renders indexed items' images (called from worker threads)."""

    def __init__(self, store: Store, config: ServerConfig):
        self.store = store
        self.config = config
        self.roots = tuple(os.path.realpath(os.path.expanduser(r)) for r in config.media_roots)
        self._cache: OrderedDict[tuple, Rendered] = OrderedDict()
        self._lock = threading.Lock()

    def locate(self, item_id: str) -> MediaFile:
        """The item's file, or :class:`ApiError` (404 unknown id or no image, 403 outside the
        recorded paths)."""
        if not ITEM_ID.fullmatch(item_id):
            raise ApiError(404, f"{item_id[:80]!r} is not an item id (32 lowercase hex characters, as /search returns)")
        fields = ["id", "path", "has_image"] if self.store.has_text_vectors() else ["id", "path"]
        rows = self.store.get([item_id], fields=fields)
        if not rows:
            raise ApiError(404, f"no item {item_id} in collection {self.store.name!r}")
        path = str(rows[0].get("path") or "")
        if not rows[0].get("has_image", True) or not os.path.isabs(path):
            raise ApiError(404, f"item {item_id} is text-only: it has no image file")
        real = os.path.realpath(path)
        if not self._allowed(path, real):
            raise ApiError(403, f"item {item_id}'s file {path} now resolves to another location (a symlink?); the server "
                                "serves indexed files only where they were recorded (start it with --media-root DIR to "
                                "allow files whose real path lies under DIR)")
        return MediaFile(id=item_id, path=path, real=real)

    def _allowed(self, path: str, real: str) -> bool:
        if real == os.path.normpath(path):
            return True
        return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in self.roots)

    def read(self, f: MediaFile) -> tuple[bytes, os.stat_result]:
        """The file's bytes; the final component is opened without following symlinks, so a swap
        after :meth:`locate` can't redirect the read."""
        try:
            fd = os.open(f.real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            raise ApiError(404, f"item {f.id}'s file {f.path} cannot be opened ({e.strerror}); re-index with `mmr sync`") from None
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ApiError(404, f"item {f.id}'s file {f.path} is no longer a regular file")
            if st.st_size > MAX_FILE_BYTES:
                raise ApiError(413, f"item {f.id}'s file is {st.st_size:,} bytes; files over {MAX_FILE_BYTES:,} are not previewed")
            return fh.read(), st

    def render(self, item_id: str, *, thumb: bool) -> Rendered:
        """A JPEG of the item: a thumbnail (``thumb_size``, kept in the LRU) or the whole image
        (at most ``max_view_side``)."""
        f = self.locate(item_id)
        try:
            st = os.stat(f.real)
        except OSError as e:
            raise ApiError(404, f"item {f.id}'s file {f.path} is gone ({e.strerror}); re-index with `mmr sync`") from None
        side = self.config.thumb_size if thumb else self.config.max_view_side
        key = (item_id, side, st.st_mtime_ns, st.st_size)
        if thumb:
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    return hit
        data, st = self.read(f)
        out = Rendered(body=_jpeg(data, side, f), media_type="image/jpeg", etag=f'"{item_id}-{side}-{st.st_mtime_ns:x}-{st.st_size:x}"')
        if thumb:
            with self._lock:
                self._cache[key] = out
                while len(self._cache) > self.config.thumb_cache:
                    self._cache.popitem(last=False)
        return out


def _jpeg(data: bytes, side: int, f: MediaFile) -> bytes:
    from PIL import Image

    try:
        im = decode_image(data, max_pixels=DEFAULT_MAX_PIXELS)
        if im.mode in ("RGBA", "LA", "P", "PA"):
            im = im.convert("RGBA")
            flat = Image.new("RGB", im.size, (255, 255, 255))
            flat.paste(im, mask=im.getchannel("A"))
            im = flat
        im = im.convert("RGB")
        im.thumbnail((side, side), Image.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85, optimize=True)
    except (DecodeError, OSError, ValueError) as e:
        raise ApiError(422, f"item {f.id}'s file {f.path} is no longer a readable image: {e}") from None
    return buf.getvalue()
