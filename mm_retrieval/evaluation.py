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
from .stages.fusion import rerank_hits
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


def evaluate(pipeline: Any, table: str | Path, *, candidates: int = 100, rerank: bool = True, index: bool = True,
             progress: bool | None = None, batch: int = 64, mode: str = "image") -> dict[str, Any]:
    """The ``mmr eval --json`` document. ``rerank`` needs a reranker in the pipeline; it applies
    in image and hybrid modes (text queries, image candidates)."""
    t0 = time.perf_counter()
    if index:
        pipeline.index(table, progress=progress)
    queries = load_queries(table)
    captions = list(queries)
    relevant = [queries[c] for c in captions]
    store, encoder = pipeline.store, pipeline.encoder
    store.require()
    encoder.warm_up()
    store.check_compatible(encoder.info())
    mode = pipeline._resolve_mode(mode)
    depth = max(candidates, max(KS))
    reranker = pipeline.reranker if rerank and mode in ("image", "hybrid") else None
    opts = pipeline.config.search
    first: list[list[Any]] = []
    for s in range(0, len(captions), batch):
        vecs = encoder.encode_text(captions[s : s + batch])
        if mode == "hybrid":
            first.extend(store.hybrid_search(v, depth, ranker=opts.hybrid_ranker, weights=tuple(opts.hybrid_weights),
                                             rrf_k=opts.rrf_k, images_only=reranker is not None) for v in vecs)
        else:
            first.extend(store.search(vecs, depth, mode=mode))
    doc: dict[str, Any] = {
        "n_queries": len(captions),
        "gallery": store.count(),
        "mode": mode,
        "first_stage": recall([[h.id for h in hits] for hits in first], relevant),
        "candidates": candidates,
    }
    if reranker is not None:
        reranked = [rerank_hits(reranker, c, hits[:candidates], max(KS), mode=mode, search=opts)
                    for c, hits in zip(captions, first)]
        doc["reranked"] = recall([[h.id for h in hits] for hits in reranked], relevant)
    else:
        doc["reranked"] = None
    doc["seconds"] = round(time.perf_counter() - t0, 2)
    return doc
