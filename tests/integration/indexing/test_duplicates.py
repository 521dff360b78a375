"""`mmr duplicates`: copies of one photo grouped (vectors and perceptual hashes from a real index in
Milvus Lite), the one to keep named, nothing deleted; --collapse-duplicates in search; a collection
indexed without hashes told how to add them, and the backfill that does."""

import json
import os
import random

import numpy as np
import pytest
from PIL import Image

from mm_retrieval import Pipeline
from mm_retrieval.bench.dupes import make_copy, make_shot
from mm_retrieval.cli import main
from mm_retrieval.demo import SHIPPED
from mm_retrieval.neardup import PHASH_KEY, valid_hash

ENCODER = {"model": str(SHIPPED / "encoder"), "workers": 0, "batch_size": 8}  # trained: its vectors mean something


@pytest.fixture
def library(tmp_path):
    """Two shots of one subject and one of another, each saved once at full size; the first
    shot also re-saved smaller, turned a quarter and recompressed hard."""
    root = tmp_path / "photos"
    root.mkdir()
    rng = random.Random(0)
    shots = {"beach": (1, 1), "beach_other": (1, 2), "street": (2, 3)}
    for name, (subject, seed) in shots.items():
        Image.fromarray(make_shot(subject, np.random.default_rng(seed), 320, 240)).save(root / f"{name}.jpg", quality=92)
    im = Image.open(root / "beach.jpg")
    im.resize((160, 120), Image.Resampling.LANCZOS).save(root / "beach_small.jpg", quality=85)
    im.transpose(Image.Transpose.ROTATE_90).save(root / "beach_turned.jpg", quality=90)
    copy, _ = make_copy(im, "jpeg", rng)
    copy.save(root / "beach_q30.jpg", quality=30)
    return root


def _index(tmp_path, library):
    db = str(tmp_path / "mmr.db")
    with Pipeline(db=db, encoder=ENCODER) as pipe:
        pipe.index(library, progress=False)
    return db


def _duplicates(capsys, db, *args):
    code = main(["duplicates", "--db", db, "--json", "--no-progress", *args])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else None), out.err


def test_copies_are_grouped_the_largest_kept_and_nothing_deleted(tmp_path, library, capsys):
    db = _index(tmp_path, library)
    before = sorted(os.listdir(library))
    code, doc, _ = _duplicates(capsys, db)
    assert code == 0
    assert doc["images"] == 6 and doc["unhashed"] == 0
    groups = [sorted(os.path.basename(i["path"]) for i in g["items"]) for g in doc["groups"]]
    assert groups == [["beach.jpg", "beach_q30.jpg", "beach_small.jpg", "beach_turned.jpg"]]
    g = doc["groups"][0]
    keep = next(i for i in g["items"] if i["id"] == g["keep"])
    # beach.jpg and its turned copy have the same pixels: the oldest file of the two is kept
    assert os.path.basename(keep["path"]) in ("beach.jpg", "beach_turned.jpg") and (keep["width"], keep["height"]) in ((320, 240), (240, 320))
    assert sorted(os.listdir(library)) == before
    with Pipeline(db=db, encoder=ENCODER) as pipe:
        assert pipe.store.count() == 6

    assert main(["duplicates", "--db", db, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "1 groups of near-duplicates among 6 images (3 copies); nothing was deleted" in text
    assert "keep" in text


def test_search_collapses_a_group_to_its_best_hit(tmp_path, library):
    db = _index(tmp_path, library)
    with Pipeline(db=db, encoder=ENCODER) as pipe:
        query = str(library / "beach.jpg")
        plain = [os.path.basename(h.path) for h in pipe.search(image=query, k=6).hits]
        collapsed = pipe.search(image=query, k=6, collapse_duplicates=True).hits
    copies = {"beach.jpg", "beach_q30.jpg", "beach_small.jpg", "beach_turned.jpg"}
    assert copies <= set(plain)
    names = [os.path.basename(h.path) for h in collapsed]
    assert len(set(names) & copies) == 1 and names[0] in copies
    assert {"beach_other.jpg", "street.jpg"} <= set(names)  # another shot of the subject is not a copy
    assert [h.rank for h in collapsed] == list(range(1, len(collapsed) + 1))


def test_a_collection_without_hashes_is_told_to_backfill_and_the_backfill_fills_them(tmp_path, library, capsys):
    db = _index(tmp_path, library)
    with Pipeline(db=db, encoder=ENCODER) as pipe:  # as an older version left it: no hashes
        store = pipe.store
        rows = store.get([r["id"] for r in store.iter_rows()], ["id", "path", "content_hash", "caption", "metadata", "file_size",
                                                                  "mtime_ns", "has_image", "has_text", "vector"])
        for r in rows:
            r["metadata"].pop(PHASH_KEY)
        store.upsert(rows)
        store.flush()

    code, _, err = _duplicates(capsys, db)
    assert code != 0
    assert "has a perceptual hash" in err and "mmr duplicates --backfill" in err

    os.remove(library / "street.jpg")  # gone since: reported, left as it is
    code, doc, _ = _duplicates(capsys, db, "--backfill")
    assert code == 0 and doc["hashed"] == 5
    assert [os.path.basename(f["path"]) for f in doc["failed"]] == ["street.jpg"]
    with Pipeline(db=db, encoder=ENCODER) as pipe:
        meta = {os.path.basename(r["path"]): r["metadata"] for r in pipe.store.iter_rows(("id", "path", "metadata"))}
    assert all(valid_hash(m.get(PHASH_KEY)) for n, m in meta.items() if n != "street.jpg")
    assert "taken" in meta["beach.jpg"]  # the rest of the metadata kept

    code, doc, err = _duplicates(capsys, db)
    assert code == 0 and len(doc["groups"]) == 1 and doc["unhashed"] == 1
    assert "1 of 6 images have no perceptual hash" in err


def test_a_touched_file_keeps_its_hash(tmp_path, library):
    db = _index(tmp_path, library)
    path = library / "beach_small.jpg"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # same bytes, new time: row rewritten, not decoded
    with Pipeline(db=db, encoder=ENCODER) as pipe:
        report = pipe.index(library, progress=False)
        assert report.indexed == 0
        row = next(r for r in pipe.store.iter_rows(("id", "path", "metadata", "mtime_ns")) if r["path"] == str(path))
    assert row["mtime_ns"] == st.st_mtime_ns + 5_000_000_000
    assert valid_hash(row["metadata"].get(PHASH_KEY))


def test_http_search_collapses_duplicates(tmp_path, library):
    import httpx

    from mm_retrieval.server.testing import DemoCollection, serve_demo

    db = _index(tmp_path, library)
    with Pipeline(db=db, encoder=ENCODER) as pipe:
        beach = next(r["id"] for r in pipe.store.iter_rows() if r["path"].endswith("beach_small.jpg"))
    demo = DemoCollection(root=tmp_path, db=db, collection="images", checkpoint=None)
    with serve_demo(None, demo=demo, rerank=False) as (server, _):
        ask = {"image_id": beach, "k": 6}
        plain = httpx.post(f"{server.url}/search", json=ask, timeout=60).json()["hits"]
        collapsed = httpx.post(f"{server.url}/search", json={**ask, "collapse_duplicates": True}, timeout=60).json()["hits"]
    assert len(plain) == 6
    names = [os.path.basename(h["path"]) for h in collapsed]
    assert names[0] == "beach_small.jpg" and sorted(names[1:]) == ["beach_other.jpg", "street.jpg"]  # its copies dropped
    assert collapsed[0]["near_duplicates"] == 3 and all("near_duplicates" not in h for h in collapsed[1:] + plain)  # and counted
