"""Recall@K of the first stage and of the reranked list, on a table's captions.

A query is a caption of the table; its relevant images are those of every row with that exact
caption. The gallery is the whole collection (the table's images are indexed first if needed).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .decode import content_hash, item_id
from .errors import InputError
from .progress import progress_bar
from .query import Query, encode_queries, validate_query
from .search import first_stage, plan_search, resolve_mode
from .search import rerank as rerank_hits
from .tables import read_table, resolve_path

log = logging.getLogger(__name__)

KS = (1, 5, 10)


def load_queries(table: str | Path) -> dict[str, set[str]]:
    """caption -> ids of its relevant images (content ids, as in the collection)."""
    table = Path(table).expanduser().resolve()
    df = read_table(table)
    if "caption" not in df.columns:
        raise InputError(f"table {table} has no 'caption' column; evaluation needs captions as queries")
    df = df[df["caption"].notna() & (df["caption"].astype(str).str.strip() != "")]
    if df.empty:
        raise InputError(f"table {table} has no rows with a caption to evaluate")
    relevant: dict[str, set[str]] = defaultdict(set)
    ids: dict[str, str] = {}
    for path_cell, caption in zip(df["path"], df["caption"].astype(str)):
        path = str(resolve_path(table, path_cell))
        if path not in ids:
            try:
                ids[path] = item_id(content_hash(Path(path).read_bytes()))
            except OSError as e:
                log.warning("eval: skipping %s (%s)", path, e.strerror)
                continue
        relevant[caption].add(ids[path])
    return dict(relevant)


def recall(ranked: list[list[str]], relevant: list[set[str]], ks=KS) -> dict[str, float]:
    """Fraction of queries with a relevant id in the top k, for each k."""
    n = len(ranked)
    return {f"R@{k}": round(sum(bool(rel.intersection(r[:k])) for r, rel in zip(ranked, relevant)) / n, 4) for k in ks}


def evaluate(pipeline: Any, table: str | Path, *, candidates: int = 100, rerank: bool | None = None, index: bool = True,
             progress: bool | None = None, batch: int = 64, mode: str = "image") -> dict[str, Any]:
    """The ``mmr eval --json`` document. Each caption is searched the way ``mmr search`` does it
    (:mod:`mm_retrieval.search`; the captions are encoded ``batch`` at a time): recall of the first
    stage's top 10, and of the reranked top ``candidates``. ``rerank``: None reranks when the
    pipeline has a reranker and ``mode`` allows it (image, hybrid); True insists (InputError
    naming why it can't); False never reranks."""
    t0 = time.perf_counter()
    queries = load_queries(table)
    captions = _usable(queries)  # a table with no usable query fails before anything is indexed
    if index:
        pipeline.index(table, progress=progress)
    relevant = [queries[c] for c in captions]
    plan = plan_search(pipeline.config.search, kind="text", has_reranker=pipeline.config.reranker is not None, mode=mode,
                       k=max(KS), candidates=candidates, rerank=rerank)
    store, encoder, facts = pipeline.store, pipeline.encoder, pipeline.collection_facts
    facts.check(encoder)
    mode = resolve_mode(plan, facts)
    reranker = pipeline.reranker if plan.rerank else None
    if reranker is not None:
        reranker.warm_up()
    first: list[list[Any]] = []
    reranked: list[list[Any]] = []
    bar = progress_bar(len(captions), progress, unit="query", desc="evaluating")
    for s in range(0, len(captions), batch):
        batch_queries = [Query(c, encoder) for c in captions[s : s + batch]]
        encode_queries(batch_queries)  # one forward per batch: embeddings and the token features a reranker reads
        hits = first_stage(store, plan, mode, np.stack([q.embedding() for q in batch_queries]))
        first.extend(hits)
        if reranker is not None:  # the reranker sees the top `candidates`, as in mmr search
            reranked.extend(rerank_hits(plan, mode, reranker, q, h[:candidates]) for q, h in zip(batch_queries, hits))
        bar.update(len(batch_queries))
    bar.close()
    return {
        "n_queries": len(captions),
        "gallery": store.count(),
        "mode": mode,
        "first_stage": recall([[h.id for h in hits] for hits in first], relevant),
        "candidates": candidates,
        "reranked": recall([[h.id for h in hits] for hits in reranked], relevant) if reranker is not None else None,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _usable(queries: dict[str, set[str]]) -> list[str]:
    """The captions that are usable queries (a caption over the query length limit is skipped)."""
    usable = []
    for caption in queries:
        try:
            validate_query(caption)
        except InputError as e:
            log.warning("eval: skipping caption %r: %s", caption[:60], e)
            continue
        usable.append(caption)
    if not usable:
        raise InputError("no caption of the table is a usable query")
    return usable
