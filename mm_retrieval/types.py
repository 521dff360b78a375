"""Plain data passed between stages."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Record:
    """One item a source offers for indexing: an image file and its text/metadata."""

    path: Path  # absolute
    caption: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Failure:
    """A file that could not be indexed, and why."""

    path: str
    error: str


@dataclass
class Hit:
    """One search result. ``score`` is the final score (the reranker's when reranked, else the
    first stage's); ``retrieval_score`` is always the first stage's similarity."""

    id: str
    path: str
    score: float
    retrieval_score: float
    caption: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "id": self.id,
            "path": self.path,
            "score": self.score,
            "retrieval_score": self.retrieval_score,
            "caption": self.caption,
            "metadata": self.metadata,
        }


@dataclass
class SearchResult:
    """What a search returns; :meth:`to_dict` is the ``mmr search --json`` document."""

    query: str
    hits: list[Hit]
    timings_ms: dict[str, float]
    reranked: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "hits": [h.to_dict() for h in self.hits],
            "reranked": self.reranked,
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }


@dataclass
class IndexReport:
    """What an index run did; :meth:`to_dict` is the ``mmr index --json`` document.

    ``indexed``: items written (new or changed); ``unchanged``: already in the collection;
    ``duplicates``: files whose content equals another file's (stored once);
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
    seconds: float = 0.0
    plan: dict[str, Any] | None = None  # what a dry run would do

    @property
    def skipped(self) -> int:
        return len(self.failed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "indexed": self.indexed,
            "skipped": self.skipped,
            "failed": [asdict(f) for f in self.failed],
            "unchanged": self.unchanged,
            "duplicates": self.duplicates,
            "replaced": self.replaced,
            "moved": self.moved,
            "removed": self.removed,
            "seconds": round(self.seconds, 3),
            **({"plan": self.plan} if self.plan is not None else {}),
        }
