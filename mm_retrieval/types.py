"""Plain data passed between stages."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Record:
    """One item a source offers for indexing: an image file and its text/metadata."""

    path: Path | None  # absolute; None for a text-only item
    caption: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    text: str | None = None  # what gets a text vector; None: the caption

    @property
    def embed_text(self) -> str | None:
        """The text this item's text vector is computed from (None: no text vector)."""
        return self.text if self.text is not None else self.caption


@dataclass
class Failure:
    """A file that could not be indexed, and why."""

    path: str
    error: str


@dataclass
class Duplicate:
    """A listed file whose content is stored already: ``path`` is a copy of ``of`` (the same
    path when a table lists a file twice). Stored once; a rerank by ``path`` finds ``of``'s item."""

    path: str
    of: str


def clock(seconds: float) -> str:
    """A time in a video as m:ss (h:mm:ss from an hour), whole seconds as given."""
    total = max(0, int(seconds))
    h, m, sec = total // 3600, total // 60 % 60, total % 60
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def moment_text(start: float, end: float) -> str:
    """A video moment as people read it, ``0:13–0:21``: its start rounded down and its end up, so
    the span shown covers the whole moment. The one rule: the CLI prints it and the search page
    shows it as sent (each hit's ``moment``)."""
    return f"{clock(math.floor(start))}–{clock(math.ceil(end))}"


@dataclass
class Hit:
    """One search result. ``score`` is the final score: the first stage's (in hybrid mode Milvus'
    fused score) unless reranked; reranked in image mode, the reranker's; reranked in hybrid mode,
    the reranker's order fused again with the text leg (the reranker's own score is then
    ``rerank_score``). ``retrieval_score`` is always the first stage's score."""

    id: str
    path: str
    score: float
    retrieval_score: float
    caption: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    has_image: bool = True  # False for text-only items (a table row without a path)
    image_score: float | None = None  # hybrid search: the image-vector similarity (the reranker's input)
    text_score: float | None = None  # hybrid search: the text-vector similarity (None: the item has no text)
    rerank_score: float | None = None  # the reranker's own score when one scored the hit (hybrid: ``score`` is the fused one)
    # Why the reranker left this candidate unscored (e.g. lazy tokens and its file is gone): it keeps its
    # first-stage score and ranks after the scored ones. None when scored, or not reranked at all.
    not_reranked: str | None = None
    # A video segment (None for an image): the video's item id, the segment's seconds, and the
    # time of the frame whose vector and tokens it holds. ``path`` is the video file's.
    video_id: str | None = None
    start: float | None = None
    end: float | None = None
    frame: float | None = None
    # Search with collapse_duplicates: how many near-duplicates of this hit among the candidates were
    # hidden (None: none, or not collapsed).
    near_duplicates: int | None = None

    @property
    def moment(self) -> str | None:
        """A video segment's span, ``0:13–0:21`` (:func:`moment_text`); None for an image."""
        if self.video_id is None or self.start is None or self.end is None:
            return None
        return moment_text(self.start, self.end)

    @property
    def first_stage_image_score(self) -> float:
        """The image-text cosine the reranker builds on."""
        return self.retrieval_score if self.image_score is None else self.image_score

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "rank": self.rank,
            "id": self.id,
            "path": self.path,
            "score": self.score,
            "retrieval_score": self.retrieval_score,
            "caption": self.caption,
            "metadata": self.metadata,
        }
        if not self.has_image:
            doc["has_image"] = False
        for name in ("image_score", "text_score", "rerank_score", "not_reranked", "near_duplicates"):
            if getattr(self, name) is not None:
                doc[name] = getattr(self, name)
        if self.video_id is not None:  # a moment of a video: which video, and when
            doc.update({"video": {"id": self.video_id, "path": self.path}, "start": self.start, "end": self.end, "frame": self.frame,
                        "moment": self.moment})
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Hit:
        """The hit :meth:`to_dict` (``mmr search --json``, ``POST /search``) describes."""
        video = doc.get("video") or {}
        return cls(id=doc["id"], path=doc["path"], score=doc["score"], retrieval_score=doc["retrieval_score"],
                   caption=doc.get("caption"), metadata=doc.get("metadata") or {}, rank=doc.get("rank", 0),
                   has_image=doc.get("has_image", True), image_score=doc.get("image_score"), text_score=doc.get("text_score"),
                   rerank_score=doc.get("rerank_score"), not_reranked=doc.get("not_reranked"), video_id=video.get("id"), start=doc.get("start"), end=doc.get("end"),
                   frame=doc.get("frame"), near_duplicates=doc.get("near_duplicates"))


@dataclass
class AttentionMaps:
    """What a reranker attended to for one (query, image) pair: drawn by ``mmr explain`` and the
    search page. ``maps`` [layers, heads, words, gh, gw] holds attention weights over the image's
    patch grid, one map per query word (word pieces merged back into words)."""

    score: float
    retrieval_score: float
    words: list[str]
    maps: Any  # np.ndarray [layers, heads, words, gh, gw]


@dataclass
class SearchResult:
    """What a search returns; :meth:`to_dict` is the ``mmr search --json`` document."""

    query: str
    hits: list[Hit]
    timings_ms: dict[str, float]
    reranked: bool = False
    mode: str = "image"

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "mode": self.mode,
            "hits": [h.to_dict() for h in self.hits],
            "reranked": self.reranked,
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> SearchResult:
        """The result :meth:`to_dict` describes (e.g. a server's ``POST /search`` reply)."""
        return cls(query=doc["query"], hits=[Hit.from_dict(h) for h in doc["hits"]], timings_ms=dict(doc["timings_ms"]),
                   reranked=doc["reranked"], mode=doc["mode"])


@dataclass
class IndexReport:
    """What an index run did; :meth:`to_dict` is the ``mmr index --json`` document.

    ``indexed``: items written (new or changed); ``unchanged``: already in the collection;
    ``duplicates``: files whose content equals another file's (stored once), each named in
    ``duplicate_files`` with the file it copies;
    ``replaced``: stale entries removed because their file changed; ``moved``: entries whose file
    moved (same content); ``removed``: entries whose file is gone (sync); ``skipped``: unreadable
    files, each listed in ``failed`` with the reason.
    """

    indexed: int = 0
    unchanged: int = 0
    duplicates: int = 0
    replaced: int = 0
    moved: int = 0
    removed: int = 0  # entries whose file is gone (sync only)
    failed: list[Failure] = field(default_factory=list)
    duplicate_files: list[Duplicate] = field(default_factory=list)
    seconds: float = 0.0
    plan: dict[str, Any] | None = None  # what a dry run would do
    video: dict[str, Any] | None = None  # when the source lists videos: the bounds used and counts
    ray: dict[str, Any] | None = None  # a run on Ray (--ray): address, actors, resources per actor
    # with --ocr: images read, with text found, seconds spent, and files OCR failed on (indexed all the same)
    ocr: dict[str, Any] | None = None

    @property
    def skipped(self) -> int:
        return len(self.failed)

    def add_duplicate(self, path: str, of: str) -> None:
        """Count ``path`` as a copy of ``of``, and name both."""
        self.duplicates += 1
        self.duplicate_files.append(Duplicate(path, of))

    def to_dict(self) -> dict[str, Any]:
        return {
            "indexed": self.indexed,
            "skipped": self.skipped,
            "failed": [asdict(f) for f in self.failed],
            "unchanged": self.unchanged,
            "duplicates": self.duplicates,
            "duplicate_files": [asdict(d) for d in self.duplicate_files],
            "replaced": self.replaced,
            "moved": self.moved,
            "removed": self.removed,
            "seconds": round(self.seconds, 3),
            **({"plan": self.plan} if self.plan is not None else {}),
            **({"video": self.video} if self.video is not None else {}),
            **({"ray": self.ray} if self.ray is not None else {}),
            **({"ocr": self.ocr} if self.ocr is not None else {}),
        }
