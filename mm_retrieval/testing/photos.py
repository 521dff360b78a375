"""Small real photo files for tests and examples, as cameras and phones write them: EXIF (date
taken, GPS, camera) in JPEG, HEIC (pillow-heif) and AVIF (Pillow) files, and camera-RAW-like
TIFF containers with an embedded JPEG preview. Written by the formats' own libraries, not
renamed JPEGs."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any


def exif_block(*, taken: str | None = None, offset: str | None = None, gps: tuple[float, float, float] | None = None,
               make: str | None = None, model: str | None = None, lens: str | None = None,
               orientation: int | None = None) -> Any:
    """A PIL ``Image.Exif`` as a phone writes it: ``taken`` ``"2024:06:01 14:30:00"`` (EXIF's
    format) with ``offset`` ``"+02:00"``, ``gps`` (lat, lon, alt) in degrees/metres."""
    from PIL import Image

    exif = Image.Exif()
    if make is not None:
        exif[0x010F] = make
    if model is not None:
        exif[0x0110] = model
    if orientation is not None:
        exif[0x0112] = orientation
    sub = exif.get_ifd(0x8769)
    if taken is not None:
        sub[0x9003] = taken
    if offset is not None:
        sub[0x9011] = offset
    if lens is not None:
        sub[0xA434] = lens
    if gps is not None:
        lat, lon, alt = gps
        g = exif.get_ifd(0x8825)
        g[1], g[2] = ("N" if lat >= 0 else "S"), _dms(abs(lat))
        g[3], g[4] = ("E" if lon >= 0 else "W"), _dms(abs(lon))
        g[5], g[6] = (0 if alt >= 0 else 1), abs(alt)
    return exif


def _dms(deg: float) -> tuple[float, float, float]:
    d = int(deg)
    m = int((deg - d) * 60)
    return float(d), float(m), round((deg - d - m / 60) * 3600, 4)


def make_photo(path: str | Path, color: tuple[int, int, int] = (200, 120, 40), *, size: tuple[int, int] = (64, 48),
               exif: Any = None, seed: int = 0) -> Path:
    """Write a small photo to ``path`` (the format follows the suffix: .jpg, .heic/.heif through
    pillow-heif, .avif, .png...) carrying ``exif`` (see :func:`exif_block`); a few seeded pixels
    make every file's bytes distinct. Creates the folder; returns ``path``."""
    from PIL import Image

    from ..decode import register_formats

    register_formats()
    path = Path(path)
    im = Image.new("RGB", size, color)
    px = im.load()
    for k in range(6):
        px[(seed * 7 + k * 5) % size[0], (seed * 3 + k) % size[1]] = ((seed * 40 + k) % 256, (k * 60) % 256, 255 - k)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"exif": exif.tobytes()} if exif is not None else {}
    if path.suffix.lower() in (".heic", ".heif"):
        im.save(path, "HEIF", quality=90, **kwargs)
    else:
        im.save(path, **kwargs)
    return path


def make_raw(path: str | Path, *, preview: tuple[int, int] | None = (96, 64), color: tuple[int, int, int] = (40, 90, 200),
             make: str = "Canon", taken: str | None = None) -> Path:
    """Write a camera-RAW-like file: a TIFF (Pillow's writer) whose first image is a small
    thumbnail and whose tags name a camera (``Make``, ``DNGVersion``, ``DateTimeOriginal`` in
    EXIF), followed by the camera's full JPEG ``preview`` as RAW files embed it (None: no
    preview, as in a RAW that holds sensor data only). Returns ``path``."""
    from PIL import Image, TiffImagePlugin, TiffTags

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[271] = make
    info[50706] = b"\x01\x04\x00\x00"  # DNGVersion 1.4.0.0
    info.tagtype[50706] = TiffTags.BYTE
    if taken is not None:
        info[0x8769] = {0x9003: taken}  # the EXIF sub-IFD: DateTimeOriginal
    out = io.BytesIO()
    Image.new("RGB", (16, 12), color).save(out, "TIFF", tiffinfo=info)
    data = out.getvalue()
    if preview is not None:
        jpeg = io.BytesIO()
        Image.new("RGB", preview, color).save(jpeg, "JPEG", quality=90)
        data += jpeg.getvalue()
    else:
        data += bytes(range(256)) * 64  # "sensor data" that is no image
    path.write_bytes(data)
    return path
