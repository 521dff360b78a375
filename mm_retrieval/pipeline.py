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
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import registry
from .config import PipelineConfig, SearchConfig, StageSpec, config_from_dict, prune_none
from .errors import InputError
from .stages.base import Encoder, Reranker, Source, Store
from .stages.fusion import rerank_hits
from .tables import TABLE_EXTENSIONS
from .types import IndexReport, SearchResult

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


def open_source(source: str | Path | Source, *, text_columns: list[str] | None = None) -> Source:
    """A folder -> ``source/folder``; a .csv/.parquet/.jsonl file -> ``source/table``."""
    if isinstance(source, Source):
        return source
    p = Path(source).expanduser()
    if p.is_dir():
        if text_columns:
            raise InputError("--text-columns applies to tables; a folder has no columns")
        return registry.create("source", "folder", {"path": str(p)})
    if p.is_file():
        if p.suffix.lower() in TABLE_EXTENSIONS:
            return registry.create("source", "table", {"path": str(p), "text_columns": list(text_columns or [])})
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
        self._forget_collection()

    def _forget_collection(self) -> None:
        """Forget what searches learnt about the collection once (it exists and fits the encoder,
        its search mode, whether it holds text vectors): after an index or sync run in this
        process, or a closed connection, the next search asks again."""
        self._checked = False
        self._auto_mode: str | None = None
        self._has_text = False

    def close(self) -> None:
        """Release the store connection (Milvus Lite admits one process at a time)."""
        if self._store is not None and hasattr(self._store, "close"):
            self._store.close()
        self._store = None
        self._forget_collection()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

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
    def index(self, source: str | Path | Source, *, progress: bool | None = None,
              on_progress: Callable[[int], None] | None = None, text_columns: list[str] | None = None) -> IndexReport:
        """Embed and store every image of a folder or table. Idempotent and crash-safe: ids derive
        from content, so re-running adds nothing, a changed file replaces its old entry, a moved
        file keeps its id, and a killed run resumes where it stopped (see :mod:`.indexing`)."""
        from .indexing import Indexer

        try:
            return Indexer(self, progress=progress, on_progress=on_progress).run(open_source(source, text_columns=text_columns))
        finally:
            self._forget_collection()

    def sync(self, source: str | Path | Source, *, dry_run: bool = False, progress: bool | None = None) -> IndexReport:
        """Bring the collection in step with a folder or table: add new files, replace changed
        ones, and remove entries (and cached tokens) of files under the source's folder (a
        table's folder, for a table) that are no longer listed. ``dry_run``: only report the
        plan (``report.plan``)."""
        from .indexing import Indexer

        src = open_source(source)
        scope = Path(source).expanduser().resolve()
        if scope.is_file():
            scope = scope.parent
        try:
            return Indexer(self, progress=progress).run(src, remove_missing=True, scope=scope, dry_run=dry_run)
        finally:
            self._forget_collection()

    # ---- searching -------------------------------------------------------------------------
    def search(
        self,
        query: str | None = None,
        *,
        image: str | Path | bytes | None = None,
        image_id: str | None = None,
        mode: str | None = None,
        k: int | None = None,
        candidates: int | None = None,
        filter: str = "",
        rerank: bool | None = None,
    ) -> SearchResult:
        """Search by text (``query``) or by image (``image``: a path, URL or bytes; or ``image_id``:
        an indexed item), against image vectors (``mode="image"``), the items' text vectors
        (``"text"``) or both fused by Milvus (``"hybrid"``); ``"auto"`` (the default) is hybrid when
        the collection holds text vectors, else image.

        The reranker (when configured and ``rerank`` is not False) rescores the first stage's
        ``candidates`` when the query is text and the candidates are images (image and hybrid
        modes); otherwise the first-stage order is returned (``result.reranked`` says which).
        """
        given = [x is not None for x in (query, image, image_id)]
        if sum(given) != 1:
            raise InputError("give exactly one of a text query, --image PATH_OR_URL, or an image id")
        q = validate_query(query) if query is not None else None
        opts = config_from_dict(SearchConfig, {**vars(self.config.search), **prune_none({"k": k, "candidates": candidates, "rerank": rerank, "mode": mode})}, where="search options")
        if opts.k < 1 or opts.candidates < 1:
            raise InputError(f"--k and --candidates must be at least 1 (got k={opts.k}, candidates={opts.candidates})")
        if opts.candidates > MAX_CANDIDATES or opts.k > MAX_CANDIDATES:
            raise InputError(f"--k and --candidates can be at most {MAX_CANDIDATES}")
        store = self.store
        if not self._checked:  # once per pipeline: a round trip per query costs more than ~10% at 10k vectors
            store.require()  # before loading a model; a collection dropped later fails in the store, same message
        encoder = self.encoder
        encoder.warm_up()  # model loading is not part of the query's timings
        if not self._checked:
            store.check_compatible(encoder.info())
            self._checked = True
        mode = self._resolve_mode(opts.mode)
        reranker = self.reranker if (opts.rerank and q is not None and mode in ("image", "hybrid")) else None
        if reranker is not None:
            reranker.warm_up()

        timings: dict[str, float] = {}
        t = time.perf_counter()
        if q is not None:
            vec = encoder.encode_text([q])
        elif image_id is not None:
            vec = self._stored_vector(image_id)
        else:
            vec = encode_image_query(encoder, image)
        timings["encode"] = (time.perf_counter() - t) * 1000
        limit = max(opts.candidates, opts.k) if reranker is not None else opts.k
        t = time.perf_counter()
        if mode == "hybrid":
            hits = store.hybrid_search(vec[0], limit, filter, ranker=opts.hybrid_ranker, weights=tuple(opts.hybrid_weights),
                                       rrf_k=opts.rrf_k, images_only=reranker is not None)
        else:
            hits = store.search(vec, limit, filter, mode=mode)[0]
        timings["search"] = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        hits = rerank_hits(reranker, q, hits, opts.k, mode=mode, search=opts) if reranker is not None else hits[: opts.k]
        timings["rerank"] = (time.perf_counter() - t) * 1000
        timings["total"] = timings["encode"] + timings["search"] + timings["rerank"]
        label = q if q is not None else (f"image:{image_id}" if image_id is not None else f"image:{_image_label(image)}")
        return SearchResult(query=label, hits=hits, timings_ms=timings, reranked=reranker is not None, mode=mode)

    def _resolve_mode(self, mode: str) -> str:
        if mode == "auto":
            if self._auto_mode is None:
                has_text = hasattr(self.store, "count_with_text") and self.store.count_with_text() > 0
                self._auto_mode = "hybrid" if has_text else "image"
            return self._auto_mode
        if mode not in ("image", "text", "hybrid"):
            raise InputError(f"unknown --mode {mode!r}; use auto, image, text or hybrid")
        if mode in ("text", "hybrid"):
            # Only "has text" is remembered: a collection that had none may get some from another process.
            self._has_text = self._has_text or self.store.count_with_text() > 0
            if not self._has_text:
                raise InputError(
                    f"--mode {mode} needs text vectors, and collection {self.store.name!r} has none: index a table with a "
                    "caption column (or --text-columns), or search with --mode image"
                )
        return mode

    def _stored_vector(self, item_id: str) -> np.ndarray:
        rows = self.store.get([item_id], fields=["id", "vector", "has_image"])
        if not rows or not rows[0].get("has_image", True):
            raise InputError(f"no indexed image with id {item_id!r}")
        return np.asarray([rows[0]["vector"]], dtype=np.float32)

    def search_vectors(self, vectors: np.ndarray, limit: int, filter: str = ""):
        """The first stage alone, for precomputed query vectors."""
        return self.store.search(vectors, limit, filter)


MAX_IMAGE_QUERY_BYTES = 20 * 1024 * 1024


def read_image_query(image: str | Path | bytes) -> bytes:
    """The bytes of an image query: a file, an http(s) URL (bounded), or bytes as given."""
    if isinstance(image, bytes):
        data = image
    elif str(image).startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(str(image), timeout=15) as resp:  # noqa: S310 (http(s) only)
                data = resp.read(MAX_IMAGE_QUERY_BYTES + 1)
        except OSError as e:
            raise InputError(f"cannot fetch the image query {image}: {e}") from e
    else:
        p = Path(image).expanduser()
        if not p.is_file():
            raise InputError(f"image query not found: {p}")
        data = p.read_bytes()[: MAX_IMAGE_QUERY_BYTES + 1]
    if len(data) > MAX_IMAGE_QUERY_BYTES:
        raise InputError(f"the image query is larger than {MAX_IMAGE_QUERY_BYTES // (1024 * 1024)} MiB")
    return data


def encode_image_query(encoder: Any, image: str | Path | bytes) -> np.ndarray:
    """[1, D] embedding of an image query (decoded with the same safety limits as indexing)."""
    from .decode import DecodeError, decode_image

    try:
        pil = decode_image(read_image_query(image))
    except DecodeError as e:
        raise InputError(f"the image query is not a usable image: {e}") from e
    emb, _ = encoder.encode_pixels(encoder.image_transform(pil).unsqueeze(0))
    return emb


def _image_label(image: Any) -> str:
    return f"<{len(image)} bytes>" if isinstance(image, bytes) else str(image)


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
