"""The pipeline: stages wired together for indexing and searching.

:class:`Pipeline` is the Python API; the CLI is a thin layer over it::

    from mm_retrieval import Pipeline
    p = Pipeline(db="./mmr.db", model="ViT-B-32")
    p.index("photos/")
    for hit in p.search("a dog on a beach", k=5).hits:
        print(hit.rank, hit.score, hit.path)
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import registry
from .config import PipelineConfig, SearchConfig, StageSpec, config_from_dict, prune_none
from .errors import ConfigError, InputError
from .stages.base import Encoder, Reranker, Source, Store, encode_files
from .tables import TABLE_EXTENSIONS
from .types import Failure, IndexReport, Record, SearchResult

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 2000
MAX_CANDIDATES = 16384  # Milvus' top-k limit


def validate_query(query: Any) -> str:
    """A usable text query, or InputError saying what is wrong with it."""
    if not isinstance(query, str):
        raise InputError(f"query must be text, got {type(query).__name__}")
    q = query.strip()
    if not q:
        raise InputError("the query is empty; give some words to search for, e.g. mmr search \"a red bicycle\"")
    if len(q) > MAX_QUERY_CHARS:
        raise InputError(f"the query is {len(q):,} characters long; the limit is {MAX_QUERY_CHARS:,}. Shorten it.")
    if "\x00" in q:
        raise InputError("the query contains a NUL character; pass plain text")
    return q


def open_source(source: str | Path | Source) -> Source:
    """A folder -> ``source/folder``; a .csv/.parquet/.jsonl file -> ``source/table``."""
    if isinstance(source, Source):
        return source
    p = Path(source).expanduser()
    if p.is_dir():
        return registry.create("source", "folder", {"path": str(p)})
    if p.is_file():
        if p.suffix.lower() in TABLE_EXTENSIONS:
            return registry.create("source", "table", {"path": str(p)})
        raise InputError(f"{p} is neither a folder nor a table ({', '.join(TABLE_EXTENSIONS)}); pass a folder of images or a table")
    raise InputError(f"source not found: {p}")


class Pipeline:
    """Index and search one collection. Stages are created lazily from the config.

    Keyword overrides (``db``, ``collection``, ``model``, ``pretrained``, ``device``, ``token``)
    take precedence over ``config``; ``None`` means "not given".
    """

    def __init__(
        self,
        config: PipelineConfig | str | Path | None = None,
        *,
        db: str | None = None,
        collection: str | None = None,
        token: str | None = None,
        model: str | None = None,
        pretrained: str | None = None,
        device: str | None = None,
        encoder: dict[str, Any] | None = None,
        store: dict[str, Any] | None = None,
        reranker: str | dict[str, Any] | None = None,
        cache_tokens: bool = True,
    ):
        if config is None:
            config = PipelineConfig()
        elif not isinstance(config, PipelineConfig):
            config = PipelineConfig.load(config)
        enc = config.encoder.with_params({**(encoder or {}), **prune_none({"model": model, "pretrained": pretrained, "device": device})})
        sto = config.store.with_params({**(store or {}), **prune_none({"uri": db, "collection": collection, "token": token})})
        rer = config.reranker
        if isinstance(reranker, str):
            reranker = {"checkpoint": reranker}
        if reranker:
            rer = (rer or StageSpec("reranker", "cross_attention")).with_params(reranker)
        if rer is not None and device is not None:
            rer = rer.with_params({"device": device})
        self.config = replace(config, encoder=enc, store=sto, reranker=rer)
        self.cache_tokens = cache_tokens  # index runs write image tokens for the reranker
        self._encoder: Encoder | None = None
        self._store: Store | None = None
        self._reranker: Reranker | None = None

    # ---- stages ----------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        if self._store is None:
            spec = self.config.store
            self._store = registry.create("store", spec.name, spec.params)
            self._store.warm_up()
        return self._store

    @property
    def encoder(self) -> Encoder:
        """The configured encoder; when no model was given, the one that built the collection."""
        if self._encoder is None:
            spec = self.config.encoder
            params = dict(spec.params)
            if "model" not in params:
                stored = self.store.encoder_info() if hasattr(self.store, "encoder_info") else None
                if stored and stored.get("stage") == spec.name and stored.get("model"):
                    params["model"] = stored["model"]
                    params.setdefault("pretrained", stored.get("pretrained"))
                    params = prune_none(params)
            self._encoder = registry.create("encoder", spec.name, params)
        return self._encoder

    @property
    def reranker(self) -> Reranker | None:
        """The configured reranker (None when the pipeline has none)."""
        if self._reranker is None and self.config.reranker is not None:
            spec = self.config.reranker
            stage = registry.create("reranker", spec.name, spec.params)
            if hasattr(stage, "bind"):
                stage.bind(self)  # gives it the encoder, store and token cache
            self._reranker = stage
        return self._reranker

    def token_writer(self) -> Any:
        """Where an index run writes image tokens for reranking: the configured reranker's memory
        (small, keyed by encoder + reranker), else the encoder's raw patch tokens, from which any
        reranker trained later derives its memory without decoding images again."""
        if not self.cache_tokens:
            return None
        reranker = self.reranker
        if reranker is not None and hasattr(reranker, "memory_writer"):
            reranker.warm_up()
            return reranker.memory_writer()
        from .tokencache import TokenCache, TokenWriter

        fp = f"raw-{self.encoder.fingerprint}"
        return TokenWriter(TokenCache(self.store.cache_dir() / f"tokens-{fp}.sqlite", fp))

    # ---- indexing --------------------------------------------------------------------------
    def index(self, source: str | Path | Source, *, progress: bool | None = None, on_progress: Callable[[int], None] | None = None) -> IndexReport:
        """Embed and store every image of a folder or table. Idempotent: content-derived ids mean
        re-running adds nothing, a changed file replaces its old entry, a moved file keeps its id."""
        t0 = time.perf_counter()
        src = open_source(source)
        records = list(src.records())
        report = IndexReport(failed=[Failure(p, e) for p, e in src.problems])
        encoder, store = self.encoder, self.store
        encoder.warm_up()
        store.ensure_collection(encoder.info())
        tokens = self.token_writer()

        by_path: dict[str, dict[str, Any]] = {}
        id_to_path: dict[str, str] = {}
        for row in store.iter_rows(("id", "path", "file_size", "mtime_ns", "caption", "metadata")):
            by_path[row["path"]] = row
            id_to_path[row["id"]] = row["path"]

        todo: list[Record] = []
        listed: set[str] = set()
        for rec in records:
            path = str(rec.path)
            if path in listed:  # a table may list one image twice: the first row wins
                report.duplicates += 1
                continue
            listed.add(path)
            try:
                path.encode("utf-8")
            except UnicodeEncodeError:
                report.failed.append(Failure(os.fsencode(path).decode("utf-8", "replace"), "file name is not valid UTF-8; rename the file"))
                continue
            if len(path.encode("utf-8")) > 4096:
                report.failed.append(Failure(path[:200] + "...", "path longer than 4096 bytes"))
                continue
            row = by_path.get(path)
            if row is not None and _unchanged(rec, row):
                report.unchanged += 1
                continue
            todo.append(rec)

        seen: set[str] = set()
        bar = _progress(len(todo), progress)
        try:
            for items, emb, toks in encode_files(
                encoder, [str(r.path) for r in todo], known_ids=frozenset(id_to_path), with_tokens=tokens is not None
            ):
                rows, refresh, j = [], [], 0
                for it in items:
                    rec = todo[it.pos]
                    vec = None
                    if it.decoded:  # embeddings are packed in the order of decoded items
                        vec, j = j, j + 1
                    if it.error is not None:
                        report.failed.append(Failure(it.path, it.error))
                    elif it.id in seen:
                        report.duplicates += 1  # same content twice in this run
                    elif it.known:
                        self._known_item(rec, it, id_to_path, refresh, report)
                        seen.add(it.id)
                    else:
                        rows.append(_row(rec, it, emb[vec]))
                        if tokens is not None:
                            tokens.add(it.id, toks[vec])
                        seen.add(it.id)
                if tokens is not None:
                    tokens.commit()  # tokens first: a stored row never points to missing tokens
                store.upsert(rows)
                if refresh:
                    self._refresh(refresh)
                # a path that now holds new content: its old entry goes (unless that content moved)
                stale = [
                    old["id"] for r in rows
                    if (old := by_path.get(r["path"])) is not None and old["id"] != r["id"] and id_to_path.get(old["id"]) == r["path"]
                ]
                if stale:
                    store.delete(stale)
                    if tokens is not None:
                        tokens.delete(stale)
                    for s in stale:
                        id_to_path.pop(s, None)
                    report.replaced += len(stale)
                for r in rows:
                    id_to_path[r["id"]] = r["path"]
                    by_path[r["path"]] = r
                report.indexed += len(rows)
                bar.update(len(items))
                if on_progress is not None:
                    on_progress(len(items))
        finally:
            bar.close()
        store.flush()
        report.seconds = time.perf_counter() - t0
        return report

    @staticmethod
    def _known_item(rec: Record, it: Any, id_to_path: dict[str, str], refresh: list, report: IndexReport) -> None:
        """Content already indexed: a copy of a file still present, a moved file, or the same
        file with a new mtime/caption/metadata (its row is rewritten, its vector kept)."""
        path, stored = str(rec.path), id_to_path[it.id]
        if stored != path and Path(stored).exists():
            report.duplicates += 1
            return
        if stored != path:
            report.moved += 1
            id_to_path[it.id] = path
        else:
            report.unchanged += 1
        refresh.append((it.id, rec))

    def _refresh(self, refresh: list[tuple[str, Record]]) -> None:
        """Rewrite rows whose file moved or whose caption/metadata/mtime changed (vector kept)."""
        stored = {r["id"]: r for r in self.store.get([i for i, _ in refresh], fields=["id", "vector", "content_hash"])}
        rows = []
        for id_, rec in refresh:
            old = stored.get(id_)
            if old is None:
                continue
            st = _stat(rec.path)
            rows.append({"id": id_, "vector": old["vector"], "path": str(rec.path), "content_hash": old["content_hash"],
                         "caption": rec.caption, "metadata": rec.metadata, "file_size": st[0], "mtime_ns": st[1]})
        self.store.upsert(rows)

    # ---- searching -------------------------------------------------------------------------
    def search(
        self,
        query: str,
        *,
        k: int | None = None,
        candidates: int | None = None,
        filter: str = "",
        rerank: bool | None = None,
    ) -> SearchResult:
        """Text-to-image search: the first stage retrieves ``candidates``, the reranker (when
        configured and ``rerank`` is not False) rescores them, the best ``k`` are returned."""
        q = validate_query(query)
        opts = config_from_dict(SearchConfig, {**vars(self.config.search), **prune_none({"k": k, "candidates": candidates, "rerank": rerank})}, where="search options")
        if opts.k < 1 or opts.candidates < 1:
            raise InputError(f"--k and --candidates must be at least 1 (got k={opts.k}, candidates={opts.candidates})")
        if opts.candidates > MAX_CANDIDATES or opts.k > MAX_CANDIDATES:
            raise InputError(f"--k and --candidates can be at most {MAX_CANDIDATES}")
        store = self.store
        store.require()
        encoder = self.encoder
        encoder.warm_up()  # model loading is not part of the query's timings
        if not getattr(self, "_checked", False):
            store.check_compatible(encoder.info())
            self._checked = True
        reranker = self.reranker if opts.rerank else None
        if reranker is not None:
            reranker.warm_up()
        timings: dict[str, float] = {}
        t = time.perf_counter()
        vec = encoder.encode_text([q])
        timings["encode"] = (time.perf_counter() - t) * 1000
        limit = max(opts.candidates, opts.k) if reranker is not None else opts.k
        t = time.perf_counter()
        hits = store.search(vec, limit, filter)[0]
        timings["search"] = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        if reranker is not None:
            hits = reranker.rerank(q, hits, opts.k)
        else:
            hits = hits[: opts.k]
        timings["rerank"] = (time.perf_counter() - t) * 1000
        timings["total"] = timings["encode"] + timings["search"] + timings["rerank"]
        return SearchResult(query=q, hits=hits, timings_ms=timings, reranked=reranker is not None)

    def search_vectors(self, vectors: np.ndarray, limit: int, filter: str = ""):
        """The first stage alone, for precomputed query vectors."""
        return self.store.search(vectors, limit, filter)


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return 0, 0


def _unchanged(rec: Record, row: dict[str, Any]) -> bool:
    """Same path, size, mtime, caption and metadata as stored: nothing to read or write."""
    size, mtime = _stat(rec.path)
    return (
        size == row.get("file_size") and mtime == row.get("mtime_ns") and size > 0
        and (rec.caption or "") == (row.get("caption") or "")
        and (rec.metadata or {}) == (row.get("metadata") or {})
    )


def _row(rec: Record, it: Any, vector: np.ndarray) -> dict[str, Any]:
    size, mtime = _stat(rec.path)
    return {
        "id": it.id, "vector": vector, "path": str(rec.path), "content_hash": it.digest,
        "caption": rec.caption, "metadata": rec.metadata, "file_size": size, "mtime_ns": mtime,
    }


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool | None):
    if enabled is False:
        return _NoBar()
    from tqdm import tqdm

    # None: shown on a terminal, hidden in logs and pipes
    return tqdm(total=total, unit="img", desc="indexing", disable=None if enabled is None else False, dynamic_ncols=True)
