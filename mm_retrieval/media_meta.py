"""What photos and videos say about themselves: when and where they were taken, with what.

Read from an image that is already open (its EXIF, parsed once: the same EXIF that orientation
is applied from) or a video container that is already open, so that extracting it costs no second
read of the file. Every field is read on its own: a hostile or malformed value (a bogus date, a
NaN coordinate, a 10 MB maker string) drops that field only, never the file.

The fields, stored flat in an item's ``metadata`` (a table's own columns win over them):

=================  ===============================================================================
``taken``          ISO 8601 local time, with its UTC offset when the file states one
                   (``2024-06-01T14:30:00+02:00``), so ``metadata["taken"] >= "2024-06"`` works
``taken_source``   ``exif`` (DateTimeOriginal), ``video`` (the container's creation_time),
                   ``file`` (the file's modification time: nothing better was in the file) or
                   ``table`` (the source table's own ``taken`` column)
``lat`` ``lon``    degrees (WGS84; south and west negative); ``alt`` metres above sea level
``make`` ``model`` the camera's; ``lens`` its lens model
``width``          pixels as displayed (after EXIF orientation); ``height`` likewise
``orientation``    the EXIF orientation tag (1-8) that was applied
``duration``       seconds (videos)
``phash``          the image's perceptual hash, computed where it is decoded
                   (:mod:`mm_retrieval.neardup`; ``mmr duplicates``)
=================  ===============================================================================
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta, timezone
from typing import Any

# Keys this module may write; what the indexer treats as "from the file" when it compares a
# source's metadata with a stored row's.
FILE_KEYS = frozenset(
    {"taken", "taken_source", "lat", "lon", "alt", "make", "model", "lens", "width", "height", "orientation", "duration",
     "phash", "ocr"}  # phash: the decoder's (mm_retrieval.neardup), ocr: the indexer's (mm_retrieval.ocr); not the file's header
)
_MAX_TEXT = 120  # longer maker strings are junk (or an attack on the JSON field)

# EXIF tags (Pillow's ExifTags.Base / .GPS numbers; listed so the reader sees which are used)
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_MAKE, _MODEL, _ORIENTATION, _DATETIME = 0x010F, 0x0110, 0x0112, 0x0132
_DATETIME_ORIGINAL, _OFFSET_TIME_ORIGINAL, _OFFSET_TIME = 0x9003, 0x9011, 0x9010
_LENS_MAKE, _LENS_MODEL = 0xA433, 0xA434
_GPS_LAT_REF, _GPS_LAT, _GPS_LON_REF, _GPS_LON, _GPS_ALT_REF, _GPS_ALT = 1, 2, 3, 4, 5, 6


def image_meta(im: Any) -> dict[str, Any]:
    """The fields of an opened PIL image (before its orientation is applied). Never raises."""
    meta: dict[str, Any] = {}
    try:
        exif = im.getexif()
    except Exception:
        exif = {}
    exif_ifd = _ifd(exif, _EXIF_IFD)
    gps = _ifd(exif, _GPS_IFD)

    def put(key: str, fn: Any) -> None:
        try:
            value = fn()
        except Exception:  # field by field: one bad value drops that field only
            return
        if value is not None:
            meta[key] = value

    put("taken", lambda: _exif_time(exif_ifd.get(_DATETIME_ORIGINAL) or exif.get(_DATETIME),
                                    exif_ifd.get(_OFFSET_TIME_ORIGINAL) or exif_ifd.get(_OFFSET_TIME)))
    if "taken" in meta:
        meta["taken_source"] = "exif"
    put("lat", lambda: _gps_coord(gps.get(_GPS_LAT), gps.get(_GPS_LAT_REF), 90.0, "S"))
    put("lon", lambda: _gps_coord(gps.get(_GPS_LON), gps.get(_GPS_LON_REF), 180.0, "W"))
    if "lat" not in meta or "lon" not in meta:  # half a position is no position
        meta.pop("lat", None), meta.pop("lon", None)
    put("alt", lambda: _gps_alt(gps.get(_GPS_ALT), gps.get(_GPS_ALT_REF)))
    put("make", lambda: _text(exif.get(_MAKE)))
    put("model", lambda: _text(exif.get(_MODEL)))
    put("lens", lambda: _text(exif_ifd.get(_LENS_MODEL)))
    put("orientation", lambda: _orientation(exif.get(_ORIENTATION)))
    put("width", lambda: int(im.size[1] if meta.get("orientation", 1) >= 5 else im.size[0]))
    put("height", lambda: int(im.size[0] if meta.get("orientation", 1) >= 5 else im.size[1]))
    return meta


def video_meta(container: Any, stream: Any, duration: float | None) -> dict[str, Any]:
    """The fields of an open PyAV container and its video stream. Never raises."""
    meta: dict[str, Any] = {}
    tags: dict[str, Any] = {}
    for source in (getattr(stream, "metadata", None), getattr(container, "metadata", None)):
        try:
            tags.update({str(k).lower(): v for k, v in dict(source or {}).items()})
        except Exception:
            pass
    try:
        taken = _iso_time(tags.get("creation_time") or tags.get("com.apple.quicktime.creationdate"))
        if taken is not None:
            meta["taken"], meta["taken_source"] = taken, "video"
    except Exception:
        pass
    try:
        where = _iso6709(tags.get("location") or tags.get("com.apple.quicktime.location.iso6709"))
        if where:
            meta.update(where)
    except Exception:
        pass
    for key, fn in (
        ("make", lambda: _text(tags.get("make") or tags.get("com.apple.quicktime.make"))),
        ("model", lambda: _text(tags.get("model") or tags.get("com.apple.quicktime.model"))),
        ("width", lambda: _positive_int(stream.codec_context.width)),
        ("height", lambda: _positive_int(stream.codec_context.height)),
        ("duration", lambda: _finite(duration, 0.0, 1e7, digits=3)),
    ):
        try:
            value = fn()
        except Exception:
            continue
        if value is not None:
            meta[key] = value
    return meta


def file_time(mtime_ns: int) -> dict[str, Any]:
    """``taken`` from a file's modification time (in this machine's time zone), for a file
    whose own metadata has no date."""
    if mtime_ns <= 0:  # unknown (the file vanished)
        return {}
    try:
        t = datetime.fromtimestamp(mtime_ns / 1e9, tz=timezone.utc).astimezone()
    except (OverflowError, OSError, ValueError):
        return {}
    return {"taken": t.replace(microsecond=0).isoformat(), "taken_source": "file"}


def merged(file_meta: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """An item's metadata: the file's fields, overridden by the source's own (a table's columns;
    a table's ``taken`` makes ``taken_source`` ``table``)."""
    if not file_meta:
        return own
    out = {**file_meta, **own}
    if "taken" in own and "taken_source" not in own:
        out["taken_source"] = "table"
    return out


def same_metadata(own: dict[str, Any], stored: dict[str, Any]) -> bool:
    """Whether a stored row's metadata is what ``own`` (a source's metadata, without the file's
    fields) and an unchanged file would give: every own field as stored, every other stored
    field one read from the file."""
    own = own or {}
    stored = stored or {}
    return all(k in stored and stored[k] == v for k, v in own.items()) and all(
        k in own or k in FILE_KEYS for k in stored
    )


# ---- field parsers: each returns a clean value or None, or raises on garbage ---------------------
def _ifd(exif: Any, tag: int) -> dict:
    try:
        ifd = exif.get_ifd(tag)
        return ifd if isinstance(ifd, dict) else {}
    except Exception:
        return {}


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = "".join(c for c in value if c.isprintable()).strip()
    return value[:_MAX_TEXT] or None


_EXIF_TIME = re.compile(r"^(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_OFFSET = re.compile(r"^([+-])(\d{2}):?(\d{2})$")


def _exif_time(value: Any, offset: Any) -> str | None:
    """EXIF ``YYYY:MM:DD HH:MM:SS`` (+ ``OffsetTime*`` ``+02:00``) -> ISO 8601."""
    text = _text(value)
    m = _EXIF_TIME.match(text or "")
    if not m:
        return None
    t = datetime(*map(int, m.groups()))
    if not 1826 <= t.year <= 2200:  # the first photograph; later is a broken clock
        return None
    off = _OFFSET.match(_text(offset) or "")
    if off:
        sign = -1 if off.group(1) == "-" else 1
        delta = timedelta(hours=int(off.group(2)), minutes=int(off.group(3)))
        if delta <= timedelta(hours=14):
            t = t.replace(tzinfo=timezone(sign * delta))
    return t.isoformat()


def _iso_time(value: Any) -> str | None:
    """A container's ``2024-06-01T12:30:00.000000Z`` (or with an offset) -> ISO 8601 seconds."""
    text = _text(value)
    if not text:
        return None
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if not 1826 <= t.year <= 2200 or t.year == 1904 and t.month == 1 and t.day == 1:  # 1904: QuickTime's "unset"
        return None
    return t.replace(microsecond=0).isoformat()


def _rational(x: Any) -> float:
    if isinstance(x, tuple) and len(x) == 2:
        return float(x[0]) / float(x[1])
    return float(x)


def _gps_coord(dms: Any, ref: Any, limit: float, negative: str) -> float | None:
    if dms is None:
        return None
    parts = [_rational(p) for p in (dms if isinstance(dms, (tuple, list)) else (dms,))][:3]
    deg = sum(p / 60**i for i, p in enumerate(parts))
    if _text(ref) == negative:
        deg = -deg
    return _finite(deg, -limit, limit, digits=7)


def _gps_alt(value: Any, ref: Any) -> float | None:
    if value is None:
        return None
    alt = _rational(value)
    if ref in (1, b"\x01", "1"):
        alt = -alt  # below sea level
    return _finite(alt, -12_000.0, 100_000.0, digits=2)


def _orientation(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else None


def _positive_int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and 0 < value < 1 << 20 else None


def _finite(x: Any, lo: float, hi: float, *, digits: int) -> float | None:
    x = float(x)
    return round(x, digits) if math.isfinite(x) and lo <= x <= hi else None


_ISO6709 = re.compile(r"^([+-]\d+(?:\.\d+)?)([+-]\d+(?:\.\d+)?)([+-]\d+(?:\.\d+)?)?")


def _iso6709(value: Any) -> dict[str, float]:
    """A container's ``+37.7749-122.4194+010.000/`` (ISO 6709 decimal degrees) -> lat/lon/alt."""
    m = _ISO6709.match(_text(value) or "")
    if not m:
        return {}
    lat, lon = _finite(m.group(1), -90, 90, digits=7), _finite(m.group(2), -180, 180, digits=7)
    if lat is None or lon is None:
        return {}
    out = {"lat": lat, "lon": lon}
    if m.group(3) is not None and (alt := _finite(m.group(3), -12_000.0, 100_000.0, digits=2)) is not None:
        out["alt"] = alt
    return out
