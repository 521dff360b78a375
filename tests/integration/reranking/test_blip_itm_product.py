"""BLIP (reranker/blip_itm) everywhere a reranker goes, on a tiny random checkpoint (no download):
`--rerank DIR` picks the stage, `mmr index` writes BLIP's own vision tokens in the decode batches,
`mmr cache build` backfills them, and search, eval, hybrid fusion, the Python API, `mmr explain`,
`mmr serve` (rerank wire formats, /search, /explain, dynamic batching) and Milvus' rerank Function
all score with the stage's own math. Bad input fails with one clear line and changes nothing.

The stage's parity with transformers is tests/integration/reranking/test_blip_itm.py's job; here the
reference is the stage itself, scoring the same first-stage hits.
"""

from __future__ import annotations

import csv
import json
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mm_retrieval import Pipeline
from mm_retrieval.backfill import cache_info
from mm_retrieval.cli import main
from mm_retrieval.query import Query
from mm_retrieval.server import ServerConfig
from mm_retrieval.server.testing import DemoCollection
from mm_retrieval.stages.rerankers.blip_itm import BlipItmReranker
from mm_retrieval.stages.rerankers.blip_itm import storage as codec
from mm_retrieval.testing.blip import TINY_BLIP, make_tiny_blip
from mm_retrieval.tokencache import caches_in, open_existing
from tests.helpers import COLORS, TINY, make_image

pytest.importorskip("transformers")

TINY_ARGS = ["--model", TINY["model"], "--pretrained", TINY["pretrained"], "--workers", "0"]
QUERY = "a red picture"
KEY = "blip-key"
TOKENS = (TINY_BLIP["image_size"] // TINY_BLIP["patch_size"]) ** 2 + 1, TINY_BLIP["vision_width"]  # (17, 48)


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return make_tiny_blip(tmp_path_factory.mktemp("ckpt") / "blip-tiny")


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """8 images and a captioned table listing them (text vectors: hybrid search works)."""
    root = tmp_path_factory.mktemp("data")
    with open(root / "pictures.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        for i, (name, rgb) in enumerate(COLORS.items()):
            make_image(root / "images" / f"{name}.png", rgb, seed=i)
            w.writerow([f"images/{name}.png", f"a {name} picture"])
    return root / "pictures.csv"


@pytest.fixture(scope="module")
def db(tmp_path_factory, table, blip_dir):
    """The table indexed through the CLI with `--rerank BLIP_DIR` (batches of 3: several decode batches)."""
    path = str(tmp_path_factory.mktemp("indexed") / "mmr.db")
    assert main(["index", str(table), "--db", path, *TINY_ARGS, "--batch-size", "3", "--rerank", str(blip_dir),
                 "--no-progress"]) == 0
    return path


@pytest.fixture(scope="module")
def pipe(db, blip_dir):
    return Pipeline(db=db, encoder={"workers": 0}, reranker=str(blip_dir))


def _stage(blip_dir, pipe, **params) -> BlipItmReranker:
    """The stage on its own, bound to the same collection: the reference for every score here."""
    r = BlipItmReranker({"checkpoint": str(blip_dir), "device": "cpu", **params})
    r.bind(encoder=pipe.encoder, store=pipe.store)
    return r


def _expected(pipe, blip_dir, query=QUERY, *, mode="image", k=8):
    """The stage's scores of the first stage's top 8 (image mode), best first: [(path, score, retrieval)]."""
    hits = pipe.search(query, k=8, mode=mode, rerank=False).hits
    if mode == "hybrid":
        hits = [h for h in hits if h.has_image]
    scores = _stage(blip_dir, pipe).score(Query(query, pipe.encoder), hits)
    order = np.argsort(-scores, kind="stable")[:k]
    return [(hits[i].path, float(scores[i]), hits[i].retrieval_score) for i in order]


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def _state(db):
    """What is indexed: row count and every token cache (fingerprint, items). (Not closed: closing
    a Milvus Lite client stops the database for the other pipelines of this process.)"""
    store = Pipeline(db=db, encoder={"workers": 0}).store
    return store.count(), [(c["fingerprint"], c["items"]) for c in cache_info(store)]


# ---- routing ------------------------------------------------------------------------------
def test_rerank_ref_picks_the_stage(blip_dir, tmp_path):
    assert Pipeline(db=str(tmp_path / "x.db"), reranker=str(blip_dir)).config.reranker.name == "blip_itm"
    assert Pipeline(db=str(tmp_path / "x.db"), reranker="Salesforce/blip-itm-base-coco").config.reranker.name == "blip_itm"
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "reranker.json").write_text("{}")  # a `mmr train-reranker` directory
    assert Pipeline(db=str(tmp_path / "x.db"), reranker=str(ours)).config.reranker.name == "cross_attention"
    spec = Pipeline(db=str(tmp_path / "x.db"), reranker={"checkpoint": str(blip_dir), "storage": "int8"}).config.reranker
    assert (spec.name, spec.params["storage"]) == ("blip_itm", "int8")


# ---- index time ---------------------------------------------------------------------------
def test_index_with_rerank_caches_blips_own_tokens(db, pipe, blip_dir, capsys):
    stage = _stage(blip_dir, pipe)
    caches = cache_info(pipe.store)
    assert [(c["fingerprint"], c["items"]) for c in caches] == [(stage.fingerprint, 8)]  # no raw CLIP tokens beside
    assert caches[0]["bytes_per_item"] == codec.stored_bytes(*TOKENS, "fp16")
    # the cached tokens are BLIP's vision model on BLIP's preprocessing of each file
    from mm_retrieval.decode import decode_image, read_regular_file

    hit = pipe.search("green", k=1, mode="image", rerank=False).hits[0]
    side = stage.image_side()
    fresh = side.encode(side.transform(decode_image(read_regular_file(hit.path)))[None])[0]
    assert np.abs(stage.cached_tokens([hit.id])[0].astype(np.float32) - fresh).max() < 1e-2  # fp16 storage

    assert main(["cache", "info", "--db", db, "--json"]) == 0
    (info,) = _json(capsys)["caches"]
    assert (info["info"]["tokens"], info["info"]["width"], info["info"]["storage"]) == (*TOKENS, "fp16")
    assert info["info"]["bytes_per_image"] == info["bytes_per_item"]
    assert main(["cache", "info", "--db", db]) == 0
    assert f"[{TOKENS[0]}, {TOKENS[1]}] fp16" in capsys.readouterr().out  # results: stdout


@pytest.mark.slow  # spawns decoding workers (each imports torch: seconds on 2 cores)
def test_decoding_workers_compute_the_same_tokens(db, table, blip_dir, tmp_path):
    """With workers, each file is decoded once in a worker that runs both preprocessings (the
    first stage's and BLIP's, picklable), and the tokens are those of the in-process run."""
    other = str(tmp_path / "mmr.db")
    assert main(["index", str(table), "--db", other, *TINY_ARGS[:-2], "--workers", "2", "--batch-size", "3",
                 "--rerank", str(blip_dir), "--no-progress"]) == 0
    a, b = (open_existing(next(p for p in caches_in(_cache_dir(d)) if "blip-" in p.name)) for d in (db, other))
    ids = a.ids()
    assert len(ids) == 8 and sorted(ids) == sorted(b.ids())
    assert all(np.array_equal(a.get([i])[i], b.get([i])[i]) for i in ids)


# ---- query time ---------------------------------------------------------------------------
def test_search_scores_are_the_stages_own(db, pipe, blip_dir, capsys):
    want = _expected(pipe, blip_dir, k=5)
    assert main(["search", QUERY, "--db", db, "--rerank", str(blip_dir), "--mode", "image", "--k", "5", "--json"]) == 0
    doc = _json(capsys)
    assert doc["reranked"] is True
    got = [(h["path"], h["score"], h["retrieval_score"]) for h in doc["hits"]]
    assert [g[0] for g in got] == [w[0] for w in want]
    assert np.allclose([g[1:] for g in got], [w[1:] for w in want], atol=1e-5)
    first = [h.path for h in pipe.search(QUERY, k=5, mode="image", rerank=False).hits]
    assert [g[0] for g in got] != first  # the tiny model really reorders: the check can fail
    api = pipe.search(QUERY, k=5, mode="image")  # the Python API, same pipeline
    assert [h.path for h in api.hits] == [g[0] for g in got]
    assert [h.score for h in api.hits] == pytest.approx([g[1] for g in got], abs=1e-5)


def test_hybrid_fuses_the_blip_order_with_the_captions(pipe, blip_dir):
    res = pipe.search(QUERY, k=8, mode="hybrid")
    assert res.reranked and res.mode == "hybrid"
    want = {path: score for path, score, _ in _expected(pipe, blip_dir, mode="hybrid")}
    assert {h.path: h.rerank_score for h in res.hits} == pytest.approx(want, abs=1e-5)
    assert all(h.text_score is not None for h in res.hits)


def test_eval_reranks_with_blip(db, pipe, blip_dir, table, capsys):
    assert main(["eval", str(table), "--db", db, "--rerank", str(blip_dir), "--no-index", "--json"]) == 0
    doc = _json(capsys)
    top = {}
    for name in COLORS:
        top[name] = pipe.search(f"a {name} picture", k=1, mode="image").hits[0].path.endswith(f"/{name}.png")
    assert doc["reranked"]["R@1"] == pytest.approx(np.mean(list(top.values())))
    assert doc["reranked"]["R@10"] == 1.0


def test_explain_draws_blips_cross_attention(db, pipe, blip_dir, tmp_path, capsys):
    red = pipe.search("red dogs", k=8, mode="image", rerank=False).hits
    path = next(h.path for h in red if h.path.endswith("/red.png"))
    out = tmp_path / "why.png"
    assert main(["explain", "red dogs", path, "--db", db, "--rerank", str(blip_dir), "-o", str(out), "--layer", "1",
                 "--json"]) == 0
    doc = _json(capsys)
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"
    assert doc["words"] == ["red", "dogs"] and doc["grid"] == [4, 4]
    assert (doc["layers"], doc["heads"]) == (TINY_BLIP["layers"], TINY_BLIP["heads"])
    hit = next(h for h in red if h.path == path)  # scored as search scores it: stored vector, cached tokens
    assert doc["retrieval_score"] == pytest.approx(hit.retrieval_score, abs=1e-6)
    assert doc["score"] == pytest.approx(_stage(blip_dir, pipe).score(Query("red dogs", pipe.encoder), [hit])[0], abs=1e-5)


# ---- backfill -----------------------------------------------------------------------------
def test_cache_build_backfills_a_collection_indexed_without_blip(db, blip_dir, table, tmp_path, capsys):
    other = str(tmp_path / "mmr.db")
    assert main(["index", str(table), "--db", other, *TINY_ARGS, "--no-progress"]) == 0  # raw CLIP tokens only
    capsys.readouterr()
    assert main(["search", QUERY, "--db", other, "--rerank", str(blip_dir)]) == 2
    err = capsys.readouterr().err
    assert f"mmr cache build --rerank {blip_dir}" in err and "Traceback" not in err

    assert main(["cache", "build", "--db", other, "--rerank", str(blip_dir), "--json", "--no-progress"]) == 0
    built = _json(capsys)
    assert (built["encoded"], built["from_raw_tokens"], built["items"], built["failed"]) == (8, 0, 8, [])
    # the same tokens an index run writes
    a, b = (open_existing(next(p for p in caches_in(open_dir) if "blip-" in p.name))
            for open_dir in (_cache_dir(db), _cache_dir(other)))
    ids = a.ids()
    assert sorted(ids) == sorted(b.ids())
    assert all(np.array_equal(a.get([i])[i], b.get([i])[i]) for i in ids)
    assert main(["search", QUERY, "--db", other, "--rerank", str(blip_dir), "--mode", "image", "--k", "3", "--json"]) == 0
    assert len(_json(capsys)["hits"]) == 3
    assert main(["cache", "build", "--db", other, "--rerank", str(blip_dir), "--json", "--no-progress"]) == 0
    assert _json(capsys)["encoded"] == 0


def _cache_dir(db):
    return Pipeline(db=db, encoder={"workers": 0}).store.cache_dir()


# ---- bad input ----------------------------------------------------------------------------
def test_not_a_blip_retrieval_model_is_one_line_and_changes_nothing(db, tmp_path, table, capsys):
    import transformers

    bert = tmp_path / "bert"
    transformers.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(bert)
    before = _state(db)
    for argv in (["search", QUERY, "--db", db, "--rerank", str(bert)],
                 ["index", str(table), "--db", db, "--rerank", str(bert), "--no-progress"],
                 ["cache", "build", "--db", db, "--rerank", str(bert), "--no-progress"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "not a BLIP retrieval model" in err and "model_type 'bert'" in err and "Traceback" not in err
    assert _state(db) == before


def test_offline_hub_name_names_rerank_path(db, table, capsys):
    before = _state(db)
    for argv in (["search", QUERY, "--db", db, "--rerank", "mmr-test-org/blip-itm-not-cached"],
                 ["index", str(table), "--db", db, "--rerank", "mmr-test-org/blip-itm-not-cached", "--no-progress"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert "mmr-test-org/blip-itm-not-cached" in line and "offline" in line and "--rerank PATH" in line
        assert "Traceback" not in err
    assert _state(db) == before


def test_cache_of_another_checkpoint_or_resolution_is_refused(db, pipe, blip_dir, tmp_path, capsys):
    other = make_tiny_blip(tmp_path / "other", seed=1)
    before = _state(db)
    assert main(["search", QUERY, "--db", db, "--rerank", str(other), "--mode", "image"]) == 2
    err = capsys.readouterr().err
    assert "another checkpoint, resolution or storage" in err and f"mmr cache build --rerank {other}" in err
    low = Pipeline(db=db, encoder={"workers": 0}, reranker={"checkpoint": str(blip_dir), "image_size": 16})
    with pytest.raises(Exception, match="another checkpoint, resolution or storage") as e:
        low.search(QUERY, mode="image")
    assert e.value.exit_code == 2
    assert _state(db) == before


def test_long_query_is_cut_and_said_once(db, blip_dir, caplog, capsys):
    long = " ".join(["a"] * 700)  # 702 BLIP tokens; within the 2000-character query limit
    with caplog.at_level(logging.WARNING):
        assert main(["search", long, "--db", db, "--rerank", str(blip_dir), "--mode", "image", "--k", "2", "--json"]) == 0
    assert len(_json(capsys)["hits"]) == 2
    said = [m for m in caplog.messages if "cut to" in m]
    assert len(said) == 1 and "512" in said[0]
    assert not [m for m in caplog.messages if "Token indices sequence length" in m]


# ---- mmr serve ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(db, table, blip_dir):
    """`served` (tests/fixtures.py) serves this collection with the BLIP reranker."""
    paths = [str((table.parent / "images" / f"{name}.png").resolve()) for name in COLORS]
    return DemoCollection(root=table.parent, db=db, collection="images", checkpoint=blip_dir, paths=paths)


@pytest.fixture(scope="module")
def server_config():
    return ServerConfig(api_key=KEY)  # Milvus' cohere provider insists on sending a key


@pytest.fixture(scope="module")
def client(served):
    import httpx

    with httpx.Client(base_url=served[0].url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def test_serve_rerank_and_search_score_like_the_stage(client, pipe, blip_dir, demo):
    want = _expected(pipe, blip_dir)
    docs = list(reversed(demo.paths))
    res = client.post("/v2/rerank", json={"model": "m", "query": QUERY, "documents": docs})
    assert res.status_code == 200, res.text
    got = [(docs[r["index"]], r["relevance_score"]) for r in res.json()["results"]]
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=1e-4)

    res = client.post("/search", json={"query": QUERY, "k": 3, "mode": "image"})
    assert res.status_code == 200, res.text
    doc = res.json()
    assert doc["reranked"] is True
    assert [h["path"] for h in doc["hits"]] == [w[0] for w in want[:3]]
    assert np.allclose([(h["score"], h["retrieval_score"]) for h in doc["hits"]], [w[1:] for w in want[:3]], atol=1e-4)

    hybrid = client.post("/search", json={"query": QUERY, "k": 8, "mode": "hybrid"}).json()
    assert {h["path"]: h["rerank_score"] for h in hybrid["hits"]} == pytest.approx(
        {p: s for p, s, _ in _expected(pipe, blip_dir, mode="hybrid")}, abs=1e-4)


def test_serve_batches_concurrent_queries_with_their_own_scores(client, pipe, blip_dir, demo):
    queries = ["red", "a big yellow house with a small dog", "green cat", "purple", "white square"]

    def ask(q):
        return q, client.post("/v2/rerank", json={"model": "m", "query": q, "documents": demo.paths}).json()

    with ThreadPoolExecutor(len(queries)) as pool:
        answers = list(pool.map(ask, queries * 2))
    for q, doc in answers:
        got = {demo.paths[r["index"]]: r["relevance_score"] for r in doc["results"]}
        assert got == pytest.approx({p: s for p, s, _ in _expected(pipe, blip_dir, q)}, abs=1e-4)


def test_serve_explain_and_inline_images(client, pipe, demo, tmp_path):
    item = pipe.search("blue", k=1, mode="image", rerank=False).hits[0]
    assert client.get("/collection").json()["explain"] is True
    res = client.post("/explain", json={"query": "blue dogs", "id": item.id})
    assert res.status_code == 200, res.text
    doc = res.json()
    assert doc["words"] == ["blue", "dogs"] and doc["grid"] == [4, 4] and doc["heads"] == TINY_BLIP["heads"]
    assert np.allclose(np.asarray(doc["maps"]).sum(axis=(1, 2)), 1.0, atol=1e-3)

    import base64

    new = make_image(tmp_path / "cyan.png", (10, 200, 200), seed=7)  # not in the collection: BLIP has no tokens for it
    inline = "data:image/png;base64," + base64.b64encode(new.read_bytes()).decode()
    res = client.post("/v2/rerank", json={"model": "m", "query": QUERY, "documents": [demo.paths[1], inline]})
    assert res.status_code == 400 and "indexed images only" in res.json()["message"], res.text  # Cohere's 4xx
    res = client.post("/v1/rerank", json={"query": QUERY, "documents": [demo.paths[1], inline]})
    assert res.status_code == 400 and "index the image first" in res.json()["error"]["message"], res.text  # vLLM's
    copy = "data:image/png;base64," + base64.b64encode(open(demo.paths[0], "rb").read()).decode()
    res = client.post("/v2/rerank", json={"model": "m", "query": QUERY, "documents": [demo.paths[0], copy]})
    assert res.status_code == 200, res.text  # an inline copy of an indexed image is that image
    scores = [r["relevance_score"] for r in sorted(res.json()["results"], key=lambda r: r["index"])]
    assert scores[0] == pytest.approx(scores[1], abs=1e-5)


def test_milvus_rerank_function_orders_like_mmr_search(served, pipe):
    from pymilvus import Function, FunctionType

    server, _ = served
    ranker = Function(name="mmr_rerank", input_field_names=["path"], function_type=FunctionType.RERANK,
                      params={"reranker": "model", "provider": "cohere", "model_name": "mmr", "queries": [QUERY],
                              "base_url": f"{server.url}/v2", "api_key": KEY})
    store = pipe.store
    hits = store.client.search(store.name, data=pipe.encoder.encode_text([QUERY]).tolist(), anns_field="vector", limit=3,
                               output_fields=["path"], search_params={"metric_type": "IP"}, ranker=ranker)[0]
    want = pipe.search(QUERY, k=3, candidates=30, mode="image")
    assert [h["entity"]["path"] for h in hits] == [h.path for h in want.hits]
    assert [h["distance"] for h in hits] == pytest.approx([h.score for h in want.hits], abs=1e-4)
