"""`mmr serve` on a collection with text vectors: /search in every mode equals `Pipeline.search`,
and the rerank endpoints refuse text-only items (they have no image to rerank)."""

import httpx
import pandas as pd
import pytest

from mm_retrieval import Pipeline
from mm_retrieval.server.testing import COLORS, TINY_ENCODER, DemoCollection, make_image, save_demo_reranker


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> DemoCollection:
    """What `served` serves here: 8 images (5 with captions) and a text-only row."""
    root = tmp_path_factory.mktemp("modes")
    rows = [{"path": str(make_image(root / "img" / f"{n}.png", rgb, seed=i)), "caption": f"a {n} picture" if i < 5 else None}
            for i, (n, rgb) in enumerate(COLORS.items())]
    rows.append({"path": None, "caption": "a recipe for red soup"})
    pd.DataFrame(rows).to_csv(root / "items.csv", index=False)
    db = str(root / "mmr.db")
    indexer = Pipeline(db=db, encoder=TINY_ENCODER)
    indexer.index(root / "items.csv", progress=False)
    ckpt = save_demo_reranker(indexer, root / "reranker")
    return DemoCollection(root=root, db=db, collection=indexer.store.name, checkpoint=ckpt,
                          paths=[r["path"] for r in rows if r["path"]])


@pytest.fixture(scope="module")
def pipe(demo):
    return demo.pipeline()


@pytest.mark.parametrize("body", [
    {"query": "a red picture"},  # auto: hybrid here
    {"query": "a red picture", "mode": "image"},
    {"query": "a red picture", "mode": "text"},
    {"query": "soup", "mode": "hybrid", "rerank": False},
    {"query": "a blue picture", "mode": "image", "rerank": False, "k": 3},
])
def test_search_modes_equal_pipeline_search(served, pipe, body):
    server, _ = served
    got = httpx.post(f"{server.url}/search", json={"k": 9, **body}, timeout=60).json()
    want = pipe.search(body["query"], mode=body.get("mode"), k=body.get("k", 9), rerank=body.get("rerank")).to_dict()
    assert got["mode"] == want["mode"] and got["reranked"] == want["reranked"]
    assert [h["id"] for h in got["hits"]] == [h["id"] for h in want["hits"]]
    for g, w in zip(got["hits"], want["hits"]):
        assert set(g) == set(w) and g["score"] == pytest.approx(w["score"], abs=1e-4)


def test_text_only_items_cannot_be_reranked(served, pipe):
    server, _ = served
    text_item = next(h for h in pipe.search("soup", mode="text", k=9).hits if not h.has_image)
    res = httpx.post(f"{server.url}/v2/rerank", json={"model": "m", "query": "soup", "documents": [text_item.id]}, timeout=60)
    assert res.status_code == 400 and "text-only" in res.json()["message"]
