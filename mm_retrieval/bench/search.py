"""Suite ``search``: the first stage against a raw ``MilvusClient.search`` and against exact search.

For each collection size (synthetic L2-normalised vectors, dim 512, inserted through our
``MilvusStore.upsert`` with fake ids and paths) and index type:

* **latency**: p50/p95 of three ways to run the same query with the same parameters, interleaved
  query by query: a raw ``MilvusClient.search`` (query already a list of floats, same output fields
  and search params, no filter: what a plain client would send), the same with the row filter our
  store adds (to attribute overhead), our ``MilvusStore.search``, and ``Pipeline.search`` with a stand-in encoder
  that returns the precomputed query vector (the pipeline path minus text encoding: validation,
  the store call, building hits; the collection is checked once per pipeline, before the clock).
  Overhead = ours / raw - 1 (target <= 10%). A lone ``has_collection`` call is timed beside them
  for scale (the per-query round trip both paths made before).
* **recall@10**: the store's top 10 against exact top 10 by numpy inner product on the same
  vectors (target >= 0.99).
* **grouping by video only with videos**: the collections hold no video, so searches no longer
  run Milvus' grouping search (``group_by_video``, on by default); the store as it was (grouping
  whenever asked, :func:`always_grouping`) is timed beside it, on the synthetic collections and on
  the 8-image demo collection with 100 candidates, where grouping also asked again for more
  groups than the collection has.
* **the CLI through a running server** (:func:`cli_via_server`): ``mmr search``, ``mmr eval`` and
  ``mmr explain`` as new processes, answered by ``mmr serve`` on the same database, vs the same
  commands loading the models themselves.

Vectors come from a mixture of Gaussian clusters (embeddings cluster by content; uniformly random
vectors in 512 dimensions have no near neighbours, which says little about real collections), and
queries are fresh draws from the same mixture. Milvus Lite accepts several index types; whether it
really builds them is checked by recall and by an HNSW run with a deliberately small ``ef``.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..stages.base import Encoder
from .timing import clock, figure, interleaved, summary

log = logging.getLogger(__name__)

DIM = 512
FINGERPRINT = "bench-synthetic-vectors"
QUERY_TEXT = "synthetic query"  # what Pipeline.search validates; the stand-in encoder ignores it


@dataclass(frozen=True)
class SearchSizes:
    sizes: tuple[int, ...]
    queries: int  # for recall
    rounds: int  # latency samples per method
    limits: tuple[int, ...] = (10, 100)  # k without a reranker; candidates with one
    index_types: tuple[str, ...] = ("AUTOINDEX", "HNSW")
    settle_probes: int = 3  # raw searches timed before and after the flush
    settle_after_s: tuple[float, ...] = (5, 10, 20, 30)  # probes again this long after the flush (index builds meanwhile)


def sizes_for(quick: bool) -> SearchSizes:
    if quick:
        return SearchSizes(sizes=(1000,), queries=10, rounds=5, limits=(10,), settle_after_s=())
    return SearchSizes(sizes=(10_000, 100_000), queries=200, rounds=60)


INDEX_PARAMS = {
    "AUTOINDEX": ({}, {}),
    "HNSW": ({"M": 16, "efConstruction": 200}, {"ef": 128}),
}
HNSW_SMALL_EF = 10  # far too small for recall 0.99: if recall stays at 1.0, the index is not HNSW


def synthetic(n: int, seed: int, clusters: int = 256, spread: float = 0.7) -> np.ndarray:
    """[n, DIM] float32 L2-normalised vectors from a mixture of ``clusters`` Gaussian blobs."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).standard_normal((clusters, DIM)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class VectorEncoder(Encoder):
    """Stand-in text encoder for timing the pipeline's search path without a model: returns the
    vector set on :attr:`vector`."""

    stage_kind, stage_name = "encoder", "bench_vectors"
    dim = DIM
    fingerprint = FINGERPRINT
    vector: np.ndarray | None = None

    def encode_text(self, texts):
        return self.vector[None, :]

    def encode_text_tokens(self, texts, *, with_tokens=True):  # pragma: no cover - never reranks
        raise NotImplementedError

    def encode_pixels(self, pixels, *, with_tokens=False):  # pragma: no cover - never indexes images
        raise NotImplementedError

    @property
    def image_transform(self):  # pragma: no cover
        raise NotImplementedError


def run(workdir: Path, device: str, quick: bool = False, sizes: SearchSizes | None = None) -> dict[str, Any]:
    """Run the suite in ``workdir``; returns its JSON section. (``device`` is unused: Milvus Lite
    searches on the CPU; it is recorded for completeness.)"""
    sizes = sizes or sizes_for(quick)
    queries = synthetic(sizes.queries, seed=1)
    results = []
    for n in sizes.sizes:
        data = synthetic(n, seed=0)
        exact = np.argsort(-(queries @ data.T), axis=1)[:, :10]  # exact top 10 per query
        results.extend(_size(workdir, n, data, queries, exact, sizes))
    return {
        "dim": DIM,
        "vectors": "Gaussian mixture (256 clusters), L2-normalised; queries drawn from the same mixture",
        "milvus": "Milvus Lite (embedded), metric IP",
        "results": results,
        "cli_via_server": cli_via_server(workdir, rounds=3 if quick else 7, grouping_rounds=sizes.rounds),
    }


def always_grouping(store: Any) -> Any:
    """``store``'s collection through the store as it was before the collection's video fact:
    every search asked to group by video ran Milvus' grouping search, videos or not (the "before"
    of the grouping figures). Close it when done (Milvus Lite is released by its last user)."""
    from ..stages.stores.milvus import MilvusStore

    class GroupingAlways(MilvusStore):
        def holds_video(self) -> bool:
            return "media_id" in self._schema_fields()

    before = GroupingAlways(store.config)
    before.warm_up()
    return before


def cli_via_server(workdir: Path, *, rounds: int, grouping_rounds: int) -> dict[str, Any]:
    """Wall seconds of ``mmr search --json`` in a new process (interpreter start to exit) on the
    demo collection (8 images, ``mmr-tiny``; ``others``: ``mmr eval`` of 8 captions and ``mmr
    explain`` of one image, both reranked): answered by a running server announced for the
    database (:mod:`mm_retrieval.server.discovery`), against the same command loading the model
    itself once the server has stopped, and ``mmr --version`` (the interpreter and CLI import
    floor). Also the first stage with 100 candidates on that collection, grouped as before vs now."""
    import os
    import subprocess
    import sys

    from ..server.app import create_app
    from ..server.background import BackgroundServer
    from ..server.discovery import Advert, advertise, resolved_ref
    from ..server.engine import Engine
    from ..server.testing import make_demo_collection

    demo = make_demo_collection(workdir / "cli-via-server")
    mmr = [sys.executable, "-m", "mm_retrieval"]
    command = [*mmr, "search", "a red picture", "--db", demo.db, "--json"]
    table = Path(demo.root) / "captions.csv"  # a caption per image, for `mmr eval`
    table.write_text("path,caption\n" + "".join(f"{p},a {Path(p).stem} picture\n" for p in demo.paths))
    rerank = ["--db", demo.db, "--rerank", str(demo.checkpoint)]
    described = {"eval": "mmr eval CAPTIONS --db DEMO --rerank CK --no-index --json (8 captions, reranked)",
                 "explain": "mmr explain 'a red picture' IMAGE --db DEMO --rerank CK -o PNG --json"}
    others = {"eval": [*mmr, "eval", str(table), *rerank, "--no-index", "--json"],
              "explain": [*mmr, "explain", "a red picture", demo.paths[0], *rerank, "-o", str(Path(demo.root) / "explain.png"), "--json"]}

    def wall(args: list[str]) -> float:
        t = time.perf_counter()
        done = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {done.stderr[-500:]}")
        return time.perf_counter() - t

    pipe = demo.pipeline(rerank=True)  # the server reranks; `mmr search` without --rerank does not ask it to
    grouping = _demo_grouping(pipe, grouping_rounds)
    advert: dict[str, Advert] = {}
    server = BackgroundServer(create_app(Engine(pipe), announce=lambda: advertise(advert["it"])))
    advert["it"] = Advert(url=server.url, pid=os.getpid(), db=demo.db, collection=demo.collection,
                          reranker=resolved_ref(str(demo.checkpoint)))
    with server:
        via = [wall(command) for _ in range(rounds)]
        others_via = {name: [wall(c) for _ in range(rounds)] for name, c in others.items()}
    pipe.close()  # Milvus Lite admits one process: the next commands open the database themselves
    floor = [wall([sys.executable, "-m", "mm_retrieval", "--version"]) for _ in range(rounds)]
    loading = [wall(command) for _ in range(max(1, rounds // 3))]
    others_loading = {name: [wall(c) for _ in range(max(1, rounds // 3))] for name, c in others.items()}
    return {
        "command": "mmr search 'a red picture' --db DEMO --json (a new process each)",
        "via_server_s": summary(via), "loads_model_s": summary(loading), "mmr_version_s": summary(floor),
        "speedup": figure(statistics.median(loading), "s", "via a running server", statistics.median(via)),
        # `mmr eval` (8 captions, reranked) and `mmr explain` (one indexed image) the same way
        "others": {name: {"command": described[name], "via_server_s": summary(others_via[name]),
                          "loads_model_s": summary(others_loading[name]),
                          "speedup": figure(statistics.median(others_loading[name]), "s", "via a running server",
                                            statistics.median(others_via[name]))}
                   for name, c in others.items()},
        "target_s": 1.0, "load_avg_1m": os.getloadavg()[0], "demo_grouping": grouping,
    }


def _demo_grouping(pipe: Any, rounds: int) -> dict[str, Any]:
    """First stage with 100 candidates on the demo collection (no video): grouping as before
    (fewer groups than asked, so the store asked again for more) vs the store now."""
    store = pipe.store
    before = always_grouping(store)
    first = next(store.iter_rows(("id",)))["id"]
    vector = np.asarray(store.get([first], ["vector"])[0]["vector"], dtype=np.float32)[None]
    samples = interleaved({"before_grouped": lambda: before.search(vector, 100, group_by_media=True),
                           "now": lambda: store.search(vector, 100, group_by_media=True)}, rounds, "cpu", warmup=2)
    stats = {name: summary(s) for name, s in samples.items()}
    before.close()
    return {**stats, "now_vs_before": figure(stats["now"]["p50_ms"], "ms p50", "grouping search as before",
                                              stats["before_grouped"]["p50_ms"], ratio_is="now / before")}


def _size(workdir: Path, n: int, data: np.ndarray, queries: np.ndarray, exact: np.ndarray,
          sizes: SearchSizes) -> list[dict[str, Any]]:
    """Insert ``n`` vectors once through our store, then measure each index type on them
    (re-indexing the same collection, so every index type sees the same segments)."""
    first = sizes.index_types[0]
    pipe = _pipeline(workdir, n, first)
    store = pipe.store
    store.drop()
    store.ensure_collection(VectorEncoder().info())
    t = time.perf_counter()
    ids = [format(i, "032x") for i in range(n)]
    store.upsert([{"id": ids[i], "vector": data[i], "path": f"/synthetic/{i}.jpg", "metadata": {"i": i}} for i in range(n)])
    insert_s = time.perf_counter() - t
    settle = _settle(store, queries, sizes)  # flushes (as an index run ends)
    out = []
    for index_type in sizes.index_types:
        if index_type != first:
            _reindex(store, index_type)
            pipe = _pipeline(workdir, n, index_type)
        res = _measure(pipe, workdir, n, queries, exact, sizes)
        res = {"vectors": n, "index_type": index_type, "insert_s": round(insert_s, 2),
               "insert_vectors_per_s": round(n / insert_s, 1), **res}
        if index_type == first:
            res["before_flush"] = settle
        out.append(res)
        log.info("bench search: %s", {k: res[k] for k in ("vectors", "index_type", "recall@10")})
    store.drop()
    return out


def _pipeline(workdir: Path, n: int, index_type: str, search_params: dict[str, Any] | None = None):
    from ..pipeline import Pipeline

    index_params, default_search = INDEX_PARAMS[index_type]
    store_cfg = {"index_type": index_type, "index_params": index_params,
                 "search_params": default_search if search_params is None else search_params}
    return Pipeline(db=str(workdir / "search.db"), collection=f"vectors_{n}", store=store_cfg, encoder=VectorEncoder())


def _settle(store: Any, queries: np.ndarray, sizes: SearchSizes) -> dict[str, Any]:
    """Raw search latency on freshly upserted rows (growing segments: what an index run left on
    Milvus Lite while ``MilvusStore.flush`` skipped local databases), after ``MilvusStore.flush``
    (what an index run now ends with), and after a release + load. Milvus Lite searches growing
    segments by brute force, so everything after this is measured flushed."""
    client, name = store.client, store.name
    params = {"metric_type": store.config.metric, "params": dict(store.config.search_params)}
    def probe():
        return summary([clock(lambda: client.search(name, data=[queries[i].tolist()], limit=10, search_params=params), "cpu")[0]
                        for i in range(sizes.settle_probes)])

    unflushed = probe()
    flush_s = clock(store.flush, "cpu")[0]
    start = time.perf_counter()
    flushed = probe()
    # Milvus Lite builds the sealed segments' index in the background: latency falls further
    # over the next seconds without any other call.
    later = []
    for wait in sizes.settle_after_s:
        time.sleep(max(0.0, wait - (time.perf_counter() - start)))
        later.append({"after_s": wait, **probe()})
    reload_s = clock(lambda: (client.release_collection(name), client.load_collection(name)), "cpu")[0]
    return {
        "raw_search_unflushed": unflushed, "flush_s": round(flush_s, 2), "raw_search_flushed": flushed,
        "raw_search_after_flush": later,
        "release_load_s": round(reload_s, 2), "raw_search_flushed_reloaded": probe(),
        "note": "'unflushed': rows as upserted (what Pipeline.index left before it flushed Milvus Lite); "
                "'flushed': after MilvusStore.flush(), which an index run ends with",
    }


def _reindex(store: Any, index_type: str) -> None:
    """Replace the vector index of the collection (same data) with ``index_type``."""
    client, name = store.client, store.name
    index_params, _ = INDEX_PARAMS[index_type]
    client.release_collection(name)
    client.drop_index(name, "vector")
    ip = client.prepare_index_params()
    ip.add_index(field_name="vector", index_type=index_type, metric_type=store.config.metric, params=dict(index_params))
    client.create_index(name, ip)
    client.load_collection(name)


def _measure(pipe: Any, workdir: Path, n: int, queries: np.ndarray, exact: np.ndarray, sizes: SearchSizes) -> dict[str, Any]:
    store = pipe.store
    t = time.perf_counter()
    hits = store.search(queries, 10)
    batch_s = time.perf_counter() - t
    out: dict[str, Any] = {
        "index_params": dict(store.config.index_params), "search_params": dict(store.config.search_params),
        "index_reported": _describe_index(store),
        "recall@10": round(_recall(hits, exact), 4),
        "recall_against": "exact numpy inner-product top 10 on the same vectors",
        "batch_search_ms_per_query": round(batch_s * 1000 / len(queries), 3),
    }
    if store.config.index_type == "HNSW":
        small = _pipeline(workdir, n, "HNSW", {"ef": HNSW_SMALL_EF}).store
        out["recall@10_with_small_ef"] = {"ef": HNSW_SMALL_EF, "recall@10": round(_recall(small.search(queries, 10), exact), 4)}
    out["latency"] = {str(limit): _latency(pipe, store, pipe.encoder, queries, limit, sizes.rounds) for limit in sizes.limits}
    return out


def _recall(hits: list, exact: np.ndarray) -> float:
    found = [{int(h.id, 16) for h in row[:10]} for row in hits]
    return float(np.mean([len(f.intersection(e.tolist())) / 10 for f, e in zip(found, exact)]))


def _describe_index(store: Any) -> dict[str, Any] | None:
    try:
        info = store.client.describe_index(store.name, "vector")
    except Exception as e:  # only informative: record why
        return {"error": str(e)[:200]}
    return {k: info.get(k) for k in ("index_type", "indexed_rows", "total_rows", "state") if k in info}


def _latency(pipe: Any, store: Any, encoder: VectorEncoder, queries: np.ndarray, limit: int, rounds: int) -> dict[str, Any]:
    """Interleaved p50/p95 of raw client, our store and the pipeline path, same query per round."""
    from ..stages.stores.milvus import HIT_FIELDS, MODE_FIELDS

    client, name = store.client, store.name
    params = {"metric_type": store.config.metric, "params": dict(store.config.search_params)}
    as_lists = [q.tolist() for q in queries]  # the raw caller hands the client plain lists
    state = {"i": 0}
    encode_ms: list[float] = []

    def q():
        return state["i"] % len(queries)

    def raw():
        return client.search(name, data=[as_lists[q()]], limit=limit, filter="", output_fields=HIT_FIELDS,
                             search_params=params, anns_field="vector")

    # The same call with the row condition our store adds (``has_image == true``: text-only items
    # hold a zero image vector): attributes our overhead to that filter or to our own code.
    only = MODE_FIELDS["image"][1] if store.has_text_vectors() else ""

    def raw_filtered():
        return client.search(name, data=[as_lists[q()]], limit=limit, filter=only, output_fields=HIT_FIELDS,
                             search_params=params, anns_field="vector")

    def ours():
        return store.search(queries[q()][None, :], limit)

    grouping = always_grouping(store)

    def grouped_before():  # what the pipeline's first stage ran before: group_by_video is on by default
        return grouping.search(queries[q()][None, :], limit, group_by_media=True)

    def pipeline():
        encoder.vector = queries[q()]
        res = pipe.search(QUERY_TEXT, k=limit, rerank=False)
        encode_ms.append(res.timings_ms["encode"])
        return res

    def next_query():
        state["i"] += 1

    samples = interleaved({
        "raw_client": raw, "raw_client_with_store_filter": raw_filtered, "store": ours, "pipeline": pipeline,
        "store_grouped_before": grouped_before,
        # one has_collection round trip: what the store and the pipeline each made per query before
        # they checked the collection once (for scale; not part of either path any more)
        "has_collection_rpc": lambda: client.has_collection(name),
    }, rounds, "cpu", warmup=3, after_round=next_query)
    # The pipeline's own encode time (the stand-in's, microseconds) is subtracted: "minus text
    # encoding". One pipeline call per round, after the warm-up calls.
    samples["pipeline"] = [s - e / 1000.0 for s, e in zip(samples["pipeline"], encode_ms[-rounds:])]
    grouping.close()
    stats = {name: summary(s) for name, s in samples.items()}
    raw_p50 = stats["raw_client"]["p50_ms"]
    return {
        **stats,
        "store_vs_raw": figure(stats["store"]["p50_ms"], "ms p50", "raw MilvusClient.search p50", raw_p50,
                               ratio_is="ours / raw", overhead_pct=round(100 * (stats["store"]["p50_ms"] / raw_p50 - 1), 2)),
        "pipeline_vs_raw": figure(stats["pipeline"]["p50_ms"], "ms p50", "raw MilvusClient.search p50", raw_p50,
                                  ratio_is="ours / raw", overhead_pct=round(100 * (stats["pipeline"]["p50_ms"] / raw_p50 - 1), 2)),
        # the pipeline's first stage, grouped by video by default: now plain on a collection without video
        "store_now_vs_grouped_before": figure(stats["store"]["p50_ms"], "ms p50", "the store's grouping search (before)",
                                              stats["store_grouped_before"]["p50_ms"], ratio_is="now / before"),
    }
