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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import failpoints
from .media_meta import image_meta
from .neardup import PHASH_KEY, image_phash

# Phones' HEIC/HEIF (pillow-heif) and AVIF (Pillow >= 11.3, else pillow-heif) decode like JPEGs.
PHONE_EXTENSIONS = frozenset({".heic", ".heif", ".hif", ".avif"})
# Camera RAW: indexed from the JPEG preview the camera embeds (:func:`raw_preview`), or skipped
# with that reason when a file has none.
RAW_EXTENSIONS = frozenset({".dng", ".cr2", ".nef", ".arw"})
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}
) | PHONE_EXTENSIONS | RAW_EXTENSIONS
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


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, raw: bool = False):
    """Bytes -> PIL image (first frame, EXIF orientation applied; ``raw``: see
    :func:`decode_image_meta`). Raises DecodeError."""
    return decode_image_meta(data, max_pixels=max_pixels, with_meta=False, raw=raw)[0]


def is_raw(path: str | Path) -> bool:
    """Whether ``path`` is named like a camera RAW (:data:`RAW_EXTENSIONS`)."""
    return os.path.splitext(str(path))[1].lower() in RAW_EXTENSIONS


def decode_image_meta(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, with_meta: bool = True, raw: bool = False,
                      phash: bool = True):
    """Bytes -> ``(PIL image, metadata)``: :func:`decode_image`'s image, and with ``with_meta``
    what the file says about itself (:func:`mm_retrieval.media_meta.image_meta`, read from the
    EXIF that orientation is applied from: no second parse) and, with ``phash`` too, its
    perceptual hash (from the full image; :class:`ImageFileDataset` hashes a smaller one itself).
    ``raw``: the file is named like a camera RAW (:data:`RAW_EXTENSIONS`), so a TIFF structure is
    its container, whose preview is decoded (a DNG or CR2 says so itself). Raises DecodeError."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise DecodeError("empty file (0 bytes)")
    register_formats()
    meta: dict[str, Any] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.format == "TIFF" and (raw or _says_raw(im, data)):  # its first IFD: a thumbnail, or sensor data
                if with_meta:  # the camera's EXIF; the preview's own size and orientation are what is shown
                    meta = {k: v for k, v in image_meta(im).items() if k not in ("width", "height", "orientation")}
                im = raw_preview(data, max_pixels)
            w, h = im.size
            if w * h > max_pixels:
                raise DecodeError(
                    f"image too large: {w}x{h} = {w * h:,} pixels (limit {max_pixels:,}; "
                    "raise max_pixels in the encoder config if this is a real image)"
                )
            im.load()
            if with_meta:
                meta = {**image_meta(im), **meta}  # a RAW's own EXIF wins over its preview's
            im = ImageOps.exif_transpose(im)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        if _iso_brand(data) in _HEIF_BRANDS and not _formats["heif"]:
            raise DecodeError("HEIC/HEIF image, and pillow-heif is not installed: pip install pillow-heif") from None
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
    if with_meta and phash:
        _put_phash(meta, im)
    return im, meta


def _put_phash(meta: dict[str, Any], im: Any) -> None:
    if (h := image_phash(im)) is not None:  # near-duplicates: mmr duplicates
        meta[PHASH_KEY] = h


def file_meta(data: bytes) -> dict[str, Any]:
    """The metadata of an image file's bytes without decoding its pixels (an item already
    indexed, whose row is rewritten); {} when it can't be read."""
    from PIL import Image

    register_formats()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return image_meta(Image.open(io.BytesIO(data)))
    except Exception:
        return {}


_formats = {"heif": False, "done": False}
_HEIF_BRANDS = frozenset({"heic", "heix", "heim", "heis", "hevc", "hevx", "mif1", "msf1", "avif", "avis"})


def register_formats() -> None:
    """Teach Pillow the phone formats once per process: HEIC/HEIF through pillow-heif's opener,
    and AVIF through it too where this Pillow has no AVIF decoder of its own (Pillow >= 11.3
    has one). Without pillow-heif, HEIC files are skipped with a reason naming it."""
    if _formats["done"]:
        return
    _formats["done"] = True
    try:
        import pillow_heif
    except ImportError:
        return
    from PIL import features

    pillow_heif.register_heif_opener()
    _formats["heif"] = True
    if not features.check("avif") and hasattr(pillow_heif, "register_avif_opener"):
        pillow_heif.register_avif_opener()


def _iso_brand(data: bytes) -> str:
    """The major brand of an ISO base media file (``heic``, ``avif``, ``mif1``), else ''."""
    return data[8:12].decode("latin-1") if data[4:8] == b"ftyp" else ""


RAW_NO_PREVIEW = (
    "camera RAW file without a usable embedded JPEG preview: not indexed (export it as JPEG/HEIC/TIFF "
    "to index it)"
)
_RAW_MAX_CANDIDATES = 32


_DNG_VERSION = 50706


def _says_raw(im, data: bytes) -> bool:
    """Whether an opened TIFF declares itself a camera RAW whatever its name: a DNGVersion tag,
    or CR2's ``CR`` signature. (NEF and ARW don't: their extension tells, see ``raw``; a plain
    TIFF, a film scanner's included, is decoded as the TIFF it is.)"""
    return _DNG_VERSION in getattr(im, "tag_v2", {}) or data[8:10] == b"CR"


def raw_preview(data: bytes, max_pixels: int):
    """The largest JPEG a camera RAW embeds (its full-size or screen preview), opened (not yet
    loaded). RAWs are TIFF containers, the sensor data is in a form Pillow can't decode, and
    every camera stores a JPEG preview beside it: each JPEG start marker is tried (bounded), the
    one with the most pixels wins. DecodeError when there is none."""
    from PIL import Image

    best, best_px, start, tried = None, 0, 0, 0
    while tried < _RAW_MAX_CANDIDATES:
        at = data.find(b"\xff\xd8\xff", start)
        if at < 0:
            break
        start, tried = at + 3, tried + 1
        try:
            im = Image.open(io.BytesIO(data[at:]), formats=["JPEG"])
            w, h = im.size
            if im.mode not in ("RGB", "L", "CMYK") or not 0 < w * h <= max_pixels:
                continue
            im.load()  # lossless-JPEG sensor data opens but does not decode: skipped here
        except Exception:
            continue
        if w * h > best_px:
            best, best_px = im, w * h
    if best is None:
        raise DecodeError(RAW_NO_PREVIEW)
    return best


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
    meta: dict[str, Any] = field(default_factory=dict)  # what the file says about itself (media_meta)


class ImageFileDataset:
    """A map-style dataset over file paths for ``torch.utils.data.DataLoader``.

    ``known_ids``: ids already indexed; their files are hashed but not decoded.
    ``file_metadata``: read each file's own metadata into ``item.meta`` (from the header the
    decode parses anyway; for a known file from its header alone).
    ``uint8``: open_clip's preprocessing stops at the uint8 crop (a quarter of the float's bytes
    to send from a worker); the batch's consumer finishes it with :meth:`to_float`.
    """

    def __init__(
        self,
        paths: list[str],
        transform: Callable[[Any], Any],
        *,
        known_ids: frozenset[str] = frozenset(),
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        file_metadata: bool = True,
        uint8: bool = False,
    ):
        self.paths = paths
        self.file_metadata = file_metadata
        self.transform = portable_transform(transform)  # what the workers unpickle: no open_clip class
        if uint8:
            self.transform = uint8_transform(self.transform)
        self.known_ids = known_ids
        self.max_pixels = max_pixels
        self.max_file_bytes = max_file_bytes
        self.run_pid = os.getpid()  # the run this dataset decodes for, also inside a worker
        self.split = split_resize(self.transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, pos: int) -> DecodedItem:
        path = self.paths[pos]
        item = DecodedItem(pos, path)
        data, item.error = read_or_reason(lambda: read_regular_file(path, self.max_file_bytes))
        if item.error is not None:
            return item
        if not identify(item, content_hash(data), self.known_ids):
            if self.file_metadata:  # its row may be rewritten (moved, touched): with the file's fields
                item.meta = file_meta(data)
            return item
        failpoints.hit("decoding", pid=self.run_pid)  # tests: the run dies while this file decodes
        if os.getpid() != self.run_pid != os.getppid():  # a worker forked from the fork server
            failpoints.hit("fork_server", pid=os.getppid())  # tests: that server dies mid-run
        try:
            image, item.meta = decode_image_meta(data, max_pixels=self.max_pixels, with_meta=self.file_metadata,
                                                 raw=is_raw(path), phash=False)
            item.pixels = self._preprocess(image, item.meta)
            item.decoded = True
        except DecodeError as e:
            item.error = str(e)
        except Exception as e:  # a transform failing on odd modes must not stop the run
            item.error = f"cannot preprocess image: {type(e).__name__}: {e}"
        return item

    def to_float(self, pixels: Any) -> Any:
        """A collated batch as the transform given to the constructor makes it: with ``uint8``, each
        uint8 crop batch normalised (bit for bit what the worker would have sent); else as is."""
        return batch_to_float(self.transform, pixels)

    def _preprocess(self, image: Any, meta: dict[str, Any]) -> Any:
        """The transform's output; with file metadata, the image's hash into ``meta``, taken from
        the transform's own resized image where that is large enough (the same model input bit
        for bit: the resize runs here instead of inside the transform)."""
        if self.split is None:
            if self.file_metadata:
                _put_phash(meta, image)
            return self.transform(image)
        resize, rest = self.split
        small = resize(image)
        if self.file_metadata:
            _put_phash(meta, small if min(small.size) >= HASH_SOURCE_MIN_SIDE else image)
        return rest(small, image)


# The smallest image the near-duplicate hash is taken from: its 32x32 thumbnail is then made as
# from the full image (a box reduction to >= 64 px, then Lanczos: neardup.image_phash).
HASH_SOURCE_MIN_SIDE = 64


class ClipPreprocess:
    """open_clip's inference preprocessing (torchvision ``Resize`` of the shorter side,
    ``CenterCrop``, RGB, ``ToTensor``, ``Normalize``) done with PIL and torch alone, bit for bit
    (the same PIL resize and crop calls, the same tensor ops). Decoding workers then unpickle no
    torchvision or open_clip class, so their fork server need not import them (~2.6 of its ~4.2
    CPU seconds at start, issue 30); and the resize is a step of its own, so the near-duplicate
    hash is taken from the resized image instead of the full-size decode (issue 26 item 5).
    Build it with :meth:`of`."""

    def __init__(self, size: int, crop: tuple[int, int], resample: int, mean: tuple[float, ...], std: tuple[float, ...],
                 uint8: bool = False):
        self.size, self.crop, self.resample = size, crop, resample
        self.mean, self.std = tuple(mean), tuple(std)
        self.uint8 = uint8  # stop at the uint8 crop [3, H, W]; :meth:`normalize` does the rest

    def as_uint8(self) -> ClipPreprocess:
        """The same preprocessing, stopping at the uint8 crop (see :meth:`normalize`)."""
        return ClipPreprocess(self.size, self.crop, self.resample, self.mean, self.std, uint8=True)

    @classmethod
    def of(cls, transform: Any) -> ClipPreprocess | None:
        """The equivalent of ``transform`` when it is that pipeline exactly (what
        ``open_clip.image_transform(..., is_train=False)`` builds), else None."""
        try:
            from torchvision.transforms import (
                CenterCrop,
                Compose,
                Normalize,
                Resize,
                ToTensor,
            )
            from torchvision.transforms.functional import pil_modes_mapping
        except ImportError:
            return None
        steps = transform.transforms if isinstance(transform, Compose) else ()
        if len(steps) != 5:
            return None
        resize, crop, rgb, to_tensor, norm = steps
        size = resize.size if type(resize) is Resize else None
        size = size[0] if isinstance(size, (list, tuple)) and len(size) == 1 else size
        if not isinstance(size, int) or resize.max_size is not None or resize.interpolation not in pil_modes_mapping:
            return None
        if type(crop) is not CenterCrop or len(crop.size) != 2 or max(crop.size) > size:  # larger: torchvision pads
            return None
        if not (type(rgb).__name__ == "MaybeConvertMode" and getattr(rgb, "mode", None) == "RGB"
                or getattr(rgb, "__name__", None) == "_convert_to_rgb"):  # open_clip's, old and new
            return None
        if not (type(to_tensor) is ToTensor or type(to_tensor).__name__ == "MaybeToTensor" and isinstance(to_tensor, ToTensor)):
            return None
        if type(norm) is not Normalize or norm.inplace:
            return None
        import torch

        if torch.get_default_dtype() != torch.float32:
            return None
        mean, std = (tuple(float(x) for x in torch.as_tensor(v).flatten().tolist()) for v in (norm.mean, norm.std))
        if len(mean) != 3 or len(std) != 3 or 0.0 in std:
            return None
        return cls(size, (int(crop.size[0]), int(crop.size[1])), pil_modes_mapping[resize.interpolation], mean, std)

    def resize(self, im: Any) -> Any:
        """torchvision's ``Resize(size)`` of a PIL image: the shorter side to ``size``."""
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.size, int(self.size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        return im if (new_w, new_h) == (w, h) else im.resize((new_w, new_h), self.resample)

    def finish(self, im: Any) -> Any:
        """The steps after the resize: centre crop, RGB, float tensor [3, H, W], normalised (with
        ``uint8``: the uint8 tensor before ToTensor's scaling)."""
        import numpy as np
        import torch

        w, h = im.size
        ch, cw = self.crop
        top, left = round((h - ch) / 2.0), round((w - cw) / 2.0)  # torchvision's center_crop
        im = im.crop((left, top, left + cw, top + ch)).convert("RGB")
        t = torch.from_numpy(np.array(im, np.uint8, copy=True)).view(ch, cw, 3).permute((2, 0, 1)).contiguous()
        return t if self.uint8 else self.normalize(t)

    def normalize(self, t: Any) -> Any:
        """ToTensor's /255 and Normalize on uint8 [3, H, W] or a batch [n, 3, H, W]: the same
        elementwise float32 ops in the same order, so a batch equals the per-image results exactly."""
        import torch

        t = t.to(dtype=torch.float32).div(255)
        mean = torch.as_tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return t.sub_(mean).div_(std)

    def __call__(self, im: Any) -> Any:
        return self.finish(self.resize(im))


def portable_transform(transform: Any) -> Any:
    """``transform`` as the decoding workers run it: open_clip's preprocessing as
    :class:`ClipPreprocess` (so is each member of a :class:`Transforms`), anything else as is."""
    if isinstance(transform, Transforms):
        return Transforms(*(portable_transform(t) for t in transform.transforms))
    return ClipPreprocess.of(transform) or transform


def uint8_transform(transform: Any) -> Any:
    """``transform`` with each :class:`ClipPreprocess` (also inside :class:`Transforms`) stopping
    at its uint8 crop; :func:`batch_to_float` finishes a collated batch of its output."""
    if isinstance(transform, Transforms):
        return Transforms(*(uint8_transform(t) for t in transform.transforms))
    return transform.as_uint8() if isinstance(transform, ClipPreprocess) else transform


def batch_to_float(transform: Any, pixels: Any) -> Any:
    """A collated batch of ``transform``'s output with each uint8 crop batch normalised
    (member-wise for :class:`Transforms`); other outputs, and None, as they are."""
    if pixels is None:
        return None
    if isinstance(transform, Transforms):
        return tuple(batch_to_float(t, p) for t, p in zip(transform.transforms, pixels))
    return transform.normalize(pixels) if isinstance(transform, ClipPreprocess) and transform.uint8 else pixels


def split_resize(transform: Any) -> tuple[Any, _AfterResize] | None:
    """``(resize, rest)`` when ``transform`` (or, for :class:`Transforms`, its first member) starts
    by resizing a PIL image (:class:`ClipPreprocess`, or a torchvision ``Compose`` whose first step
    is a ``Resize``), so that ``rest(resize(image), image)`` equals ``transform(image)``; else None.
    The decoding step keeps the resized image to hash it: reducing a 3 MP photo to the hash's
    thumbnail cost ~12 ms, more than the whole metadata read (issue 26 item 5)."""
    first = transform.transforms[0] if isinstance(transform, Transforms) else transform
    others = transform.transforms[1:] if isinstance(transform, Transforms) else None
    if isinstance(first, ClipPreprocess):
        return first.resize, _AfterResize(first.finish, others)
    try:
        from torchvision.transforms import Compose, Resize
    except ImportError:
        return None
    if not isinstance(first, Compose) or not first.transforms or type(first.transforms[0]) is not Resize:
        return None
    return first.transforms[0], _AfterResize(Compose(first.transforms[1:]), others)


class _AfterResize:
    """The rest of a split transform (:func:`split_resize`): its own steps on the resized image,
    and a :class:`Transforms`' other members on the full one."""

    def __init__(self, rest: Any, others: tuple[Any, ...] | None):
        self.rest, self.others = rest, others

    def __call__(self, small: Any, image: Any) -> Any:
        out = self.rest(small)
        return out if self.others is None else (out, *(t(image) for t in self.others))


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

