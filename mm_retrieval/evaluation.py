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
    captions = usable_captions(queries)  # a table with no usable query fails before anything is indexed
    if index:
        pipeline.index(table, progress=progress)
    run = EvalRun(pipeline, candidates=candidates, rerank=rerank, mode=mode)
    bar = progress_bar(len(captions), progress, unit="query", desc="evaluating")
    for s in range(0, len(captions), batch):
        run.rank(captions[s : s + batch])
        bar.update(len(captions[s : s + batch]))
    bar.close()
    return {**run.report([queries[c] for c in captions], gallery=pipeline.store.count()),
            "seconds": round(time.perf_counter() - t0, 2)}


class EvalRun:
    """The ranked lists of an evaluation, a batch of captions at a time: planned and checked once
    (:func:`mm_retrieval.search.plan_search`), each batch encoded in one forward. ``mmr eval``
    runs it in process; ``mmr serve`` runs it for ``POST /eval`` (a batch per turn on its device)."""

    def __init__(self, pipeline: Any, *, candidates: int = 100, rerank: bool | None = None, mode: str = "image"):
        self.plan = plan_search(pipeline.config.search, kind="text", has_reranker=pipeline.config.reranker is not None, mode=mode,
                                k=max(KS), candidates=candidates, rerank=rerank)
        self.store, self.encoder = pipeline.store, pipeline.encoder
        pipeline.collection_facts.check(self.encoder)
        self.mode = resolve_mode(self.plan, pipeline.collection_facts)
        self.reranker = pipeline.reranker if self.plan.rerank else None
        if self.reranker is not None:
            self.reranker.warm_up()
        self.candidates = candidates
        self.first: list[list[str]] = []  # per caption, ids by first-stage rank
        self.reranked: list[list[str]] = []  # per caption, ids by reranked rank (with a reranker)

    def rank(self, captions: list[str]) -> None:
        """Search ``captions`` (one batch: one forward of the text encoder)."""
        batch_queries = [Query(c, self.encoder) for c in captions]
        encode_queries(batch_queries)  # one forward per batch: embeddings and the token features a reranker reads
        hits = first_stage(self.store, self.plan, self.mode, np.stack([q.embedding() for q in batch_queries]))
        self.first.extend([h.id for h in found] for found in hits)
        if self.reranker is not None:  # the reranker sees the top `candidates`, as in mmr search
            for q, found in zip(batch_queries, hits):
                self.reranked.append([h.id for h in rerank_hits(self.plan, self.mode, self.reranker, q, found[: self.candidates])])

    def report(self, relevant: list[set[str]], *, gallery: int) -> dict[str, Any]:
        """The ``mmr eval --json`` document but its ``seconds``, ``relevant`` in the order ranked."""
        return {
            "n_queries": len(self.first),
            "gallery": gallery,
            "mode": self.mode,
            "first_stage": recall(self.first, relevant),
            "candidates": self.candidates,
            "reranked": recall(self.reranked, relevant) if self.reranker is not None else None,
        }


def usable_captions(queries: dict[str, set[str]]) -> list[str]:
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
