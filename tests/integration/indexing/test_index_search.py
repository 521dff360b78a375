"""Indexing and searching through the real pipeline: Milvus Lite, the tiny open_clip model."""

import shutil

import pandas as pd
import pytest

from mm_retrieval import Pipeline
from mm_retrieval.errors import IncompatibleError, InputError
from tests.helpers import COLORS, TINY, make_image


def _ids(pipe):
    return {r["id"]: r["path"] for r in pipe.store.iter_rows(("id", "path"))}


def test_index_is_idempotent_and_tracks_changes(tiny_pipeline, image_folder):
    r1 = tiny_pipeline.index(image_folder, progress=False)
    assert (r1.indexed, r1.skipped) == (len(COLORS), 0)
    before = _ids(tiny_pipeline)
    assert len(before) == len(COLORS)

    r2 = tiny_pipeline.index(image_folder, progress=False)
    assert (r2.indexed, r2.unchanged) == (0, len(COLORS))
    assert _ids(tiny_pipeline) == before

    # a changed file replaces its old entry
    red = image_folder / "nested" / "red.png"
    make_image(red, (221, 31, 31), seed=99)
    r3 = tiny_pipeline.index(image_folder, progress=False)
    assert (r3.indexed, r3.replaced) == (1, 1)
    after = _ids(tiny_pipeline)
    assert len(after) == len(COLORS) and str(red) in after.values()
    assert set(after) - set(before) and len(set(before) - set(after)) == 1

    # a moved file keeps its id; only the path changes
    blue = image_folder / "blue.png"
    blue_id = next(i for i, p in after.items() if p == str(blue))
    moved = image_folder / "moved" / "blue-renamed.png"
    moved.parent.mkdir()
    shutil.move(blue, moved)
    r4 = tiny_pipeline.index(image_folder, progress=False)
    assert (r4.indexed, r4.moved) == (0, 1)
    assert _ids(tiny_pipeline)[blue_id] == str(moved)

    # a copy of an indexed file is stored once
    shutil.copy(moved, image_folder / "copy.png")
    r5 = tiny_pipeline.index(image_folder, progress=False)
    assert (r5.indexed, r5.duplicates) == (0, 1)
    assert tiny_pipeline.store.count() == len(COLORS)


def test_bad_files_are_skipped_with_reasons(tiny_pipeline, image_folder):
    (image_folder / "zero.png").write_bytes(b"")
    (image_folder / "text.jpg").write_text("not an image at all")
    data = (image_folder / "green.png").read_bytes()
    (image_folder / "half.png").write_bytes(data[: len(data) // 2])
    from PIL import Image

    Image.new("L", (12000, 10000)).save(image_folder / "bomb.png")  # 120 MP, compresses to a few KB
    report = tiny_pipeline.index(image_folder, progress=False)
    reasons = {f.path.rsplit("/", 1)[-1]: f.error for f in report.failed}
    assert report.indexed == len(COLORS)
    assert set(reasons) == {"zero.png", "text.jpg", "half.png", "bomb.png"}
    assert "empty" in reasons["zero.png"]
    assert "not an image" in reasons["text.jpg"]
    assert "truncated" in reasons["half.png"] or "corrupt" in reasons["half.png"]
    assert "too large" in reasons["bomb.png"]
    assert report.to_dict()["skipped"] == 4


def test_table_with_relative_paths_captions_and_filter(tmp_path, tiny_pipeline):
    rows = []
    for i, (name, rgb) in enumerate(COLORS.items()):
        make_image(tmp_path / "data" / "img" / f"{name}.png", rgb, seed=i)
        rows.append({"path": f"img/{name}.png", "caption": f"a {name} picture", "year": 2000 + i, "tag": "warm" if i % 2 else "cool"})
    table = tmp_path / "data" / "table.parquet"
    pd.DataFrame(rows).to_parquet(table)
    report = tiny_pipeline.index(table, progress=False)
    assert report.indexed == len(rows)

    res = tiny_pipeline.search("a red picture", k=20, filter='metadata["year"] >= 2004 and metadata["tag"] == "warm"')
    years = sorted(h.metadata["year"] for h in res.hits)
    assert years == [2005, 2007]
    assert all(h.caption.startswith("a ") and h.path.startswith(str(tmp_path)) for h in res.hits)

    # a caption edit in the table is picked up without re-encoding
    rows[0]["caption"] = "edited caption"
    pd.DataFrame(rows).to_parquet(table)
    r2 = tiny_pipeline.index(table, progress=False)
    assert r2.indexed == 0
    res = tiny_pipeline.search("x", k=20, filter='caption == "edited caption"')
    assert len(res.hits) == 1


def test_search_shape_and_order(tiny_pipeline, image_folder):
    tiny_pipeline.index(image_folder, progress=False)
    res = tiny_pipeline.search("a blue image", k=3)
    assert [h.rank for h in res.hits] == [1, 2, 3]
    scores = [h.score for h in res.hits]
    assert scores == sorted(scores, reverse=True)
    assert all(h.score == h.retrieval_score for h in res.hits)
    doc = res.to_dict()
    assert set(doc) >= {"query", "hits", "timings_ms"}
    assert set(doc["timings_ms"]) >= {"encode", "search", "rerank"}
    assert set(doc["hits"][0]) >= {"rank", "id", "path", "score", "retrieval_score", "metadata"}


@pytest.mark.parametrize("query", ["", "   \n\t", "x" * 5000])
def test_bad_queries(tiny_pipeline, query):
    with pytest.raises(InputError):
        tiny_pipeline.search(query)


def test_bad_filter_is_an_input_error(tiny_pipeline, image_folder):
    tiny_pipeline.index(image_folder, progress=False)
    with pytest.raises(InputError, match="invalid filter expression"):
        tiny_pipeline.search("red", filter='metadata["year"] >>> 3')


def test_search_before_index_says_what_to_do(tiny_pipeline):
    with pytest.raises(InputError, match="mmr index"):
        tiny_pipeline.search("red")


def test_other_model_is_refused_naming_both(tmp_path, image_folder):
    db = str(tmp_path / "mmr.db")
    Pipeline(db=db, encoder={**TINY, "workers": 0}).index(image_folder, progress=False)
    other = Pipeline(db=db, model="mmr-small", pretrained="none", encoder={"workers": 0})
    with pytest.raises(IncompatibleError) as e:
        other.search("red")
    assert "mmr-tiny" in str(e.value) and "mmr-small" in str(e.value)
    with pytest.raises(IncompatibleError):
        other.index(image_folder, progress=False)
    # no --model: the collection's own model is used
    assert Pipeline(db=db).search("red", k=2).hits


def test_source_errors(tiny_pipeline, tmp_path):
    with pytest.raises(InputError, match="not found"):
        tiny_pipeline.index(tmp_path / "nope")
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(InputError, match="neither a folder nor a table"):
        tiny_pipeline.index(tmp_path / "t.txt")
    (tmp_path / "t.csv").write_text("file,caption\na.png,x\n")
    with pytest.raises(InputError, match="no 'path' column"):
        tiny_pipeline.index(tmp_path / "t.csv")


class RecordingClient:
    """Wraps a MilvusClient: every method call is recorded by name, then made as usual."""

    def __init__(self, client):
        self.client, self.calls = client, []

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args, **kwargs):
            self.calls.append(name)
            return attr(*args, **kwargs)
        return call


def test_index_run_ends_with_a_flush_on_milvus_lite(tiny_pipeline, image_folder):
    # Milvus Lite brute-forces rows left in growing segments (the search bench measures it), so
    # an index run seals them even on a local database.
    store = tiny_pipeline.store
    store.client = rec = RecordingClient(store._milvus)  # (_milvus: connects, creating the new database)
    tiny_pipeline.index(image_folder, progress=False)
    writes = [c for c in rec.calls if c != "has_collection"]  # (a new collection: index then asks it was created)
    assert "upsert" in writes and writes[-1] == "flush"
    red = next(image_folder.rglob("red.png"))
    assert tiny_pipeline.search(image=str(red), mode="image", k=1).hits[0].path == str(red)
    rec.calls.clear()
    tiny_pipeline.index(image_folder, progress=False)  # nothing new: the flush is a no-op, still made
    assert rec.calls[-1] == "flush" and "upsert" not in rec.calls


def test_search_asks_milvus_about_the_collection_once(tiny_pipeline, image_folder, tmp_path):
    tiny_pipeline.index(image_folder, progress=False)
    assert tiny_pipeline.search("red", k=2).mode == "image"  # the first search checks the collection
    store = tiny_pipeline.store
    store.client = rec = RecordingClient(store.client)
    for q in ("red", "a green thing", "blue", "sky"):
        assert len(tiny_pipeline.search(q, k=2).hits) == 2
    assert rec.calls == ["search"] * 4  # no has_collection / describe_collection per query

    # dropped behind the pipeline's back (as by another process): still the clear message
    rec.client.drop_collection(store.name)
    with pytest.raises(InputError, match="does not exist.*mmr index"):
        tiny_pipeline.search("red")

    # an index run in this process makes the next search look again: now it has text vectors
    make_image(tmp_path / "t" / "cat.png", (90, 90, 90))
    table = tmp_path / "t" / "items.csv"
    pd.DataFrame([{"path": "cat.png", "caption": "a grey cat"}, {"path": None, "caption": "notes about cats"}]).to_csv(table, index=False)
    tiny_pipeline.index(table, progress=False)
    res = tiny_pipeline.search("cat", k=2)
    assert res.mode == "hybrid" and len(res.hits) == 2
