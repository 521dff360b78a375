"""The perceptual hash and the pair rule behind `mmr duplicates` and --collapse-duplicates."""

import random

import numpy as np
from PIL import Image

from mm_retrieval.bench.dupes import make_copy, make_shot
from mm_retrieval.decode import decode_image_meta
from mm_retrieval.neardup import (
    MAX_HASH_DISTANCE,
    PHASH_KEY,
    collapse,
    hash_distance,
    image_phash,
    same_photo,
    valid_hash,
)


def _shot(subject: int, seed: int) -> Image.Image:
    return Image.fromarray(make_shot(subject, np.random.default_rng(seed), 240, 180))


def test_copies_hash_close_and_other_shots_of_the_subject_far():
    im = _shot(1, 1)
    h = image_phash(im)
    assert valid_hash(h)
    rng = random.Random(0)
    for kind in ("jpeg", "resize", "rotate90", "colour", "crop"):
        copy, _ = make_copy(im, kind, rng)
        assert hash_distance(image_phash(copy), h) <= MAX_HASH_DISTANCE, kind
    for seed in (2, 3, 4):  # the same light and colours, objects elsewhere
        assert hash_distance(image_phash(_shot(1, seed)), h) > MAX_HASH_DISTANCE


def test_a_quarter_turn_matches_either_way():
    im = _shot(2, 5)
    for turn in (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270):
        t = image_phash(im.transpose(turn))
        assert hash_distance(t, image_phash(im)) <= 2 and hash_distance(image_phash(im), t) <= 2


def test_decode_stores_the_hash_with_the_metadata_only():
    import io

    buf = io.BytesIO()
    _shot(3, 1).save(buf, format="JPEG")
    _, meta = decode_image_meta(buf.getvalue())
    assert valid_hash(meta[PHASH_KEY])
    assert decode_image_meta(buf.getvalue(), with_meta=False)[1] == {}


def test_hashes_that_are_not_hashes():
    assert not valid_hash(None) and not valid_hash("abc") and not valid_hash("z" * 64) and not valid_hash(7)
    assert image_phash(object()) is None  # never raises


def test_the_rule_needs_both_vectors_and_hashes():
    assert same_photo(0.95, 3)
    assert not same_photo(0.95, 30)  # same subject, another picture
    assert not same_photo(0.2, 0)  # a flat picture's hash, another look


def test_collapse_keeps_the_best_of_each_group_and_items_without_hashes():
    h = "0123456789abcdef" * 4
    far = "fedcba9876543210" * 4
    v = np.array([1.0, 0.0]), np.array([0.99, 0.05]), np.array([0.0, 1.0])
    vectors = {"a": v[0], "b": v[1], "c": v[0], "d": v[2], "e": v[0]}
    hashes = {"a": h, "b": h, "c": far, "d": h}  # e: no hash
    kept = collapse(["a", "b", "c", "d", "e"], lambda x: x, vectors, hashes)
    assert kept == ["a", "c", "d", "e"]


def test_the_hash_is_imagehash_phash_bit_for_bit():
    import imagehash

    rng = np.random.default_rng(3)
    images = [_shot(s, s) for s in range(8)] + [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))]
    images.append(Image.new("L", (33, 70), 200))  # flat: the median ties
    for im in images:
        small = np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=2.0).convert("L"))
        want = "".join(str(imagehash.phash(Image.fromarray(np.ascontiguousarray(np.rot90(small, k))))) for k in range(4))
        assert image_phash(im) == want  # hashes stored before stay comparable
