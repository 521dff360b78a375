"""The native API: ``POST /search``, answered with the ``mmr search --json`` document.

A search is by text (``query``), by image bytes (``image``: a ``data:image/...;base64,`` URI or
bare base64, at most ``--max-image-mb``), or by an indexed item (``image_id``) -- exactly one of
them, as ``Pipeline.search(query=..., image=..., image_id=...)``. JSON only: the image rides in the
same body as every other option, under the same body bound.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from ...search import MAX_CANDIDATES
from ..documents import check_text, image_from_base64
from ..engine import Engine

MAX_FILTER_CHARS = 4096


class SearchRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    query: Optional[str] = Field(None, description="What to look for, in words.")
    image: Optional[str] = Field(None, description="Search by an image instead: its file's bytes as data:image/...;base64,... or bare "
                                                   "base64 (at most the server's --max-image-mb). Image queries are not reranked.")
    image_id: Optional[str] = Field(None, pattern=r"^[0-9a-f]{32}$",
                                    description="Search by an indexed item's image instead (its id, as hits report it).")
    k: Optional[int] = Field(None, ge=1, le=MAX_CANDIDATES, description="Hits to return (default: the pipeline's, 10).")
    offset: int = Field(0, ge=0, lt=MAX_CANDIDATES, description="Skip this many hits (paging): ranks offset+1 .. offset+k.")
    candidates: Optional[int] = Field(None, ge=1, le=MAX_CANDIDATES, description="First-stage candidates the reranker rescores (default 100).")
    filter: str = Field("", max_length=MAX_FILTER_CHARS, description='Milvus boolean expression, e.g. metadata["year"] >= 2020.')
    rerank: Optional[bool] = Field(None, description="false: first stage only; default: rerank when the server has a reranker and it "
                                                     "applies (a text query, image or hybrid mode); true: insist (422 saying why when it can't).")
    group_by_video: Optional[bool] = Field(None, description="Default true: at most one hit per video (its best-scoring moment), so one long "
                                                             "video cannot fill the page; false: every matching moment.")
    min_score: Optional[float] = Field(None, allow_inf_nan=False, description="The hits are every one whose first-stage similarity is "
                                       "above this (Milvus range search, at most 1000) instead of a fixed top k; k and offset page through "
                                       "them (in `sort` order). Model-specific: pick it from scores of known matches (docs/collections.md: "
                                       "'Choosing --min-score').")
    sort: str = Field("", max_length=200, pattern=r"^[-A-Za-z0-9_.,]*$",
                      description="Order the hits by metadata fields instead of relevance: -taken is newest first; comma-separated "
                                  "for several; score, path and caption too. Hits without the field come last.")
    collapse_duplicates: bool = Field(False, description="true: one hit per group of near-duplicates (re-saved, resized, cropped or "
                                                         "turned copies of one photo, as `mmr duplicates` groups them), its best-ranked.")
    mode: Optional[Literal["auto", "image", "text", "hybrid", "ocr"]] = Field(
        None, description="Search image vectors, the items' text vectors, or both fused. Default auto: a text query searches both (hybrid) "
                          "when the collection holds text vectors, else image vectors. Auto for an image query searches image vectors (similar images). "
                          "ocr: the words read in the images (a collection indexed with --ocr); each hit's metadata.ocr has the words' boxes.")


class VideoRef(BaseModel):
    id: str = Field(description="The video's item id (GET /video/{id} plays it).")
    path: str


class SearchHit(BaseModel):
    rank: int
    id: str
    path: str
    score: float
    retrieval_score: float
    caption: Optional[str] = None
    metadata: dict[str, Any] = {}
    has_image: Optional[bool] = Field(None, description="Present (false) only for text-only items.")
    image_score: Optional[float] = Field(None, description="Hybrid mode: the image-vector similarity.")
    text_score: Optional[float] = Field(None, description="Hybrid mode: the text-vector similarity (absent: the item has no text).")
    rerank_score: Optional[float] = Field(None, description="Reranked: the reranker's score (hybrid mode: `score` fuses it with the text leg).")
    video: Optional[VideoRef] = Field(None, description="Present only for a moment of a video: the video it is from.")
    start: Optional[float] = Field(None, description="A video moment's start, seconds from the video's beginning.")
    end: Optional[float] = Field(None, description="A video moment's end, seconds.")
    frame: Optional[float] = Field(None, description="The time of the moment's representative frame (what /thumb/{id} shows), seconds.")
    moment: Optional[str] = Field(None, description="A video moment's span as shown, e.g. \"0:13–0:21\" (start rounded down, end up; "
                                                    "`mmr search` prints the same).")
    near_duplicates: Optional[int] = Field(None, description="With collapse_duplicates: how many near-duplicates of this hit among "
                                                             "the candidates were hidden (absent: none).")


class SearchResponse(BaseModel):
    query: str
    mode: str
    hits: list[SearchHit]
    reranked: bool
    timings_ms: dict[str, float]


async def search(engine: Engine, req: SearchRequest) -> dict:
    check_text(req.filter, "the filter", MAX_FILTER_CHARS)
    image = image_from_base64(req.image, engine.config, "image") if req.image is not None else None
    result = await engine.search(req.query, image=image, image_id=req.image_id, k=req.k, candidates=req.candidates,
                                 filter=req.filter, rerank=req.rerank, mode=req.mode, offset=req.offset,
                                 group_by_video=req.group_by_video, min_score=req.min_score, sort=req.sort,
                                 collapse_duplicates=req.collapse_duplicates)
    return result.to_dict()
