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


def test_dataset_hashes_the_resized_model_input_and_keeps_it_bit_for_bit(tmp_path):
    import pickle

    import numpy as np
    import open_clip
    import torch

    from mm_retrieval.bench.dupes import make_shot
    from mm_retrieval.decode import Transforms, decode_image_meta
    from mm_retrieval.neardup import PHASH_KEY, hash_distance

    path = tmp_path / "photo.jpg"
    Image.fromarray(make_shot(1, np.random.default_rng(1), 640, 480)).save(path, quality=90)
    transform = open_clip.image_transform(96, is_train=False)
    ds = ImageFileDataset([str(path)], transform)
    assert ds.split is not None  # open_clip's preprocessing starts with a Resize: the dataset runs it
    assert b"open_clip" not in pickle.dumps(ds) and b"torchvision" not in pickle.dumps(ds)  # what workers unpickle
    item = ds[0]
    assert torch.equal(item.pixels, transform(decode_image(path.read_bytes())))  # the same model input
    full = decode_image_meta(path.read_bytes())[1][PHASH_KEY]  # hashed from the full-size decode
    assert hash_distance(item.meta[PHASH_KEY], full) <= 2
    both = ImageFileDataset([str(path)], Transforms(transform, open_clip.image_transform(32, is_train=False)))[0]
    assert torch.equal(both.pixels[0], item.pixels) and both.pixels[1].shape == (3, 32, 32)
    assert PHASH_KEY not in ImageFileDataset([str(path)], transform, file_metadata=False)[0].meta
    assert ImageFileDataset([str(path)], transform=lambda im: im.size).split is None  # any other transform: as before


@pytest.mark.parametrize("size", [32, 224])
def test_clip_preprocess_is_open_clips_bit_for_bit(size):
    import numpy as np
    import open_clip
    import torch

    from mm_retrieval.decode import ClipPreprocess

    transform = open_clip.image_transform(size, is_train=False)
    ours = ClipPreprocess.of(transform)
    rng = np.random.default_rng(size)
    for w, h in [(size, size), (size + 1, size), (17, 5), (481, 1001), (3 * size, 2 * size + 1)]:
        for mode in ("RGB", "L", "RGBA", "P", "CMYK"):
            im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
            assert torch.equal(ours(im), transform(im)), (w, h, mode)
    assert ClipPreprocess.of(open_clip.image_transform(size, is_train=False, resize_mode="squash")) is None  # not ours: kept
    assert ClipPreprocess.of(lambda im: im) is None


@pytest.mark.parametrize("size", [32, 224])
def test_uint8_batches_normalised_here_are_open_clips_bit_for_bit(size, tmp_path):
    """Decoding workers on a CPU send uint8 crops; the batch normalised in the indexing process
    equals open_clip's own preprocessing of each image exactly (also inside Transforms)."""
    import numpy as np
    import open_clip
    import torch

    from mm_retrieval.decode import ImageFileDataset, Transforms, collate_items

    transform = open_clip.image_transform(size, is_train=False)
    rng = np.random.default_rng(size)
    images, paths = [], []
    for i, ((w, h), mode) in enumerate(zip([(size, size), (17, 5), (481, 1001), (3 * size, 2 * size + 1), (40, 300)],
                                           ("RGB", "L", "RGBA", "P", "CMYK"))):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
        paths.append(str(tmp_path / f"{i}.{'jpg' if mode in ('RGB', 'L', 'CMYK') else 'png'}"))
        im.save(paths[-1], quality=95) if mode in ("RGB", "L", "CMYK") else im.save(paths[-1])
        images.append(Image.open(paths[-1]))
    expected = torch.stack([transform(im) for im in images])

    ds = ImageFileDataset(paths, transform, file_metadata=False, uint8=True)
    _, pixels = collate_items([ds[i] for i in range(len(ds))])
    assert pixels.dtype == torch.uint8 and pixels.shape == (len(paths), 3, size, size)  # what crosses the process boundary
    out = ds.to_float(pixels)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    floats = ImageFileDataset(paths, transform, file_metadata=False)  # without uint8: floats, passed through
    assert torch.equal(floats.to_float(collate_items([floats[i] for i in range(len(paths))])[1]), expected)

    both = ImageFileDataset(paths, Transforms(transform, lambda im: torch.tensor(im.size)), file_metadata=False, uint8=True)
    first, sizes = both.to_float(collate_items([both[i] for i in range(len(paths))])[1])
    assert torch.equal(first, expected) and sizes.dtype == torch.int64  # a non-open_clip member: untouched
