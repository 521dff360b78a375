"""Reading and decoding image files safely, in DataLoader workers.

Every file is read once: its bytes give the content id (so re-indexing is idempotent and a
moved file keeps its id) and, unless the id is already indexed, are decoded and preprocessed.
Anything that goes wrong becomes a reason string on the item, never an exception that would
stop the run.

The worker processes themselves are :mod:`mm_retrieval.workers`'.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import failpoints

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}
)
# Videos (decoded by :mod:`mm_retrieval.video`, indexed as segments): what folders pick up, and
# how a table row's path is routed.
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"})
DEFAULT_MAX_PIXELS = 100_000_000  # larger images are almost always decompression bombs
DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024


class DecodeError(Exception):
    """Why a file can't be used; the message is shown to the user next to the path."""


def content_hash(data: bytes) -> str:
    """Full sha256 hex digest of the file's bytes."""
    return hashlib.sha256(data).hexdigest()


def is_video(path: str | Path) -> bool:
    """Whether ``path`` names a video file (by extension; the content is checked when decoded)."""
    return os.path.splitext(str(path))[1].lower() in VIDEO_EXTENSIONS


def item_id(digest: str) -> str:
    """The item id derived from a content hash (128 bits: collisions are not a concern)."""
    return digest[:32]


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Bytes -> PIL image (first frame, EXIF orientation applied). Raises DecodeError."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise DecodeError(
                    f"image too large: {w}x{h} = {w * h:,} pixels (limit {max_pixels:,}; "
                    "raise max_pixels in the encoder config if this is a real image)"
                )
            im.load()
            im = ImageOps.exif_transpose(im)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise DecodeError(f"image too large (decompression bomb): {e}") from None
    except Image.DecompressionBombWarning as e:
        raise DecodeError(f"image too large (decompression bomb): {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError(f"corrupt or truncated image: {e}") from None
    except Exception as e:  # PIL raises a zoo of types on hostile input
        raise DecodeError(f"cannot decode image: {type(e).__name__}: {e}") from None
    if w == 0 or h == 0:
        raise DecodeError("image has zero width or height")
    if im.mode.startswith("I") or im.mode == "F":
        im = _to_8bit(im)
    return im


def _to_8bit(im):
    """Greyscale deeper than 8 bits -> 8-bit ``L``: 16-bit PNG/TIFF open as ``I;16``, others as
    ``I`` (32-bit int) or ``F`` (float). PIL's ``convert("RGB")``, which open_clip's preprocessing
    calls, clips such values at 255 instead of scaling them, so a 16-bit image came out white."""
    import numpy as np
    from PIL import Image

    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        out = (a.astype(np.uint32) >> 8).astype(np.uint8)  # 0..65535 -> 0..255
    else:
        a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 255:  # range unknown: stretch it to 0..255
            a = (a - lo) * (255.0 / ((hi - lo) or 1.0))
        out = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return Image.fromarray(out, "L")


def read_regular_file(path: str | Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file, or DecodeError for anything else.

    A FIFO, socket or device named like an image (``pipe.png``, a ``zero.png`` symlink to
    /dev/zero) must not stall or flood the run: reading a FIFO blocks until a writer appears,
    and a device reports size 0 but never ends. The file is opened with O_NONBLOCK (so opening
    a FIFO returns at once) and checked with fstat on that same descriptor (no race between the
    check and the read). OSError (missing, dangling or looping symlink, permissions) propagates.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            mode = st.st_mode
            kind = ("FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
                    else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "directory" if stat.S_ISDIR(mode) else "special file")
            raise DecodeError(f"not a regular file ({kind}); only image files can be indexed")
        if st.st_size > max_bytes:
            raise DecodeError(f"file too large: {st.st_size:,} bytes (limit {max_bytes:,})")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)  # bounded even if the file grows while being read
    if len(data) > max_bytes:
        raise DecodeError(f"file too large: more than {max_bytes:,} bytes (limit {max_bytes:,})")
    return data


def read_or_reason(read: Callable[[], Any]) -> tuple[Any, str | None]:
    """``(read(), None)``, or ``(None, why)`` when the file can't be read (the reason shown to
    the user next to its path)."""
    try:
        return read(), None
    except DecodeError as e:
        return None, str(e)
    except OSError as e:
        return None, f"cannot read file: {e.strerror or e}"


def identify(item: Any, digest: str, known_ids: frozenset[str]) -> bool:
    """Give ``item`` (a decoded image's or video's) its content digest and id; False when that id
    is already indexed (``item.known``: hashed, not decoded)."""
    item.digest = digest
    item.id = item_id(digest)
    item.known = item.id in known_ids
    return not item.known


@dataclass
class DecodedItem:
    """One file after the worker looked at it. Exactly one of: ``pixels`` set, ``known``
    (already indexed, not decoded), or ``error``."""

    pos: int  # position in the caller's record list
    path: str
    id: str = ""
    digest: str = ""
    pixels: Any = None
    decoded: bool = False  # pixels were produced (they travel in the batch tensor)
    known: bool = False
    error: str | None = None


class ImageFileDataset:
    """A map-style dataset over file paths for ``torch.utils.data.DataLoader``.

    ``known_ids``: ids already indexed; their files are hashed but not decoded.
    """

    def __init__(
        self,
        paths: list[str],
        transform: Callable[[Any], Any],
        *,
        known_ids: frozenset[str] = frozenset(),
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ):
        self.paths = paths
        self.transform = transform
        self.known_ids = known_ids
        self.max_pixels = max_pixels
        self.max_file_bytes = max_file_bytes
        self.run_pid = os.getpid()  # the run this dataset decodes for, also inside a worker

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, pos: int) -> DecodedItem:
        path = self.paths[pos]
        item = DecodedItem(pos, path)
        data, item.error = read_or_reason(lambda: read_regular_file(path, self.max_file_bytes))
        if item.error is not None or not identify(item, content_hash(data), self.known_ids):
            return item
        failpoints.hit("decoding", pid=self.run_pid)  # tests: the run dies while this file decodes
        try:
            image = decode_image(data, max_pixels=self.max_pixels)
            item.pixels = self.transform(image)
            item.decoded = True
        except DecodeError as e:
            item.error = str(e)
        except Exception as e:  # a transform failing on odd modes must not stop the run
            item.error = f"cannot preprocess image: {type(e).__name__}: {e}"
        return item


class Transforms:
    """Several models' preprocessing of one decoded image: ``__call__`` returns a tuple, one
    tensor per transform (e.g. the first-stage encoder's and a reranker's own image side, which
    then share one decode). Picklable when each transform is: it runs in the decoding workers."""

    def __init__(self, *transforms: Callable[[Any], Any]):
        self.transforms = transforms

    def __call__(self, image: Any) -> tuple[Any, ...]:
        return tuple(t(image) for t in self.transforms)


def collate_items(items: list[DecodedItem]) -> tuple[list[DecodedItem], Any]:
    """Keep every item (for reporting) and stack the pixels of decoded ones: one tensor [n, ...],
    or with :class:`Transforms` a tuple of them (member-wise)."""
    import torch

    ok = [it.pixels for it in items if it.pixels is not None]
    if ok and isinstance(ok[0], tuple):
        pixels = tuple(torch.stack(part) for part in zip(*ok))
    else:
        pixels = torch.stack(ok) if ok else None
    for it in items:
        it.pixels = None  # the stacked tensor carries them; don't ship twice
    return items, pixels

