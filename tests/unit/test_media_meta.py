"""Photo formats (HEIC, AVIF, camera RAW) and what files say about themselves (EXIF, container
tags), read by the decode step; hostile metadata dropped field by field."""

import io
import math

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from mm_retrieval.decode import RAW_NO_PREVIEW, DecodeError, ImageFileDataset, decode_image_meta
from mm_retrieval.media_meta import FILE_KEYS, file_time, image_meta, same_metadata
from mm_retrieval.testing.photos import exif_block, make_photo, make_raw
from mm_retrieval.testing.videos import make_video
from mm_retrieval.video import container_meta

PHONE = dict(taken="2024:06:01 14:30:00", offset="+02:00", gps=(-33.8688, 151.2093, -5.0),
             make="Apple", model="iPhone 15 Pro", lens="iPhone 15 Pro back triple camera", orientation=6)


@pytest.mark.parametrize("name", ["a.jpg", "a.heic", "a.heif", "a.avif"])
def test_phone_formats_decode_with_their_metadata(tmp_path, name):
    path = make_photo(tmp_path / name, (250, 20, 20), size=(64, 48), exif=exif_block(**PHONE))
    assert path.read_bytes()[:4] != b"\xff\xd8\xff\xe0" or name == "a.jpg"  # the format's own encoder, not a JPEG
    im, meta = decode_image_meta(path.read_bytes())
    assert im.size == (48, 64)  # orientation 6 applied (by the decoder or by us)
    r, g, b = im.convert("RGB").getpixel((24, 40))
    assert r > 200 and g < 60 and b < 60
    assert meta["taken"] == "2024-06-01T14:30:00+02:00" and meta["taken_source"] == "exif"
    assert (meta["lat"], meta["lon"], meta["alt"]) == pytest.approx((-33.8688, 151.2093, -5.0), abs=1e-4)
    assert meta["make"] == "Apple" and meta["model"] == "iPhone 15 Pro" and meta["lens"].startswith("iPhone 15 Pro")
    assert (meta["width"], meta["height"]) == (48, 64)


def test_raw_is_indexed_from_its_preview_or_skipped_with_the_reason(tmp_path):
    im, meta = decode_image_meta(make_raw(tmp_path / "a.dng", preview=(96, 64), taken="2023:01:02 03:04:05").read_bytes())
    assert im.size == (96, 64)  # the embedded JPEG, not the 16x12 thumbnail of the first IFD
    assert meta["taken"] == "2023-01-02T03:04:05" and meta["make"] == "Canon"
    nef = make_raw(tmp_path / "b.nef", preview=None, make="NIKON CORPORATION")
    with pytest.raises(DecodeError) as e:
        decode_image_meta(nef.read_bytes(), raw=True)  # named .nef: a RAW, whose first IFD is no photo
    assert str(e.value) == RAW_NO_PREVIEW
    assert ImageFileDataset([str(nef)], lambda im: im.size)[0].error == RAW_NO_PREVIEW
    scan = tmp_path / "scan.tif"  # a film scanner's TIFF naming the same maker: a photo
    Image.new("RGB", (40, 30), (9, 99, 199)).save(scan, "TIFF", tiffinfo={271: "NIKON CORPORATION"})
    assert ImageFileDataset([str(scan)], lambda im: im.size)[0].pixels == (40, 30)


def test_dataset_fills_item_meta_for_decoded_and_known_files(tmp_path):
    path = make_photo(tmp_path / "a.jpg", exif=exif_block(**PHONE))
    ds = ImageFileDataset([str(path)], lambda im: im.size)
    item = ds[0]
    assert item.decoded and item.meta["model"] == "iPhone 15 Pro"
    known = ImageFileDataset([str(path)], lambda im: im.size, known_ids=frozenset({item.id}))[0]
    # header only, no decode: all but the perceptual hash, which needs the pixels (the indexer keeps the stored one)
    assert known.known and not known.decoded and known.meta == {k: v for k, v in item.meta.items() if k != "phash"}
    assert "phash" in item.meta
    off = ImageFileDataset([str(path)], lambda im: im.size, file_metadata=False)[0]
    assert off.decoded and off.meta == {}


def test_video_container_metadata(tmp_path):
    path = tmp_path / "clip.mp4"
    make_video(path, [("red", 1.0)], metadata={"creation_time": "2024-07-04T18:00:00.000000Z",
                                              "location": "+37.7749-122.4194+010.000/"})
    meta = container_meta(path)
    assert meta["taken"] == "2024-07-04T18:00:00+00:00" and meta["taken_source"] == "video"
    assert (meta["lat"], meta["lon"], meta["alt"]) == (37.7749, -122.4194, 10.0)
    assert meta["duration"] == pytest.approx(1.0, abs=0.3) and (meta["width"], meta["height"]) == (64, 64)


def test_file_time_and_same_metadata():
    t = file_time(1_717_245_000 * 10**9)
    assert t["taken"].startswith("2024-06-0") and t["taken_source"] == "file"
    assert file_time(0) == {}
    stored = {"album": "x", "taken": "2024", "lat": 1.0}
    assert same_metadata({"album": "x"}, stored)
    assert not same_metadata({"album": "y"}, stored) and not same_metadata({}, {**stored, "rating": 5})
    assert same_metadata({"taken": "1999"}, {"taken": "1999"})  # a table's column wins over the file's


_TEXT = st.one_of(st.text(max_size=300), st.binary(max_size=300), st.integers(), st.floats(allow_nan=True))
_RATIONAL = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**31), 2**31),
                      st.tuples(st.integers(-(2**31), 2**31), st.integers(0, 2**31)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    make=_TEXT, taken=_TEXT, offset=_TEXT, orientation=st.one_of(st.integers(-5, 70000), _TEXT),
    lat=st.lists(_RATIONAL, max_size=4), lon=st.lists(_RATIONAL, max_size=4), ref=_TEXT, alt=_RATIONAL,
)
def test_hostile_exif_drops_fields_not_files(make, taken, offset, orientation, lat, lon, ref, alt):
    exif = Image.Exif()
    for ifd, tag, value in [(None, 0x010F, make), (None, 0x0112, orientation), (0x8769, 0x9003, taken), (0x8769, 0x9011, offset),
                            (0x8825, 1, ref), (0x8825, 2, tuple(lat)), (0x8825, 3, ref), (0x8825, 4, tuple(lon)), (0x8825, 6, alt)]:
        where = exif if ifd is None else exif.get_ifd(ifd)
        where[tag] = value
        try:
            exif.tobytes()
        except Exception:  # a value Pillow can't write: left out, the others still go in
            del where[tag]
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (9, 9, 9)).save(buf, "JPEG", exif=exif.tobytes())
    try:
        im, meta = decode_image_meta(buf.getvalue())
    except DecodeError:
        event("unreadable")
        return  # an unreadable file is skipped with a reason; never another exception
    event(f"fields kept: {len(meta)}")
    assert set(meta) <= FILE_KEYS
    for key in ("lat", "lon", "alt"):
        if key in meta:
            assert isinstance(meta[key], float) and math.isfinite(meta[key])
    assert -90 <= meta.get("lat", 0) <= 90 and -180 <= meta.get("lon", 0) <= 180
    if "taken" in meta:
        assert meta["taken"][:4].isdigit() and 1826 <= int(meta["taken"][:4]) <= 2200
    for key in ("make", "model", "lens"):
        assert key not in meta or (isinstance(meta[key], str) and 0 < len(meta[key]) <= 120)
    assert meta.get("orientation", 1) in range(1, 9)
    assert im.size in ((8, 6), (6, 8))


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=2000))
def test_random_exif_bytes_never_crash(blob):
    buf = io.BytesIO()
    Image.new("RGB", (8, 6)).save(buf, "JPEG", exif=b"Exif\x00\x00" + blob)
    try:
        _, meta = decode_image_meta(buf.getvalue())
    except DecodeError:
        return
    assert set(meta) <= FILE_KEYS
    assert image_meta(object()) == {}  # not even an image: nothing, and no exception


class _Stream:
    """A PyAV stream's shape where tags live (the container's and the stream's ``metadata``)."""

    def __init__(self, tags, width, height):
        self.metadata = tags
        self.codec_context = type("Codec", (), {"width": width, "height": height})()


@settings(max_examples=80, deadline=None)
@given(tags=st.dictionaries(st.sampled_from(["creation_time", "location", "make", "model", "com.apple.quicktime.location.iso6709",
                                             "com.apple.quicktime.creationdate", "other"]),
                            st.one_of(st.text(max_size=60), st.from_regex(r"[+-]\d{1,3}\.\d{1,6}[+-]\d{1,3}\.\d{1,6}/", fullmatch=True),
                                      st.datetimes().map(lambda t: t.isoformat() + "Z"))),
       width=st.one_of(st.integers(-5, 1 << 22), st.none()), duration=st.one_of(st.floats(allow_nan=True), st.none()))
def test_hostile_video_tags_drop_fields_not_files(tags, width, duration):
    from mm_retrieval.media_meta import video_meta

    meta = video_meta(_Stream(tags, width, width), _Stream({}, width, width), duration)
    assert set(meta) <= FILE_KEYS
    if "lat" in meta:
        assert -90 <= meta["lat"] <= 90 and -180 <= meta["lon"] <= 180 and math.isfinite(meta["lat"])
    if "taken" in meta:
        assert meta["taken_source"] == "video" and 1826 <= int(meta["taken"][:4]) <= 2200
    assert meta.get("duration") is None or (math.isfinite(meta["duration"]) and meta["duration"] >= 0)
    assert meta.get("width") is None or 0 < meta["width"] < 1 << 20
