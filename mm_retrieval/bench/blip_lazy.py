"""The ``blip`` suite's ``lazy`` section: BLIP tokens computed where they are needed
(``mmr index --tokens lazy``, :mod:`mm_retrieval.tokencache.lazy`).

* **index**: the indexing path (:func:`.blip_index.index_files`, Milvus upsert left out as in
  the suite's other index rows) first stage only, then ``--tokens lazy`` (the same first stage,
  plus marking the reranker's cache as lazily filled: what ``Pipeline.index`` adds), back to back
  on the same images; the eager row (BLIP tokens written while indexing) is the suite's
  ``index.<res>.with_blip``. Target: lazy within 10% of first stage only.
* **first query**: the stage's ``score`` over ``candidates`` whose tokens are not cached: each
  file read, checked, decoded, run through BLIP's vision model in one batch, stored, then
  scored; **again**: the same query (tokens read from the cache); **half cached**: the same
  candidates after half of their tokens were deleted. Scores of all three are compared with
  the eager cache's scores of the same candidates (``max_abs_diff_vs_eager``: the same fp16
  tokens and math, so 0), and the number of images each call encoded is reported.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from .timing import figure


def lazy_rows(*, checkpoint: str, device: str, encoder: Any, paths: list[Path], candidates: int, image_size: int, query: Any,
              eager_scores: np.ndarray, first_stage_scores: np.ndarray, workdir: Path, folder_store: Any) -> dict[str, Any]:
    """The section (see the module docstring). ``eager_scores``: the fp16 stage's scores of
    ``query`` for the first ``candidates`` paths from an eagerly written cache, with
    ``first_stage_scores`` as their first-stage cosines; ``folder_store(path)``: what the stage
    binds as its store (the suite runs without Milvus)."""
    from ..decode import content_hash, item_id
    from ..stages.rerankers.blip_itm import BlipItmReranker
    from ..tokencache import TokenCache
    from ..types import Hit
    from .blip_index import index_files

    folder = workdir / "blip-lazy-cache"
    shutil.rmtree(folder, ignore_errors=True)
    stage = BlipItmReranker(checkpoint=checkpoint, storage="fp16", image_size=image_size, device=device)
    stage.bind(encoder=encoder, store=folder_store(folder))
    stage.warm_up()
    try:
        first = index_files(encoder, paths)
        t0 = time.perf_counter()
        lazy = index_files(encoder, paths)
        writer = stage.token_writer()  # what Pipeline.index adds for --tokens lazy: mark the cache, load no model
        writer.cache.set_policy("lazy")
        writer.cache.close()
        lazy_s = time.perf_counter() - t0
        index = {
            "method": "encode_files (the indexing path), Milvus upsert left out; first stage only, then --tokens lazy "
                      "(the same, plus marking the BLIP cache as lazily filled), back to back",
            "first_stage_only": first.report(),
            "lazy": {**lazy.report(), "seconds_with_marking": round(lazy_s, 3)},
            "throughput": figure(lazy.images / lazy_s, "img/s", "indexing first stage only", first.images / first.seconds,
                                 ratio_is="--tokens lazy / first stage only (target >= 0.9)"),
        }

        chosen = paths[:candidates]
        ids = [item_id(content_hash(p.read_bytes())) for p in chosen]
        hits = [Hit(id=i, path=str(p), score=float(s), retrieval_score=float(s), rank=r + 1)
                for r, (i, p, s) in enumerate(zip(ids, chosen, first_stage_scores))]
        stage.query_tokens(query)  # tokenised once, as a search does before reranking
        rows: dict[str, Any] = {}

        def timed(name: str) -> np.ndarray:
            before = stage.lazy.encoded
            cpu0, t = os.times(), time.perf_counter()
            scores = stage.score(query, hits)
            wall, cpu1 = time.perf_counter() - t, os.times()
            rows[name] = {"ms": round(1000 * wall, 1), "cpu_ms": round(1000 * (cpu1.user + cpu1.system - cpu0.user - cpu0.system), 1),
                          "encoded": stage.lazy.encoded - before,
                          "max_abs_diff_vs_eager": float(np.max(np.abs(np.asarray(scores) - eager_scores[: len(hits)])))}
            return scores

        timed("first_query_uncached")
        timed("same_query_again")
        cache = TokenCache(stage.cache_path, stage.fingerprint, create=False)
        cache.delete(ids[::2])
        cache.close()
        timed("half_cached")
        again, cold = rows["same_query_again"]["ms"], rows["first_query_uncached"]["ms"]
        return {
            "candidates": len(hits), "image_size": image_size, "index": index, **rows,
            "first_vs_again": figure(cold, "ms", "the same query with its tokens cached", again,
                                     ratio_is="first (uncached) / again (cached)"),
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def lazy_lines(lz: dict[str, Any]) -> list[str]:
    """The section's lines in ``mmr bench``'s summary."""
    ix = lz["index"]
    th = ix["throughput"]
    lines = [f"        lazy tokens: index {th['value']:.2f} img/s vs first stage only {th['against_value']:.2f} -> {th['ratio']:.2f}x (target >= 0.9)"]
    for name in ("first_query_uncached", "same_query_again", "half_cached"):
        r = lz[name]
        lines.append(f"        {name.replace('_', ' ')} ({lz['candidates']} candidates): {r['ms']:.0f} ms (cpu {r['cpu_ms']:.0f} ms), "
                     f"{r['encoded']} encoded, max |score - eager| {r['max_abs_diff_vs_eager']:.2g}")
    return lines
