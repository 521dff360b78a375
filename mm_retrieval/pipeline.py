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
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import registry
from .config import PipelineConfig, StageSpec, config_from_dict, config_to_dict, prune_none
from .errors import ConfigError, InputError
from .indexing import Indexer
from .query import validate_query
from .search import CollectionFacts, plan_search, query_kind, run_search
from .stages.base import Encoder, ImageSide, Reranker, Source, Store
from .tables import TABLE_EXTENSIONS, is_shard_folder
from .types import IndexReport, SearchResult
from .video import VideoConfig

if TYPE_CHECKING:
    from .stages.stores.milvus_bulk import BulkImport
    from .tokencache import TokenWriter

log = logging.getLogger(__name__)


def open_source(source: str | Path | Source, *, text_columns: list[str] | None = None) -> Source:
    """A folder -> ``source/folder``; a .csv/.parquet/.jsonl file, or a folder holding .parquet
    files and no image (a sharded table) -> ``source/table``."""
    if isinstance(source, Source):
        return source
    p = Path(source).expanduser()
    if p.is_dir() and is_shard_folder(p):
        return registry.create("source", "table", {"path": str(p), "text_columns": list(text_columns or [])})
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
    take precedence over ``config``; ``None`` means "not given". ``encoder``, ``store`` and
    ``reranker`` are params for the configured stage (a dict; for the reranker also a checkpoint
    path) or a stage instance, used as it is (its own config then can't be overridden here).
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
        encoder: Encoder | dict[str, Any] | None = None,
        store: Store | dict[str, Any] | None = None,
        reranker: Reranker | str | dict[str, Any] | None = None,
        cache_tokens: bool = True,
        tokens: str | None = None,
        token_budget: str | int | None = None,
        video: VideoConfig | dict[str, Any] | None = None,
        ocr: bool | None = None,
    ):
        if config is None:
            config = PipelineConfig()
        elif not isinstance(config, PipelineConfig):
            config = PipelineConfig.load(config)
        enc_overrides = prune_none({"model": model, "pretrained": pretrained, "device": device})
        sto_overrides = prune_none({"uri": db, "collection": collection, "token": token})
        self._encoder: Encoder | None = None
        self._store: Store | None = None
        self._reranker: Reranker | None = None
        if isinstance(encoder, Encoder):
            self._encoder, enc = encoder, _instance_spec("encoder", encoder, enc_overrides)
        else:
            enc = config.encoder.with_params({**(encoder or {}), **enc_overrides})
        if isinstance(store, Store):
            self._store, sto = store, _instance_spec("store", store, sto_overrides)
        else:
            sto = config.store.with_params({**(store or {}), **sto_overrides})
        rer = config.reranker
        if isinstance(reranker, Reranker):
            self._reranker, rer = reranker, _instance_spec("reranker", reranker, prune_none({"device": device}))
        else:
            if isinstance(reranker, str):
                rer = reranker_spec(reranker, rer)
            elif reranker and (rer is None or reranker.get("checkpoint")):  # a checkpoint (or no [reranker]): its stage
                spec = reranker_spec(str(reranker.get("checkpoint") or ""), rer)
                rer = spec.with_params({**reranker, "checkpoint": spec.params["checkpoint"]})
            elif reranker:  # params for the pipeline file's [reranker]
                rer = rer.with_params(reranker)
            if rer is not None and device is not None:
                rer = rer.with_params({"device": device})
        self.config = replace(config, encoder=enc, store=sto, reranker=rer)
        self.cache_tokens = cache_tokens  # index runs write image tokens for the reranker
        # "eager": index runs write the reranker's tokens; "lazy": its first rerank computes them (config [index] tokens)
        self.tokens = config.index.tokens if tokens is None else tokens
        if self.tokens not in ("eager", "lazy"):
            raise ConfigError(f"unknown tokens {self.tokens!r}; use eager (written while indexing) or lazy (computed by the first rerank that needs them)")
        self.token_budget = config.index.token_budget if token_budget is None else token_budget  # lazy: the cache's bound
        # how index runs sample and segment videos (a dict: VideoConfig fields, None values ignored)
        self.video = video if isinstance(video, VideoConfig) else config_from_dict(
            VideoConfig, prune_none(video or {}), where="video config")
        # index and sync runs read the text in images (None: the config's [index] ocr)
        self.ocr = config.index.ocr if ocr is None else bool(ocr)
        self._bound = False  # the reranker was given the encoder and store
        self._forget_collection()

    def _forget_collection(self) -> None:
        """Forget what searches learnt about the collection once (it exists and fits the encoder,
        its search mode, whether it holds text vectors): after an index or sync run in this
        process, or a closed connection, the next search asks again."""
        self._facts: CollectionFacts | None = None

    def close(self) -> None:
        """Release the store connection (Milvus Lite admits one process at a time); the next use
        of :attr:`store` connects again."""
        if self._store is not None:
            self._store.close()
        self._forget_collection()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- stages ----------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        """The configured store, connected (again, after :meth:`close`)."""
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
                stored = self.store.encoder_info()
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
            self._reranker = registry.create("reranker", spec.name, spec.params)
        if self._reranker is not None and not self._bound:
            self._reranker.bind(encoder=self.encoder, store=self.store)
            self._bound = True
        return self._reranker

    def image_side(self) -> ImageSide | None:
        """The reranker's own image encoder that index runs feed :meth:`token_writer` with
        (:meth:`Reranker.image_side`: a model of its own), or None: the encoder's patch
        tokens (also with ``cache_tokens=False`` or no reranker)."""
        if not self.cache_tokens or self.reranker is None or self.tokens == "lazy":
            return None
        return self.reranker.image_side()

    def token_writer(self) -> TokenWriter | None:
        """Where an index run writes image tokens for reranking: the configured reranker's memory
        (small, keyed by encoder + reranker), else the encoder's raw patch tokens, from which any
        reranker trained later derives its memory without decoding images again. None with
        ``cache_tokens=False``. Refuses an encoder other than the collection's before a cache
        file is created for it."""
        if not self.cache_tokens:
            return None
        self.store.check_compatible(self.encoder.info())
        if self.tokens == "lazy":
            self._mark_lazy()
            return None
        reranker = self.reranker
        if reranker is not None:
            reranker.warm_up()
            writer = reranker.token_writer()
            if writer is not None:
                return writer
        from .tokencache import raw_token_writer

        return raw_token_writer(self.store.cache_dir(), self.encoder.fingerprint)

    def _mark_lazy(self) -> None:
        """``tokens="lazy"``: no tokens now; the reranker's cache says that its first rerank
        computes them (:mod:`.tokencache.lazy`), within ``token_budget``. Loads no model."""
        from .tokencache.budget import parse_budget
        from .tokencache.lazy import FillsTokens

        parse_budget(self.token_budget)  # a bad budget fails before anything is written
        reranker = self.reranker
        if not isinstance(reranker, FillsTokens):
            what = "no reranker is configured" if reranker is None else f"{reranker.label} derives its tokens from the encoder's"
            raise ConfigError(f"--tokens lazy needs a reranker that computes its own image tokens (one with its own image side: see docs/reranking.md), "
                              f"but {what}; index with --tokens eager (the default) instead")
        writer = reranker.token_writer()
        writer.cache.set_policy("lazy", self.token_budget or None)
        writer.cache.close()

    # ---- indexing --------------------------------------------------------------------------
    def index(self, source: str | Path | Source, *, progress: bool | None = None,
              on_progress: Callable[[int], None] | None = None, text_columns: list[str] | None = None,
              bulk_import: BulkImport | None = None, ray: str | None = None, ray_actors: int | None = None,
              ocr: bool | None = None) -> IndexReport:
        """Embed and store every image of a folder or table. Idempotent and crash-safe: ids derive
        from content, so re-running adds nothing, a changed file replaces its old entry, a moved
        file keeps its id, and a killed run resumes where it stopped (see :mod:`.indexing`).
        ``bulk_import``: a first load of a new or empty collection on a Milvus server through Milvus'
        bulk import (Parquet files, then one import job at the end: :mod:`.stages.stores.milvus_bulk`).
        ``ray``: decode and encode on a pool of Ray actors (:mod:`.distributed`; "" or "local" starts
        a local Ray instance, "auto" or "ray://host:port" joins a cluster), ``ray_actors`` of them;
        every write still goes through this process. The report then has a ``ray`` section.
        ``ocr``: read the text in each image (default: :attr:`ocr`), also in the images already
        indexed without it (:mod:`.ocr`); the report then has an ``ocr`` section."""
        src = open_source(source, text_columns=text_columns)
        src.check()  # e.g. a table without a 'path' column: said before any model loads
        self._check_model()
        reader = self._ocr_reader(ocr)
        cluster = _connect_ray(ray, ray_actors)
        try:
            return self._index(src, progress=progress, on_progress=on_progress, bulk_import=bulk_import,
                               cluster=cluster, ray_actors=ray_actors, reader=reader)
        finally:
            if cluster is not None:
                cluster.close()

    def _index(self, src: Source, *, progress: bool | None, on_progress: Callable[[int], None] | None,
               bulk_import: BulkImport | None, cluster: Any, ray_actors: int | None, reader: Any = None) -> IndexReport:
        store = self.store if bulk_import is None else bulk_import.wrap(self.store, progress=progress)  # refuses Lite, a loaded collection
        existed = self.store.exists()
        failed = True
        try:
            extra = self._on_ray(cluster, ray_actors)
            # the token writer is made by the run once the model loaded (one that can't load leaves no cache file)
            indexer = Indexer(self.encoder, store, tokens=self.token_writer, image_side=self.image_side, progress=progress,
                              on_progress=on_progress, video=self.video, ocr=reader, **extra)
            report = indexer.run(src)
            if cluster is not None:
                report.ray = extra["encode_batches"].describe()
            failed = False
            return report
        finally:
            if store is not self.store:
                store.close()  # a bulk import that never reached its end: remove its partial files
            self._forget_collection()
            if not existed and failed:
                _drop_if_empty(self.store)
            if not existed and not self.store.exists():  # nothing indexed: leave no token cache behind
                _remove_cache_dir(self.store.cache_dir())

    def _ocr_reader(self, ocr: bool | None) -> Any:
        """The OCR reader of a run (loaded now: a missing package fails before any encoding), or None."""
        if not (self.ocr if ocr is None else ocr):
            return None
        from .ocr import shared_reader

        reader = shared_reader()
        reader.warm_up()
        return reader

    def _check_model(self) -> None:
        """A collection built by another model is refused before that model (or torch) is
        imported, loaded or downloaded, and before decoding workers start."""
        if self.store.exists():
            self.store.check_compatible(self.encoder.cheap_info())

    def _on_ray(self, cluster: Any, ray_actors: int | None) -> dict[str, Any]:
        """The Indexer's ``encode_batches`` on ``cluster`` (none: {}, encoding in this process);
        the actors rebuild the encoder (and a reranker's image side) from their specs."""
        if cluster is None:
            return {}
        from .distributed import RayEncodeBatches, stage_spec

        lite = self.store.local_path
        if lite is not None:  # said, not refused: one writer is what Milvus Lite needs
            log.warning("--ray with the Milvus Lite file %s: the Ray actors only decode and encode; this process "
                        "writes every batch (Milvus Lite admits one process)", lite)
        side = self.image_side()
        return {"encode_batches": RayEncodeBatches(cluster, self.encoder, actors=ray_actors,
                                                   side_spec=None if side is None else stage_spec(self.reranker))}

    def sync(self, source: str | Path | Source, *, dry_run: bool = False, progress: bool | None = None,
             ray: str | None = None, ray_actors: int | None = None, ocr: bool | None = None) -> IndexReport:
        """Bring the collection in step with a folder or table: add new files, replace changed
        ones, and remove entries (and cached tokens) of files under the source's folder (a
        table's folder, for a table) that are no longer listed. ``dry_run``: only report the
        plan (``report.plan``). ``ray``, ``ray_actors``: as for :meth:`index` (a dry run encodes
        nothing, so it starts no Ray). ``ocr``: as for :meth:`index`; on a collection indexed
        without it, reads the text of the images already indexed (they are not encoded again)."""
        src = open_source(source)
        src.check()
        self._check_model()
        reader = self._ocr_reader(ocr)
        scope = Path(source).expanduser().resolve()
        if scope.is_file():
            scope = scope.parent
        cluster = None if dry_run else _connect_ray(ray, ray_actors)
        existed, failed = self.store.exists(), True
        try:
            extra = self._on_ray(cluster, ray_actors)
            indexer = Indexer(self.encoder, self.store, tokens=None if dry_run else self.token_writer,  # a dry run creates no cache file
                              image_side=None if dry_run else self.image_side, progress=progress,
                              video=self.video, ocr=reader, **extra)
            report = indexer.run(src, remove_missing=True, scope=scope, dry_run=dry_run)
            if cluster is not None:
                report.ray = extra["encode_batches"].describe()
            failed = False
            return report
        finally:
            self._forget_collection()
            if cluster is not None:
                cluster.close()
            if not existed and failed:  # as for index: a failed first sync leaves no empty collection
                _drop_if_empty(self.store)

    # ---- searching -------------------------------------------------------------------------
    @property
    def collection_facts(self) -> CollectionFacts:
        """What searches learnt about the collection (it exists and fits the encoder; whether it
        holds text vectors), remembered until this pipeline writes to it or closes."""
        if self._facts is None:
            self._facts = CollectionFacts(self.store)
        return self._facts

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
        offset: int = 0,
        group_by_video: bool | None = None,
        min_score: float | None = None,
        sort: str | None = None,
        collapse_duplicates: bool = False,
    ) -> SearchResult:
        """Search by text (``query``) or by image (``image``: a path, URL or bytes; or ``image_id``:
        an indexed item), against image vectors (``mode="image"``), the items' text vectors
        (``"text"``) or both fused by Milvus (``"hybrid"``). ``"auto"`` (the default): a text
        query is hybrid when the collection holds text vectors, else image; an image query is
        image (similar images).

        ``rerank``: None reranks the first stage's ``candidates`` when a reranker is configured
        and applies (a text query against images: image and hybrid modes); True asks for it and
        raises InputError naming why when it can't be done; False never reranks
        (``result.reranked`` says which). ``offset`` skips that many hits (paging).
        ``group_by_video`` (None: on) keeps each video's best segment only. ``min_score``: every
        hit whose first-stage similarity is above it (Milvus' range search), at most ``k`` (default
        1000) instead of a fixed top ``k``; thresholds are model-specific. ``sort``: order the hits
        by a metadata field (``"-taken"``: newest first; comma-separated for several; ``score``
        too). ``collapse_duplicates``: one hit per group of near-duplicates (re-saved, resized, cropped
        or turned copies of one photo, as ``mmr duplicates`` groups them), its best-ranked. The flow
        itself is :mod:`mm_retrieval.search`.
        """
        kind = query_kind(query, image, image_id)
        text = validate_query(query) if query is not None else None
        plan = plan_search(self.config.search, kind=kind, has_reranker=self.config.reranker is not None, mode=mode, k=k,
                           candidates=candidates, offset=offset, filter=filter, rerank=rerank, group_by_video=group_by_video,
                           min_score=min_score, sort=sort, collapse_duplicates=collapse_duplicates)
        self.collection_facts.precheck(self.encoder, plan.filter)  # before the reranker, or any model, loads
        return run_search(plan, store=self.store, encoder=self.encoder, reranker=self.reranker if plan.rerank else None,
                          facts=self.collection_facts, text=text, image=image, image_id=image_id)


def _connect_ray(ray: str | None, ray_actors: int | None) -> Any:
    """The Ray cluster a run encodes on (None without ``ray``): an unreachable address fails here,
    before anything is written."""
    if ray_actors is not None and ray is None:
        raise InputError("--ray-actors applies to runs on Ray; add --ray [ADDRESS]")
    if ray_actors is not None and ray_actors < 1:
        raise InputError(f"--ray-actors must be at least 1, got {ray_actors}")
    if ray is None:
        return None
    from .distributed import connect

    return connect(ray)


def _drop_if_empty(store: Store) -> None:
    """Drop the collection a failed (or interrupted) index run created if nothing landed in it:
    an empty collection would be taken for an indexed one (searches find nothing, the next run
    trusts its encoder). Not while another run holds the collection's write lock: it may be about to
    write there. Best effort: the run's own error is the one to report."""
    from .locks import CollectionLock

    try:
        if store.exists() and store.count() == 0:
            with CollectionLock(store.cache_dir(), store.name):
                if store.count() == 0:
                    store.drop()
    except Exception as e:  # noqa: BLE001 (the original exception is propagating)
        log.warning("left the collection %r this failed run created (empty) in place: %s", store.name, e)


def _remove_cache_dir(directory: Path) -> None:
    """Remove a collection's token-cache folder (and its parent, the database's, when that is
    left empty): what an index run that created no collection made."""
    import shutil

    if directory.is_dir():
        shutil.rmtree(directory, ignore_errors=True)
        try:
            directory.parent.rmdir()
        except OSError:  # other collections' caches (or not a folder we made)
            pass


def reranker_spec(ref: str, configured: StageSpec | None = None) -> StageSpec:
    """The reranker stage ``--rerank REF`` (``Pipeline(reranker="REF")``) names, the one place a
    reranker reference picks its stage: ``NAME:REF`` names stage NAME (any registered reranker,
    plugins' too); otherwise each reranker is asked whether it takes REF
    (:meth:`~mm_retrieval.stages.base.Reranker.accepts`, cheap: nothing is loaded), plugins
    first, then the built-in ones, each group in name order; the first that does is the one. ``configured`` (the pipeline file's ``[reranker]``)
    keeps its other params when it is the same stage."""
    name, checkpoint = _claim(ref)
    if configured is not None and configured.name == name:
        return configured.with_params({"checkpoint": checkpoint})
    return StageSpec("reranker", name, {"checkpoint": checkpoint})


def _claim(ref: str) -> tuple[str, str]:
    """(reranker stage name, its checkpoint reference) for ``--rerank REF``; InputError naming
    what each reranker takes when none takes it. Plugins are asked before the built-in rerankers,
    whose claims are broad (any ``org/name`` that is no local path is taken for a hub id)."""
    entries = sorted((e for e in registry.list_stages(load=False) if e.kind == "reranker"),
                     key=lambda e: (e.origin == "builtin", e.name))
    prefix, sep, rest = ref.partition(":")
    if sep and prefix in {e.name for e in entries}:
        if not rest:
            raise InputError(f"--rerank {ref}: name the checkpoint after the prefix ({prefix}:CHECKPOINT)")
        return prefix, rest
    takes = []
    for entry in entries:
        try:
            cls = registry.get("reranker", entry.name)
        except ConfigError:  # a plugin that fails to load claims nothing (`mmr plugins` shows why)
            continue
        if cls.accepts(ref):
            return entry.name, ref
        takes.append(f"{entry.name}: {cls.references or 'see its documentation'}")
    where = "the path does not exist" if ref and not Path(ref).expanduser().exists() else "no reranker recognises it"
    raise InputError(f"--rerank {ref!r}: {where}. A reranker reference is " + "; ".join(takes)
                     + ". To pick a reranker yourself, prefix its name: --rerank NAME:CHECKPOINT")


def _instance_spec(kind: str, stage: Any, overrides: dict[str, Any]) -> StageSpec:
    """The spec a stage instance stands for in :attr:`Pipeline.config`."""
    if overrides:
        raise ConfigError(
            f"{', '.join(sorted(overrides))} can't be combined with {'an' if kind[0] in 'aeiou' else 'a'} {kind} instance "
            f"({stage.label}); "
            f"put {'it' if len(overrides) == 1 else 'them'} in that stage's config"
        )
    return StageSpec(kind, stage.stage_name, config_to_dict(stage.config))
