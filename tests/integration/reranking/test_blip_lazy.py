"""Lazy reranker tokens (issue 24 item 3) on a tiny random BLIP checkpoint and Milvus Lite.

`mmr index --rerank BLIP --tokens lazy` writes no BLIP tokens; the first rerank that meets
candidates without tokens encodes them from their files in one batch and stores them; later
queries read them. Scores equal those of an eagerly indexed collection; a budget bounds the cache
(least recently used evicted); a candidate whose file is gone keeps its first-stage score and is
marked; a kill during a lazy fill leaves nothing a reader trusts; the server computes tokens off
its device thread, so a cached request is answered while another query's images are encoded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from mm_retrieval import Pipeline
from mm_retrieval.cli import main
from mm_retrieval.testing.blip import make_tiny_blip
from mm_retrieval.tokencache import TokenCache, caches_in, open_existing
from tests.helpers import COLORS, TINY, make_image

pytest.importorskip("transformers")

ENC = {**TINY, "workers": 0, "batch_size": 4}
QUERY = "a red picture"
# Lazily computed tokens are the same fp16 tokens as those written at index time, up to the vision
# model's fp32 rounding at another batch size flipping an fp16 rounding now and then (one ulp).
SAME = 1e-4


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return make_tiny_blip(tmp_path_factory.mktemp("ckpt") / "blip-tiny")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for i, (name, rgb) in enumerate(COLORS.items()):
        make_image(root / f"{name}.png", rgb, size=(60 + 8 * i, 48), seed=i)
    return root


@pytest.fixture(scope="module")
def eager(tmp_path_factory, images, blip_dir):
    """The same images indexed with BLIP tokens written while indexing: the reference scores."""
    pipe = Pipeline(db=str(tmp_path_factory.mktemp("eager") / "mmr.db"), encoder=ENC, reranker={"checkpoint": str(blip_dir), "device": "cpu"})
    pipe.index(images, progress=False)
    return pipe


def _lazy(tmp_path, images, blip_dir, **kw) -> Pipeline:
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder=ENC, reranker={"checkpoint": str(blip_dir), "device": "cpu"}, tokens="lazy", **kw)
    pipe.index(images, progress=False)
    return pipe


def _cache(pipe: Pipeline) -> TokenCache:
    (path,) = [p for p in caches_in(pipe.store.cache_dir()) if p.name.startswith("tokens-blip-")]
    return open_existing(path)


def test_lazy_index_writes_no_tokens_then_the_first_rerank_fills_exactly_its_candidates(tmp_path, images, blip_dir, eager):
    # through the CLI: --tokens lazy, and `mmr cache info` says how the cache is filled
    db = str(tmp_path / "mmr.db")
    assert main(["index", str(images), "--db", db, "--model", TINY["model"], "--pretrained", TINY["pretrained"], "--workers", "0",
                 "--rerank", str(blip_dir), "--tokens", "lazy", "--no-progress"]) == 0
    pipe = Pipeline(db=db, encoder={"workers": 0}, reranker={"checkpoint": str(blip_dir), "device": "cpu"})
    cache = _cache(pipe)
    assert len(cache) == 0 and cache.fill == "lazy" and cache.budget is None
    assert not [p for p in caches_in(pipe.store.cache_dir()) if p.name.startswith("tokens-raw-")]  # no raw tokens either

    first = [h.id for h in pipe.search(QUERY, k=5, rerank=False).hits]
    got = pipe.search(QUERY, k=3, candidates=5)
    lazy = pipe.reranker.lazy
    assert lazy.encoded == 5 and set(_cache(pipe).ids()) == set(first)
    again = pipe.search(QUERY, k=3, candidates=5)
    assert lazy.encoded == 5  # read, not encoded again
    want = eager.search(QUERY, k=3, candidates=5)
    for result in (got, again):
        assert [h.id for h in result.hits] == [h.id for h in want.hits]
        assert [h.score for h in result.hits] == pytest.approx([h.score for h in want.hits], abs=SAME)
        assert all(h.not_reranked is None for h in result.hits)

    # a query whose candidates are half cached encodes only the other half, in one batch
    everything = pipe.search("green", k=8, candidates=8)
    assert lazy.encoded == 8 and len(_cache(pipe)) == 8
    assert [h.score for h in everything.hits] == pytest.approx([h.score for h in eager.search("green", k=8, candidates=8).hits], abs=SAME)

    # `mmr cache build` still fills everything ahead of time (here: what a new image lacks); the cache stays lazy
    make_image(tmp_path / "more" / "new.png", (10, 10, 10), seed=42)
    pipe.close()
    assert main(["index", str(tmp_path / "more"), "--db", db, "--workers", "0", "--rerank", str(blip_dir), "--tokens", "lazy", "--no-progress"]) == 0
    assert len(_cache(pipe)) == 8
    assert main(["cache", "build", "--db", db, "--rerank", str(blip_dir), "--no-progress", "--device", "cpu"]) == 0
    after = _cache(pipe)
    assert len(after) == 9 and after.fill == "lazy"


def test_budget_evicts_the_least_recently_used_and_stays_under_it(tmp_path, images, blip_dir, eager):
    pipe = _lazy(tmp_path, images, blip_dir, token_budget="3")
    cache = _cache(pipe)
    assert cache.budget == ("items", 3)
    a = pipe.search(QUERY, k=2, candidates=2)
    b = pipe.search("green", k=2, candidates=2)
    ids = lambda r: {h.id for h in r.hits}
    assert len(_cache(pipe)) <= 3
    pipe.search(QUERY, k=2, candidates=2)  # read: the query's items are the most recently used now
    c = pipe.search("a blue square", k=3, candidates=3)
    held = set(_cache(pipe).ids())
    assert len(held) <= 3 and ids(c) <= held
    assert _cache(pipe).stats()["live_slots"] + _cache(pipe).stats()["free_slots"] <= 3  # the data file never held more
    if not ids(c) >= ids(a):  # something of `a` had to go: what went was `b`'s, used before `a` was read again
        assert not (ids(b) - ids(a) - ids(c)) & held
    # more candidates than the budget: all scored, as eager would; only what fits is kept
    wide = pipe.search(QUERY, k=8, candidates=8)
    assert [h.score for h in wide.hits] == pytest.approx([h.score for h in eager.search(QUERY, k=8, candidates=8).hits], abs=SAME)
    assert len(_cache(pipe)) <= 3


def test_lru_order_in_the_store(tmp_path):
    cache = TokenCache(tmp_path / "tokens-x.sqlite", "x")
    cache.set_policy("lazy", 3)
    for i in "abc":
        cache.add(i, np.full((2, 4), ord(i), np.float16))
        cache.commit()
        time.sleep(0.002)
    cache.gather(["a"])  # a read: "a" is now more recent than b and c
    cache.add("d", np.zeros((2, 4), np.float16))
    cache.commit(keep=["c"])  # c is among the current query's candidates: not evicted now
    assert sorted(cache.ids()) == ["a", "c", "d"] and cache.evicted == 1
    arr, present = cache.gather(["a", "c", "d"])
    assert present.all() and (arr[0] == ord("a")).all() and (arr[1] == ord("c")).all()
    s = cache.stats()
    assert s["live_slots"] == 3 and s["free_slots"] == 0 and s["fill"] == "lazy" and s["budget"] == "3 images"
    with pytest.raises(Exception, match="do not fit its budget"):
        for i in "wxyz":
            cache.add(i, np.zeros((2, 4), np.float16))
        cache.commit()


def test_a_candidate_whose_file_is_gone_keeps_its_first_stage_score_and_is_marked(tmp_path, images, blip_dir, eager, capsys):
    own = tmp_path / "photos"
    shutil.copytree(images, own)
    pipe = _lazy(tmp_path, own, blip_dir)
    first = pipe.search(QUERY, k=8, rerank=False).hits
    gone = first[0]
    os.remove(gone.path)
    result = pipe.search(QUERY, k=8, candidates=8)
    assert len(result.hits) == 8  # not dropped
    last = result.hits[-1]
    assert last.id == gone.id and last.score == pytest.approx(gone.retrieval_score) and last.rerank_score is None
    assert "gone" in last.not_reranked and gone.path in last.not_reranked
    assert all(h.not_reranked is None for h in result.hits[:-1])
    want = {h.id: h.score for h in eager.search(QUERY, k=8, candidates=8).hits}
    assert {h.id: h.score for h in result.hits[:-1]} == pytest.approx({i: want[i] for i in want if i != gone.id}, abs=SAME)
    assert pipe.reranker.lazy.encoded == 7
    pipe.search(QUERY, k=8, candidates=8)
    assert pipe.reranker.lazy.encoded == 7  # the missing file is not read again for every query
    pipe.close()

    args = ["search", QUERY, "--db", str(tmp_path / "mmr.db"), "--rerank", str(blip_dir), "--k", "8", "--device", "cpu"]
    assert main([*args, "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert "gone" in hits[-1]["not_reranked"] and "not_reranked" not in hits[0]
    assert main(args) == 0
    assert "(not reranked: its file is gone" in capsys.readouterr().out


@pytest.mark.slow  # a killed subprocess
def test_a_kill_during_a_lazy_fill_leaves_no_slot_a_reader_trusts(tmp_path, images, blip_dir, eager):
    pipe = _lazy(tmp_path, images, blip_dir)
    pipe.close()
    code = ("from mm_retrieval import Pipeline; import sys; "
            "p = Pipeline(db=sys.argv[1], encoder={'workers': 0}, reranker={'checkpoint': sys.argv[2], 'device': 'cpu'}); "
            f"p.search({QUERY!r}, k=3, candidates=8)")
    env = {**os.environ, "MMR_FAILPOINTS": "mid_slot=3"}
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "mmr.db"), str(blip_dir)], env=env, capture_output=True, timeout=300, check=False)
    assert run.returncode == -9, run.stderr.decode()[-2000:]
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder={"workers": 0}, reranker={"checkpoint": str(blip_dir), "device": "cpu"})
    assert len(_cache(pipe)) == 0  # the batch's map rows were never committed
    got = pipe.search(QUERY, k=8, candidates=8)
    want = eager.search(QUERY, k=8, candidates=8)
    assert [h.score for h in got.hits] == pytest.approx([h.score for h in want.hits], abs=SAME)
    assert pipe.reranker.lazy.encoded == 8


@pytest.mark.slow  # a real server and concurrent requests
def test_the_server_answers_a_cached_request_while_another_query_encodes(tmp_path, images, blip_dir, eager):
    import httpx

    from mm_retrieval.server.app import create_app
    from mm_retrieval.server.background import BackgroundServer
    from mm_retrieval.server.engine import Engine

    own = tmp_path / "photos"
    shutil.copytree(images, own)
    _lazy(tmp_path, own, blip_dir).close()
    engine = Engine(Pipeline(db=str(tmp_path / "mmr.db"), encoder={"workers": 0}, reranker={"checkpoint": str(blip_dir), "device": "cpu"}))
    with BackgroundServer(create_app(engine)) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        cached = {"query": "green", "k": 2, "candidates": 2, "mode": "image"}
        assert client.post("/search", json=cached).status_code == 200  # fills those 2
        lazy = engine.reranker.lazy
        side, release, entered = lazy.image_side, threading.Event(), threading.Event()

        class HeldSide:  # the real image side, held until the cached request has been answered
            transform = side.transform

            @staticmethod
            def encode(pixels):
                entered.set()
                assert release.wait(60)
                return side.encode(pixels)

        lazy.image_side = HeldSide
        slow: dict = {}
        t = threading.Thread(target=lambda: slow.update(r=client.post("/search", json={"query": QUERY, "k": 8, "candidates": 8, "mode": "image"})))
        t.start()
        try:
            assert entered.wait(60), "the uncached query never started encoding"
            t0 = time.monotonic()
            fast = client.post("/search", json=cached)  # must not wait for the encode the other query is held in
            assert fast.status_code == 200 and time.monotonic() - t0 < 30
            assert t.is_alive()  # the first query is still encoding
        finally:
            release.set()
            t.join(120)
        assert slow["r"].status_code == 200, slow["r"].text
        want = eager.search(QUERY, k=8, candidates=8)
        assert [h["score"] for h in slow["r"].json()["hits"]] == pytest.approx([h.score for h in want.hits], abs=SAME)
        lazy.image_side = side

        # the rerank API: a document whose tokens are gone and whose file is gone keeps its first-stage score, ranked last
        paths = sorted(str(p) for p in own.iterdir())
        name = {h.id: os.path.basename(h.path) for h in want.hits}  # the same images, in the eager collection's folder
        gone = next(h for h in want.hits if name[h.id] == os.path.basename(paths[0]))
        os.remove(paths[0])
        cache = _cache(engine.pipeline)
        cache.delete([gone.id])
        cache.close()
        res = client.post("/v2/rerank", json={"model": "m", "query": QUERY, "documents": paths})
        assert res.status_code == 200, res.text
        results = res.json()["results"]
        assert len(results) == len(paths) and results[-1]["index"] == 0
        assert results[-1]["relevance_score"] == pytest.approx(gone.retrieval_score, abs=1e-5)
        assert [os.path.basename(paths[r["index"]]) for r in results[:-1]] == [name[h.id] for h in want.hits if h.id != gone.id]


def test_video_moments_are_filled_from_their_frame_as_indexing_encoded_it(tmp_path, blip_dir):
    from mm_retrieval.testing.videos import make_video

    root = tmp_path / "media"
    make_video(root / "clip.mp4", [("red", 2), ("blue", 2)], size=48)
    make_image(root / "green.png", (30, 200, 40))
    want = Pipeline(db=str(tmp_path / "eager.db"), encoder=ENC, reranker={"checkpoint": str(blip_dir), "device": "cpu"})
    want.index(root, progress=False)
    pipe = Pipeline(db=str(tmp_path / "lazy.db"), encoder=ENC, reranker={"checkpoint": str(blip_dir), "device": "cpu"}, tokens="lazy")
    pipe.index(root, progress=False)
    got = pipe.search(QUERY, k=8, candidates=8, group_by_video=False)
    assert any(h.video_id for h in got.hits) and all(h.not_reranked is None for h in got.hits)
    ref = want.search(QUERY, k=8, candidates=8, group_by_video=False)
    # the same frame (a neighbouring one of the same scene is off by 0.025 in its tokens, another scene by 4);
    # a flipped fp16 rounding of a token moves a score by up to ~3e-4 here
    assert {h.id: h.score for h in got.hits} == pytest.approx({h.id: h.score for h in ref.hits}, abs=1e-3)
    assert pipe.reranker.lazy.encoded == len(got.hits)
