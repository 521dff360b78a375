"""The web page's media: an indexed item's file, by item id -- images resized and re-encoded, a
video segment's representative frame decoded and re-encoded, a video streamed by byte ranges.

Only files the collection recorded are ever read, and only where they were recorded: the item id
is looked up in the store, and the stored path must resolve (``realpath``) to itself -- no symlink
on the way -- or lie under one of ``ServerConfig.media_roots`` (for collections indexed through
symlinked folders). A file swapped for a symlink to elsewhere after indexing is refused, the final
open does not follow symlinks, and what goes out as an image is always one Pillow (or PyAV, for a
video frame) decoded and re-encoded, never the file's raw bytes. The one route that sends a file's
bytes as they are, ``/video/{id}``, does so only for an indexed video (a segment's id or its
video's media id), under the same rules.
"""

from __future__ import annotations

import io
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image, is_raw, is_video
from .config import ServerConfig
from .documents import ITEM_ID, quote
from .errors import ApiError

if TYPE_CHECKING:
    from PIL.Image import Image

    from ..stages.base import Store

MAX_FILE_BYTES = 512 * 1024 * 1024  # an indexed image larger than this is not previewed
# What a browser is told a video file is, by extension (decode.VIDEO_EXTENSIONS: what indexing picks up).
VIDEO_TYPES = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".mkv": "video/x-matroska",
               ".webm": "video/webm", ".avi": "video/x-msvideo"}
MEDIA_FIELDS = ("media_id", "start", "end", "frame")  # a video segment's (collection schema 3)


@dataclass(frozen=True)
class MediaFile:
    """An indexed item's file, checked and ready to open."""

    id: str
    path: str  # as the store recorded it
    real: str  # its resolved real path (== path unless under a media root)
    media_id: str | None = None  # a video segment: its video's item id
    frame: float | None = None  # a video segment: its representative frame's time, s

    @property
    def is_segment(self) -> bool:
        return self.media_id is not None and self.media_id != self.id


@dataclass(frozen=True)
class Rendered:
    body: bytes
    media_type: str
    etag: str


@dataclass
class OpenVideo:
    """An indexed video opened for streaming: ``fd`` (the caller's from here on: it closes it, or
    hands it to :class:`~.ranges.FileChunks`), its size and validators."""

    fd: int
    size: int
    media_type: str
    etag: str
    mtime: float

    def close(self) -> None:
        os.close(self.fd)


class MediaFiles:
    """Looks up, checks and renders indexed items' images, and opens indexed videos (called from
    worker threads)."""

    def __init__(self, store: Store, config: ServerConfig):
        self.store = store
        self.config = config
        self.roots = tuple(os.path.realpath(os.path.expanduser(r)) for r in config.media_roots)
        self._cache: OrderedDict[tuple, Rendered] = OrderedDict()
        self._lock = threading.Lock()
        self._media: bool | None = None  # asked once (a collection's schema does not change under a server)

    def _fields(self) -> list[str]:
        fields = ["id", "path", "has_image"] if self.store.has_text_vectors() else ["id", "path"]
        return fields + list(MEDIA_FIELDS) if self._has_media() else fields

    def _has_media(self) -> bool:
        """Whether the collection's rows carry ``media_id``/``start``/``end``/``frame`` (schema 3)."""
        if self._media is None:
            self._media = self.store.has_media_fields()
        return self._media

    def has_videos(self) -> bool:
        """Whether any item is a moment of a video (images have ``end == 0``)."""
        return self._has_media() and bool(self.store.query("end > 0", ["id"], 1))

    def locate(self, item_id: str) -> MediaFile:
        """The item's file, or :class:`ApiError` (404 unknown id or no image, 403 outside the
        recorded paths). A video segment's file is its video."""
        _check_id(item_id)
        rows = self.store.get([item_id], fields=self._fields())
        if not rows:
            raise ApiError(404, f"no item {item_id} in collection {self.store.name!r}")
        return self._checked(item_id, rows[0])

    def locate_video(self, item_id: str) -> MediaFile:
        """The video of ``item_id``: a segment's id or the video's own (media) id. 404 for an
        unknown id and for an item that is not from a video; 403 as :meth:`locate`."""
        _check_id(item_id)
        fields = self._fields()
        rows = self.store.get([item_id], fields=fields)
        if not rows and "media_id" in fields:  # the video's id: any of its segments names the file
            rows = self.store.query(f"media_id == {quote(item_id)}", fields, 1)
        if not rows:
            raise ApiError(404, f"no item or video {item_id} in collection {self.store.name!r}")
        f = self._checked(item_id, rows[0])
        if not (f.is_segment or is_video(f.path)):
            raise ApiError(404, f"item {item_id} is an image, not a video: its file is served by /image/{item_id}")
        return f

    def _checked(self, item_id: str, row: dict) -> MediaFile:
        path = str(row.get("path") or "")
        if not row.get("has_image", True) or not os.path.isabs(path):
            raise ApiError(404, f"item {item_id} is text-only: it has no image file")
        real = os.path.realpath(path)
        if not self._allowed(path, real):
            raise ApiError(403, f"item {item_id}'s file {path} now resolves to another location (a symlink?); the server "
                                "serves indexed files only where they were recorded (start it with --media-root DIR to "
                                "allow files whose real path lies under DIR)")
        media_id = row.get("media_id") or None
        segment = media_id is not None and media_id != row.get("id")
        return MediaFile(id=str(row.get("id") or item_id), path=path, real=real, media_id=media_id,
                         frame=float(row.get("frame") or 0.0) if segment else None)

    def _allowed(self, path: str, real: str) -> bool:
        if real == os.path.normpath(path):
            return True
        return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in self.roots)

    def _open(self, f: MediaFile) -> tuple[int, os.stat_result]:
        """(fd, stat) of the file; the final component is opened without following symlinks, so a
        swap after :meth:`locate` can't redirect the read."""
        try:
            fd = os.open(f.real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            raise ApiError(404, f"item {f.id}'s file {f.path} cannot be opened ({e.strerror}); re-index with `mmr sync`") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ApiError(404, f"item {f.id}'s file {f.path} is no longer a regular file")
        return fd, st

    def read(self, f: MediaFile) -> tuple[bytes, os.stat_result]:
        """The file's bytes (an image's; see :meth:`_open`)."""
        fd, st = self._open(f)
        with os.fdopen(fd, "rb") as fh:
            if st.st_size > MAX_FILE_BYTES:
                raise ApiError(413, f"item {f.id}'s file is {st.st_size:,} bytes; files over {MAX_FILE_BYTES:,} are not previewed")
            return fh.read(), st

    def open_video(self, item_id: str) -> OpenVideo:
        """The indexed video of ``item_id`` (see :meth:`locate_video`), opened for streaming."""
        f = self.locate_video(item_id)
        fd, st = self._open(f)
        media_type = VIDEO_TYPES.get(os.path.splitext(f.path)[1].lower(), "application/octet-stream")
        return OpenVideo(fd=fd, size=st.st_size, media_type=media_type, etag=f'"v-{st.st_mtime_ns:x}-{st.st_size:x}"',
                         mtime=st.st_mtime)

    def render(self, item_id: str, *, thumb: bool) -> Rendered:
        """A JPEG of the item: a thumbnail (``thumb_size``, kept in the LRU) or the whole image
        (at most ``max_view_side``). A video segment's picture is its representative frame."""
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
        if f.is_segment:
            body, st = self._frame_jpeg(f, side)
        else:
            data, st = self.read(f)
            body = _jpeg(data, side, f)
        out = Rendered(body=body, media_type="image/jpeg", etag=f'"{item_id}-{side}-{st.st_mtime_ns:x}-{st.st_size:x}"')
        if thumb:
            with self._lock:
                self._cache[key] = out
                while len(self._cache) > self.config.thumb_cache:
                    self._cache.popitem(last=False)
        return out

    def _frame_jpeg(self, f: MediaFile, side: int) -> tuple[bytes, os.stat_result]:
        """A segment's representative frame (decoded from the open file at ``f.frame`` s) as JPEG."""
        fd, st = self._open(f)
        with os.fdopen(fd, "rb") as fh:
            try:
                image = frame_at(fh, f.frame or 0.0)
            except DecodeError as e:
                raise ApiError(422, f"item {f.id}'s video {f.path} has no readable frame at {f.frame:.3f} s: {e}") from None
        return _encode_jpeg(image, side), st


def frame_at(file, seconds: float) -> Image:
    """The frame shown at ``seconds`` of the video in ``file`` (an open binary file), counted from
    the stream's first timestamp as indexing counts them (:func:`mm_retrieval.video.sample_frames`):
    seek to the keyframe before it, decode forward to the last frame that starts at or before it."""
    import av

    try:
        with av.open(file, mode="r") as container:
            stream = next((s for s in container.streams if s.type == "video"), None)
            if stream is None:
                raise DecodeError("the file has no video stream")
            tb = stream.time_base
            origin = float(stream.start_time * tb) if stream.start_time is not None and tb else 0.0
            target = origin + seconds
            if seconds > 0 and tb:
                container.seek(int(target / tb), stream=stream, backward=True)
            shown = None
            for i, frame in enumerate(container.decode(stream)):
                if shown is not None and (frame.time is None or frame.time > target + 1e-3):
                    break  # the next frame: the one before is on screen at `seconds` (times are stored to the ms)
                shown = frame
                if i >= MAX_FRAMES_TO_SEEK:
                    break
            if shown is None:
                raise DecodeError("no frame could be decoded")
            return shown.to_image()
    except av.FFmpegError as e:
        raise DecodeError(f"{type(e).__name__}: {e}") from None


MAX_FRAMES_TO_SEEK = 10_000  # decoded past the keyframe at most (a pathological GOP can't pin a worker)


def _check_id(item_id: str) -> None:
    if not ITEM_ID.fullmatch(item_id):
        raise ApiError(404, f"{item_id[:80]!r} is not an item id (32 lowercase hex characters, as /search returns)")


def _jpeg(data: bytes, side: int, f: MediaFile) -> bytes:
    try:
        im = decode_image(data, max_pixels=DEFAULT_MAX_PIXELS, raw=is_raw(f.path))  # a RAW shows its preview
        return _encode_jpeg(im, side)
    except (DecodeError, OSError, ValueError) as e:
        raise ApiError(422, f"item {f.id}'s file {f.path} is no longer a readable image: {e}") from None


def _encode_jpeg(im: Image, side: int) -> bytes:
    from PIL import Image

    if im.mode in ("RGBA", "LA", "P", "PA"):
        im = im.convert("RGBA")
        flat = Image.new("RGB", im.size, (255, 255, 255))
        flat.paste(im, mask=im.getchannel("A"))
        im = flat
    im = im.convert("RGB")
    im.thumbnail((side, side), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85, optimize=True)
    return buf.getvalue()
