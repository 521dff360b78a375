"""``POST /eval``: recall of the server's pipeline on a client's captions (``mmr eval`` through a
running ``mmr serve``, which then loads no model).

The client reads its table and sends each caption with the ids of its relevant images (content
ids, computed from the files, as :func:`mm_retrieval.evaluation.load_queries` does); the server
ranks them with :class:`mm_retrieval.evaluation.EvalRun`, the code ``mmr eval`` runs in process,
one batch of captions per turn on its device so that searches keep being answered meanwhile. The
server indexes nothing: ``require_indexed`` refuses a run whose relevant images are not all in
the collection (``mmr eval`` without ``--no-index`` asks for that).
"""

from __future__ import annotations

import time
from typing import Annotated, Literal, Optional

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from ..errors import InputError
from ..query import validate_query
from ..search import MAX_CANDIDATES
from .documents import check_text
from .engine import Engine
from .errors import ApiError

MAX_EVAL_QUERIES = 100_000  # captions per request (a 32 MiB body holds about that many)
BATCH = 64  # captions per turn on the device: one text-encoder forward, as `mmr eval` does
_ID = r"^[0-9a-f]{32}$"


class EvalQuery(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    text: str = Field(description="A caption, searched as a text query.")
    relevant: list[Annotated[str, Field(pattern=_ID)]] = Field(min_length=1, description="Ids of the images it describes (32 hex characters: an item's "
                                                          "content id, as /search returns it).")


class EvalRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    queries: list[EvalQuery] = Field(min_length=1, max_length=MAX_EVAL_QUERIES)
    mode: Literal["image", "text", "hybrid"] = Field("image", description="Which vectors the first stage searches.")
    candidates: int = Field(100, ge=1, le=MAX_CANDIDATES, description="First-stage candidates the reranker rescores.")
    rerank: Optional[bool] = Field(None, description="false: first stage only; default: rerank when the server has a reranker "
                                                     "and the mode allows it; true: insist (422 saying why when it can't).")
    require_indexed: bool = Field(False, description="true: refuse (409) when some relevant id is not in the collection, "
                                                     "naming how many (the server cannot index them).")


class EvalResponse(BaseModel):
    n_queries: int
    gallery: int = Field(description="Items in the collection (every one is a candidate).")
    mode: str = Field(description="The mode searched (auto resolved).")
    first_stage: dict[str, float] = Field(description="R@1, R@5, R@10 of the first stage: the fraction of captions with a "
                                                      "relevant image in the top k.")
    candidates: int
    reranked: Optional[dict[str, float]] = Field(description="The same of the reranked list; null when not reranked.")
    seconds: float


def add_eval_route(app: FastAPI, engine: Engine) -> None:
    """Mount ``POST /eval`` on ``app``."""

    @app.post("/eval", tags=["search"], response_model=EvalResponse)
    async def evaluate(req: EvalRequest) -> dict:
        """Recall@1/5/10 of the first stage (and of the reranked list) on the captions sent: what
        `mmr eval --json` prints. Each caption is ranked as `POST /search` ranks a text query
        (same plan, same reranking rule), against the whole collection."""
        return await run_eval(engine, req)


async def run_eval(engine: Engine, req: EvalRequest) -> dict:
    from ..evaluation import EvalRun

    t0 = time.perf_counter()
    captions, relevant = [], []
    for i, q in enumerate(req.queries):
        where = f"queries[{i}]"
        check_text(q.text, f"{where}.text", engine.config.max_query_chars)
        try:
            validate_query(q.text)
        except InputError as e:
            raise ApiError(422, f"{where}.text: {e}", param="queries") from e
        captions.append(q.text)  # as given: `mmr eval` encodes its captions unchanged
        relevant.append(set(q.relevant))
    pipe = engine.pipeline
    if engine.batcher is None or not engine.ready:
        raise ApiError(503, "the server is still loading its models; retry shortly (GET /readyz says when it is ready)")
    if req.require_indexed:
        wanted = sorted(set().union(*relevant))
        found = await engine._threaded(lambda: {r["id"] for r in pipe.store.get(wanted, fields=["id"])})
        missing = len(wanted) - len(found)
        if missing:
            raise ApiError(409, f"{missing} of the {len(wanted)} images to evaluate are not in collection {pipe.store.name!r}, "
                                "and this server does not index")
    try:
        run = await engine._threaded(lambda: EvalRun(pipe, candidates=req.candidates, rerank=req.rerank, mode=req.mode))
    except ApiError as e:
        raise ApiError(422 if e.status == 400 else e.status, e.message) from e
    for s in range(0, len(captions), BATCH):  # a turn per batch: other requests' device work runs in between
        batch = captions[s : s + BATCH]
        await engine._on_device(lambda batch=batch: run.rank(batch))
    gallery = await engine._threaded(pipe.store.count)
    return {**run.report(relevant, gallery=gallery), "seconds": round(time.perf_counter() - t0, 2)}
