import io

import pytest
from PIL import Image

from mm_retrieval.decode import DecodeError, ImageFileDataset, decode_image


def _png(size=(20, 10), mode="RGB", color=(200, 10, 10)):
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 0).save(buf, format="PNG")
    return buf.getvalue()


def test_empty():
    with pytest.raises(DecodeError, match="empty file"):
        decode_image(b"")


def test_not_an_image():
    with pytest.raises(DecodeError, match="not an image"):
        decode_image(b"hello, I am text pretending to be a jpeg")


def test_truncated():
    data = _png((200, 200))
    with pytest.raises(DecodeError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_is_refused_before_decoding():
    data = _png((4000, 3000), mode="L")
    with pytest.raises(DecodeError, match="too large"):
        decode_image(data, max_pixels=1_000_000)


def test_exif_rotation_applied():
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue()).size == (20, 40)


def test_dataset_reports_reasons_and_skips_known(tmp_path):
    good = tmp_path / "a.png"
    good.write_bytes(_png())
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"garbage")
    missing = tmp_path / "gone.png"
    ds = ImageFileDataset([str(good), str(bad), str(missing)], transform=lambda im: im.size)
    a, b, c = ds[0], ds[1], ds[2]
    assert a.decoded and a.pixels == (20, 10) and len(a.id) == 32
    assert b.error and "not an image" in b.error and not b.decoded
    assert c.error and "cannot read" in c.error
    ds2 = ImageFileDataset([str(good)], transform=lambda im: 1 / 0, known_ids=frozenset({a.id}))
    assert ds2[0].known and not ds2[0].decoded and ds2[0].error is None  # known: never decoded
