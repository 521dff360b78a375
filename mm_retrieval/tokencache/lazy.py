"""Tokens computed where they are needed: a reranker's cache filled at query time.

``mmr index --rerank BLIP --tokens lazy`` indexes at first-stage speed and writes no reranker
tokens. The first rerank that meets candidates without tokens hands them to
:meth:`LazyFill.fill`: their files are read, checked against the id (an item's id is its
content hash: a file changed since indexing would put other tokens under the id), decoded, run
through the reranker's own image side in one batch, and stored in the cache (with a budget, least
recently used items make room); the caller scores them in the same batch as the cached ones.
Every later query reads them.

A candidate whose file is gone, changed or unreadable is not an error: :meth:`LazyFill.fill`
returns why, the reranker leaves it unscored (it keeps its first-stage score and is marked), and
the reason is remembered for a minute so that a query does not read the same missing file twice.

One fill at a time per reranker (a lock): two queries missing the same candidates encode them
once; the second finds them cached.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..decode import DecodeError, content_hash, decode_image, item_id, read_regular_file
from . import TokenCache

log = logging.getLogger(__name__)

_REMEMBER = 10_000  # unreadable ids remembered
RETRY_AFTER_S = 60.0  # a file gone now may be back (a disk mounted again): look again after this


@runtime_checkable
class FillsTokens(Protocol):
    """A reranker that computes missing tokens at query time (the server fills them off its device
    thread first, so other requests are not held up by one query's encoding)."""

    def tokens_to_fill(self, hits: Sequence[Any]) -> list[Any]:
        """The hits whose tokens a rerank would compute now (none: nothing to do)."""

    def fill_tokens(self, hits: Sequence[Any], *, keep: Iterable[str] = ()) -> None:
        """Compute and store the tokens of ``hits`` (blocking; any thread)."""

    def unscored_reason(self, item_id: str) -> str | None:
        """Why a candidate was left unscored (a NaN score), or None."""


class LazyFill:
    """Fills a reranker's token cache from the candidates' files.

    ``image_side``: ``transform`` (PIL image -> [3, S, S] tensor) and ``encode`` ([n, 3, S, S]
    -> [n, *token shape] numpy), the reranker's own; ``pack``: those tokens -> the cache's stored
    fp16 arrays ([n, *stored shape]); ``batch_size``: images per image-side forward.
    """

    def __init__(self, image_side: Any, pack: Callable[[np.ndarray], np.ndarray], *, batch_size: int = 16):
        self.image_side = image_side
        self.pack = pack
        self.batch_size = batch_size
        self.lock = threading.Lock()
        #: Items encoded at query time by this instance (tests and benchmarks count them).
        self.encoded = 0
        self._unreadable: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._spare: dict[str, np.ndarray] = {}  # the last fill's arrays the budget could not keep (its scoring job reads them)

    def reason(self, item: str) -> str | None:
        """Why ``item``'s tokens could not be computed at its last try (within RETRY_AFTER_S), or None."""
        got = self._unreadable.get(item)
        if got is None or time.monotonic() - got[1] > RETRY_AFTER_S:
            return None
        return got[0]

    def fill(self, cache: TokenCache, hits: Sequence[Any], *, keep: Iterable[str] = ()) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Compute and store the tokens of ``hits`` (first-stage hits without cached tokens: ``id``,
        ``path``, ``video_id``). Returns ``({id: stored array}, {id: why not})``; ``keep``: ids the
        budget must not evict now (the rest of the query's candidates)."""
        done: dict[str, np.ndarray] = {}
        failed: dict[str, str] = {}
        todo: dict[str, Any] = {}
        spare, self._spare = self._spare, {}
        for h in hits:
            why = self.reason(h.id)
            if why is not None:
                failed[h.id] = why
            elif h.id in spare:
                done[h.id] = spare[h.id]
            else:
                todo.setdefault(h.id, h)
        ready = []
        digests: dict[str, str] = {}
        for h in todo.values():
            image, why = _read(h, digests)
            if why is not None:
                failed[h.id] = why
                self._remember(h.id, why)
            else:
                ready.append((h.id, self.image_side.transform(image)))
        if not ready:
            return done, failed
        import torch

        computed = len(done)
        for s in range(0, len(ready), self.batch_size):
            part = ready[s : s + self.batch_size]
            packed = self.pack(self.image_side.encode(torch.stack([p for _, p in part])))
            for (hid, _), arr in zip(part, packed):
                done[hid] = arr
        self.encoded += len(done) - computed
        ids = list(done)
        limit = None
        if cache.budget is not None:
            from .budget import budget_slots

            limit = budget_slots(cache.budget, cache.bytes_per_item or int(np.prod(next(iter(done.values())).shape)) * 2)
        store = ids if limit is None else ids[:limit]  # scored all the same; only what the budget holds is kept
        if len(store) < len(ids):
            log.warning("a query needed %d images' tokens computed, more than the token budget holds (%d): %d were scored "
                        "but not kept; raise --token-budget", len(ids), limit, len(ids) - len(store))
        self._spare = {hid: done[hid] for hid in ids[len(store):]}
        for hid in store:
            cache.add(hid, done[hid])
        cache.commit(keep=keep)
        return done, failed

    def _remember(self, item: str, why: str) -> None:
        self._unreadable[item] = (why, time.monotonic())
        self._unreadable.move_to_end(item)
        while len(self._unreadable) > _REMEMBER:
            self._unreadable.popitem(last=False)


def _read(hit: Any, digests: dict[str, str]) -> tuple[Any, str | None]:
    """(PIL image, None) for a hit whose file still holds what was indexed; else (None, why). A
    video moment's image is its representative frame (``hit.frame``), decoded and downscaled as
    indexing did; ``digests``: the video files hashed in this fill (one hash per video)."""
    if getattr(hit, "video_id", None) is not None:
        return _frame(hit, digests)
    if not hit.path:
        return None, "it has no file (a text-only item)"
    try:
        data = read_regular_file(hit.path)
    except FileNotFoundError:
        return None, f"its file is gone ({hit.path})"
    except (OSError, DecodeError) as e:
        return None, f"its file can't be read ({hit.path}: {e})"
    if item_id(content_hash(data)) != hit.id:
        return None, f"its file changed since it was indexed ({hit.path}; `mmr sync` updates the collection)"
    try:
        return decode_image(data), None
    except DecodeError as e:
        return None, f"its file can't be decoded ({hit.path}: {e})"


def _frame(hit: Any, digests: dict[str, str]) -> tuple[Any, str | None]:
    from ..video import VideoConfig, frame_at, hash_file

    if hit.frame is None:
        return None, "the video moment records no frame time (indexed by an older version: `mmr cache build` fills it)"
    try:
        if hit.path not in digests:
            digests[hit.path] = item_id(hash_file(hit.path))
        if digests[hit.path] != hit.video_id:
            return None, f"its video changed since it was indexed ({hit.path}; `mmr sync` updates the collection)"
        return frame_at(hit.path, float(hit.frame), side=VideoConfig().frame_side), None
    except FileNotFoundError:
        return None, f"its file is gone ({hit.path})"
    except (OSError, DecodeError) as e:
        return None, f"its video can't be read ({hit.path}: {e})"
