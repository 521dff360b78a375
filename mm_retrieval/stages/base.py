"""The stage interfaces.

Every stage has one lifecycle: ``__init__(config)`` is cheap and JSON-serialisable (it only
validates the config), ``warm_up()`` does the heavy loading (models, connections) and is called
once, lazily, by whoever first needs it. Each role (:class:`Source`, :class:`Encoder`,
:class:`Store`, :class:`Reranker`) is an abstract base class whose abstract methods are the whole
contract its callers use; :mod:`mm_retrieval.testing.contracts` checks a stage keeps it.

A stage that fails while running reports its name: an exception other than an
:class:`~mm_retrieval.errors.MMRError` escaping a role method of a subclass (or ``warm_up``)
becomes a :class:`~mm_retrieval.errors.StageError` naming the stage, raised from the original.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

import numpy as np

from ..config import config_from_dict, config_to_dict, prune_none
from ..errors import ConfigError, InputError, MMRError, StageError
from ..types import AttentionMaps, Hit, Record

if TYPE_CHECKING:
    from ..query import Query
    from ..tokencache import TokenWriter


@dataclasses.dataclass(frozen=True)
class NoConfig:
    """Config of a stage that takes no parameters."""


class Stage(ABC):
    """Base of every stage. Subclasses set ``Config`` to a frozen dataclass and implement their
    role's abstract methods; each class's own definitions of its role's methods are wrapped when
    the class is created, so that an unexpected exception becomes a StageError naming it."""

    Config: ClassVar[type] = NoConfig
    stage_kind: ClassVar[str] = ""
    stage_name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _role_methods(cls):
            member = cls.__dict__.get(name)
            if isinstance(member, property) and member.fget is not None:
                setattr(cls, name, property(_guarded(name, member.fget), member.fset, member.fdel, member.__doc__))
            elif inspect.isfunction(member):
                setattr(cls, name, _guarded(name, member))

    def __init__(self, config: Any = None, **overrides: Any):
        """``config``: a ``Config`` instance, a dict of its fields, or None for the defaults;
        ``overrides`` whose value is None are ignored (unset CLI flags)."""
        overrides = prune_none(overrides)
        if config is None or isinstance(config, dict):
            config = config_from_dict(self.Config, {**(config or {}), **overrides}, where=f"{self.label} config")
        elif overrides:
            config = config_from_dict(self.Config, {**config_to_dict(config), **overrides}, where=f"{self.label} config")
        self.config = config
        self._warm = False

    @property
    def label(self) -> str:
        return f"{self.stage_kind or 'stage'}/{self.stage_name or type(self).__name__}"

    def warm_up(self) -> None:
        """Load heavy resources. Idempotent; subclasses override :meth:`_warm_up`."""
        if self._warm:
            return
        try:
            self._warm_up()
        except MMRError:
            raise
        except Exception as e:
            raise StageError(self.label, f"failed to start: {type(e).__name__}: {e}") from e
        self._warm = True

    def _warm_up(self) -> None:
        pass

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.stage_name, **config_to_dict(self.config)}


def _role_methods(cls: type) -> list[str]:
    """The public methods and properties the role ``cls`` plays (the class right below
    :class:`Stage` in its MRO) declares; empty for a role class itself."""
    roles = [c for c in cls.__mro__[1:] if Stage in c.__bases__]
    if not roles:
        return []
    return [n for n, v in vars(roles[0]).items()
            if not n.startswith("_") and (inspect.isfunction(v) or isinstance(v, property))]


def _guarded(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a role method of a stage) with any exception other than an MMRError re-raised as
    a StageError naming the stage and the method; generators are guarded while they run."""
    if getattr(fn, "__mmr_guarded__", False):
        return fn

    def fail(self: Stage, e: Exception) -> StageError:
        return StageError(self.label, f"{name}() failed: {type(e).__name__}: {e}")

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def guarded_gen(self: Stage, *args: Any, **kwargs: Any) -> Any:
            try:
                return (yield from fn(self, *args, **kwargs))
            except MMRError:
                raise
            except Exception as e:
                raise fail(self, e) from e

        guarded = guarded_gen
    else:
        @functools.wraps(fn)
        def guarded_call(self: Stage, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(self, *args, **kwargs)
            except MMRError:
                raise
            except Exception as e:
                raise fail(self, e) from e

        guarded = guarded_call
    guarded.__mmr_guarded__ = True  # type: ignore[attr-defined]
    return guarded


class Source(Stage):
    """Lists the records (image files + text + metadata) to index."""

    @abstractmethod
    def records(self) -> Iterator[Record]:
        """Yield every record: ``path`` absolute (None for a text-only item, which then has
        text), the same records in the same order on every run over unchanged input. Entries the
        source has to drop go to :attr:`problems`, not into an exception."""

    def check(self) -> None:
        """Raise InputError if the source can't be read as asked (e.g. a table without a 'path'
        column): cheap, called before any model loads. The default checks nothing."""

    @property
    def problems(self) -> list[tuple[str, str]]:
        """(path, reason) for each entry the last :meth:`records` run had to drop (e.g. an
        unreadable folder). Complete once that generator is exhausted; reset when a run starts."""
        return list(getattr(self, "_problems", []))

    def _problem(self, path: str, reason: str) -> None:
        """Record an entry dropped by the running :meth:`records` (see :attr:`problems`)."""
        self._problems = [*getattr(self, "_problems", []), (str(path), reason)]


class Encoder(Stage):
    """Turns images and texts into L2-normalised vectors of one shared space.

    Subclasses provide the model; decoding images in workers and batching them is
    :func:`mm_retrieval.encoding.encode_files`' job, which calls :attr:`image_transform` and
    :meth:`encode_pixels`.
    """

    #: The PyTorch device the model runs on ("cpu", "cuda", "cuda:1"); final after :meth:`warm_up`.
    device: str = "cpu"
    #: The text tokenizer, ``list[str] -> [N, C]`` token ids (set by :meth:`warm_up`); used to
    #: map token features back to words.
    tokenizer: Any = None

    # ---- run-time settings index runs read: declared here with their defaults; an encoder
    # ---- whose config has such a field overrides the property to return it ----
    @property
    def batch_size(self) -> int:
        """Images per forward pass at index time (default 32)."""
        return 32

    @property
    def workers(self) -> int:
        """Decoding worker processes at index time (default 0: decode in this process)."""
        return 0

    @property
    def index_threads(self) -> int:
        """Torch threads while indexing on a CPU; 0 (the default): cores minus workers."""
        return 0

    @property
    def max_pixels(self) -> int:
        """Largest image (width x height) decoded; larger ones are skipped as decompression bombs."""
        from ..decode import DEFAULT_MAX_PIXELS

        return DEFAULT_MAX_PIXELS

    @property
    def image_size(self) -> int | None:
        """Pixels per side of the square images :attr:`image_transform` makes (what a model that
        reads the encoder's input pixels is built for); None (the default) when not fixed."""
        return None

    @property
    def logit_scale(self) -> float | None:
        """The model's own softmax temperature (CLIP's ``exp(logit_scale)``: scale * cosine are
        its logits), read by reranker training; None (the default) when the model has none."""
        return None

    def autocast(self) -> Any:
        """A context manager that runs forwards in the encoder's precision (autocast, see
        :func:`mm_retrieval.devices.autocast_dtype`); the default runs them as they are."""
        return contextlib.nullcontext()

    @property
    @abstractmethod
    def dim(self) -> int:
        """The length D of every vector (may warm the encoder up to find out)."""

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """Identifies architecture and weights: collections, token caches and reranker
        checkpoints are keyed by it. Cheap (no model loading) and stable across processes."""

    @abstractmethod
    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """[N, D] float32, L2-normalised; the same text always gives the same vector."""

    @abstractmethod
    def encode_text_tokens(self, texts: Sequence[str], *, with_tokens: bool = True) -> tuple[Any, Any, Any]:
        """One text-tower forward for ``texts``: (embeddings [N, D] float32 PyTorch tensor, equal to
        :meth:`encode_text`'s; token features [N, C, W] float32 PyTorch tensor, or None without
        ``with_tokens``; mask [N, C] bool PyTorch tensor, True at real tokens). C is the tokenizer's
        context length. An encoder without token features raises ConfigError saying so."""

    @abstractmethod
    def encode_pixels(self, pixels: Any, *, with_tokens: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Encode a batch of :attr:`image_transform` outputs stacked [N, ...]: ([N, D] float32
        L2-normalised, [N, P, W] float16 patch tokens with ``with_tokens``, else None)."""

    @property
    @abstractmethod
    def image_transform(self) -> Callable[[Any], Any]:
        """PIL image -> model input tensor. Runs in decoding worker processes, so it must be
        picklable."""

    def info(self) -> dict[str, Any]:
        """What a collection records about the encoder that built it (JSON-serialisable):
        at least ``stage``, ``fingerprint`` and ``dim``."""
        return {"stage": self.stage_name, "fingerprint": self.fingerprint, "dim": self.dim}

    def cheap_info(self) -> dict[str, Any]:
        """:meth:`info` as far as it can be told without importing or loading the model (``dim``
        may be None), so that a collection built by another model is refused within a second
        (:meth:`Store.check_compatible`). The same fingerprint as :meth:`info`'s whenever that
        one can be computed; the default is :meth:`info` itself."""
        return self.info()


class SettingsFromConfig:
    """For an :class:`Encoder` whose config has the run-time settings as fields (``batch_size``,
    ``workers``, ``index_threads``, ``max_pixels``): the contract's properties return them. List it
    before :class:`Encoder` among the bases."""

    config: Any

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    @property
    def workers(self) -> int:
        return self.config.workers

    @property
    def index_threads(self) -> int:
        return self.config.index_threads

    @property
    def max_pixels(self) -> int:
        return self.config.max_pixels


class Store(Stage):
    """A collection of items (an image vector, a text vector, path, caption, metadata) that can
    be searched by vector with a filter.

    A row, as :meth:`upsert` takes it and :meth:`get` / :meth:`iter_rows` / :meth:`query` return
    it, is a dict with ``id`` (hex string, at most 64 characters), ``vector`` ([D] float32, the
    image embedding; zeros for a text-only item), ``text_vector`` ([D] float32, or absent/None for
    an item without text), ``has_image`` (bool), ``has_text`` (bool, derived from
    ``text_vector``), ``path``, ``content_hash``, ``caption``, ``metadata`` (a JSON object),
    ``file_size`` and ``mtime_ns``. Filters are boolean expressions over ``path``, ``caption``
    and ``metadata`` in Milvus' expression language (what ``--filter`` documents), e.g.
    ``metadata["year"] >= 2020 and caption like "%dog%"``. Reads on a missing collection behave
    as on an empty one except where noted.

    Media items: a row may also carry ``media_id`` (the media item it belongs to: an image is
    its own, default ``id``; a video segment's is the video's item id), ``start`` / ``end``
    (the segment's seconds), ``frame`` (the time of the frame its vector comes from) and
    ``segments`` (how many segments its video has), all 0 for an image. A store that keeps them
    says so with :meth:`has_media_fields`; hits of segments carry ``video_id`` / ``start`` /
    ``end`` / ``frame``, and ``group_by_media`` searches return one hit per media item.
    """

    #: What :meth:`search` and :meth:`hybrid_search` take besides the arguments every store
    #: takes: ``"group_by_media"`` (one hit per media item; a store written before videos has
    #: none to group and leaves it out), ``"min_score"`` (a range search: every hit scoring above
    #: it, at most ``limit``; without it the search flow cuts the top ``limit`` hits there).
    search_options: ClassVar[frozenset[str]] = frozenset({"group_by_media"})

    # ---- the collection -------------------------------------------------------------------
    @property
    @abstractmethod
    def name(self) -> str:
        """The collection's name (used in messages and cache folders)."""

    @property
    def location(self) -> str | None:
        """Where the collection lives, as ``--db`` names it (a URI or a file path): a server of
        this collection announces itself under it, so that ``mmr search --db LOCATION`` finds
        it. None (the default): nowhere another process could open (memory)."""
        return None

    @property
    @abstractmethod
    def metric(self) -> str:
        """How scores compare vectors: "IP" or "COSINE" (cosine on normalised vectors), or "L2"
        (reported negated, so that a higher score is always closer)."""

    @abstractmethod
    def cache_dir(self) -> Path:
        """Folder for this collection's side data (token caches); :meth:`drop` removes it."""

    @property
    def local_path(self) -> Path | None:
        """The file holding the collection when only one process may open it (a Milvus Lite
        database): runs that spread work over processes then keep every write in this one.
        None (the default): a server, or memory."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Release connections and files (another process may then open the collection). The
        store reopens on next use."""

    @abstractmethod
    def exists(self) -> bool:
        """Whether the collection exists."""

    @abstractmethod
    def require(self) -> None:
        """Raise InputError (saying how to create it) if the collection does not exist."""

    @abstractmethod
    def encoder_info(self) -> dict[str, Any] | None:
        """The :meth:`Encoder.info` the collection was created with (None if it does not exist)."""

    @abstractmethod
    def check_compatible(self, encoder_info: dict[str, Any]) -> None:
        """Raise IncompatibleError if the collection was built by another encoder (another
        ``fingerprint`` or ``dim``; a ``dim`` of None, from :meth:`Encoder.cheap_info`, is not
        compared); a missing collection is compatible with any."""

    def check_filter(self, filter: str) -> None:
        """Raise InputError naming the problem (and the fields a filter can use) if ``filter`` is
        not a valid expression for this collection; asked before any model loads. The default
        accepts any: a store without a cheap check reports a bad filter when it searches."""

    @abstractmethod
    def ensure_collection(self, encoder_info: dict[str, Any]) -> None:
        """Create the collection for vectors of this encoder (``dim`` from ``encoder_info``,
        which is recorded) if it does not exist; refuse (IncompatibleError) one built by another."""

    @abstractmethod
    def drop(self) -> None:
        """Delete the collection and its :meth:`cache_dir`; nothing happens if it is missing."""

    # ---- writes ---------------------------------------------------------------------------
    @abstractmethod
    def upsert(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert rows, replacing those with the same ``id`` (see the class docstring for a row)."""

    @abstractmethod
    def delete(self, ids: Iterable[str]) -> None:
        """Remove the rows with these ids; unknown ids are ignored."""

    @abstractmethod
    def flush(self) -> None:
        """Make the rows written so far durable and fast to search (an index run ends with it)."""

    def record_video_fact(self, holds: bool) -> None:
        """Told by an index or sync run that has read every row whether a video segment is left
        (``holds``), so that searches of a collection without videos need not group; a store
        that keeps no such fact ignores it (the default)."""

    # ---- reads ----------------------------------------------------------------------------
    @abstractmethod
    def count(self) -> int:
        """How many rows the collection holds (0 when it does not exist)."""

    @abstractmethod
    def count_with_text(self) -> int:
        """How many rows have a text vector."""

    @abstractmethod
    def has_text_vectors(self) -> bool:
        """Whether the collection stores text vectors (text and hybrid search need them;
        collections from before they existed do not)."""

    @abstractmethod
    def get(self, ids: Sequence[str], fields: Sequence[str]) -> list[dict[str, Any]]:
        """The rows with these ids, each with ``id`` and ``fields`` (unknown ids are left out;
        order not guaranteed)."""

    @abstractmethod
    def iter_rows(self, fields: Sequence[str] = ("id", "path"), filter: str = "") -> Iterator[dict[str, Any]]:
        """Every row matching ``filter`` (all when empty) exactly once, with ``id`` and
        ``fields``; streamed, so the collection need not fit in memory."""

    @abstractmethod
    def query(self, filter: str, fields: Sequence[str], limit: int) -> list[dict[str, Any]]:
        """At most ``limit`` rows matching ``filter`` (a non-empty expression), with ``fields``."""

    def has_media_fields(self) -> bool:
        """Whether rows keep the media fields (see the class docstring), so video segments can be
        stored; a store without them raises InputError on a segment row. Default: False."""
        return False

    @abstractmethod
    def search(self, vectors: np.ndarray, limit: int, filter: str = "", *, mode: str = "image",
               group_by_media: bool = False) -> list[list[Hit]]:
        """For each query vector [Q, D], its best ``limit`` hits matching ``filter``, highest
        score first, ranks 1..n, ``score == retrieval_score``. ``mode`` "image" searches image
        vectors (items with an image), "text" the text vectors (items with text); another mode is
        an InputError, and so is "text" on a collection without text vectors.
        ``group_by_media``: at most one hit per ``media_id`` (its best row), ``limit`` media items;
        a store without media fields returns the ungrouped hits (each item its own media)."""

    def neighbour_ids(self, vectors: np.ndarray, limit: int, filter: str = "") -> list[list[tuple[str, float]]]:
        """For each query vector [Q, D], the ``(id, score)`` of its best ``limit`` image rows
        (``mmr duplicates`` asks this once per item). The default is :meth:`search`'s hits; a
        store may answer faster without fetching the hits' fields."""
        return [[(h.id, h.score) for h in hits] for hits in self.search(vectors, limit, filter, mode="image")]

    @abstractmethod
    def hybrid_search(self, vector: np.ndarray, limit: int, filter: str = "", *, ranker: str = "rrf",
                      weights: tuple[float, float] = (0.5, 0.5), rrf_k: int = 60,
                      images_only: bool = False, group_by_media: bool = False) -> list[Hit]:
        """One query vector [D] against both the image and the text vectors, fused by ``ranker``
        ("rrf" with constant ``rrf_k``, or "weighted" with (image, text) ``weights``; another is
        an InputError). Each hit's ``score`` is the fused score, ``image_score`` its image-vector
        similarity when it has an image, ``text_score`` its text-vector similarity when it has
        text. ``images_only`` leaves out items without an image; ``group_by_media`` keeps each
        media item's best fused hit (as in :meth:`search`)."""


class ImageSide(Protocol):
    """A reranker's own image encoder, run at index time beside the first-stage encoder (see
    :meth:`Reranker.image_side`)."""

    #: PIL image -> float32 tensor (e.g. [3, S, S]); runs in the decoding workers, so picklable.
    transform: Callable[[Any], Any]
    #: One image's tokens, (P, W).
    shape: tuple[int, int]

    def encode(self, pixels: Any) -> np.ndarray:
        """A batch of :attr:`transform` outputs stacked [n, ...] -> [n, P, W] float32 tokens."""
        ...


class Reranker(Stage):
    """Rescores first-stage hits for a text query.

    Lifecycle: the pipeline calls :meth:`bind` with the encoder and store the reranker works
    with, then :meth:`warm_up`. It receives the query as a :class:`~mm_retrieval.query.Query`
    (encoded once, shared with the first stage) and must not encode it again.

    A subclass implements :meth:`score` and :meth:`token_writer`, and claims its ``--rerank``
    references with :meth:`accepts` (saying what they are in :attr:`references`); it may override
    :meth:`score_batch` (several queries in one forward: the server's batcher) and, with
    ``can_explain = True``, :meth:`attention_maps` (``mmr explain``, the search page's maps).
    """

    #: True when :meth:`score` reads ``query.text_features()`` (the first-stage encoder's token
    #: features): the search flow then computes them in the same forward as the embedding.
    needs_text_features: ClassVar[bool] = False
    #: True when :meth:`attention_maps` is implemented.
    can_explain: ClassVar[bool] = False
    #: True when :meth:`score_batch` takes ``image_tokens``: the first-stage encoder's patch
    #: tokens of candidates outside the collection (images sent inline to the server).
    reads_image_tokens: ClassVar[bool] = False
    #: What ``--rerank REF`` takes for this reranker, one phrase (said when no reranker claims a
    #: reference), e.g. "a directory written by `mmr train-reranker`".
    references: ClassVar[str] = ""

    encoder: "Encoder | None" = None  # set by bind()
    store: "Store | None" = None

    @classmethod
    def accepts(cls, ref: str) -> bool:
        """Whether ``--rerank REF`` names a checkpoint of this reranker. Cheap: no model import,
        no network (a look at the path, a pattern). Plugins are asked first, then the built-in
        rerankers, each in name order; the first yes wins (:func:`mm_retrieval.pipeline.reranker_spec`).
        ``--rerank NAME:REF`` picks stage NAME without asking. Default: claims nothing."""
        return False

    def bind(self, *, encoder: "Encoder", store: "Store") -> None:
        """Give the reranker the encoder whose vectors it builds on and the store whose token
        cache it reads. Called once, before :meth:`warm_up`."""
        self.encoder = encoder
        self.store = store

    @abstractmethod
    def score(self, query: "Query", hits: Sequence[Hit]) -> np.ndarray:
        """One score per hit (higher is better) for ``query``."""

    def score_batch(
        self,
        requests: Sequence[tuple["Query", Sequence[Hit]]],
        *,
        image_tokens: Mapping[str, np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """Scores of several (query, hits) requests, in order; by default one :meth:`score`
        call each. ``image_tokens`` ([P, W] per hit id, for hits not in the collection) needs a
        reranker with ``reads_image_tokens``."""
        if image_tokens:
            raise InputError(f"{self.label} scores indexed images only; it cannot score images sent inline")
        return [np.asarray(self.score(q, hits), dtype=np.float64) if hits else np.zeros(0) for q, hits in requests]

    def rerank(self, query: "Query", hits: Sequence[Hit], k: int) -> list[Hit]:
        """Score, sort (stable, ties keep first-stage order), keep the top ``k``, renumber ranks;
        each hit's ``score`` and ``rerank_score`` are then the reranker's."""
        if not hits:
            return []
        scores = np.asarray(self.score(query, hits), dtype=np.float64)
        order = np.argsort(-scores, kind="stable")[:k]
        return [dataclasses.replace(hits[int(i)], score=float(scores[i]), rerank_score=float(scores[i]), rank=rank)
                for rank, i in enumerate(order, start=1)]

    @abstractmethod
    def token_writer(self) -> "TokenWriter | None":
        """What an index run writes to the token cache for this reranker (e.g. its image memory,
        derived from the encoder's patch tokens), or None when it reads nothing from the cache:
        index runs then keep the encoder's raw patch tokens, as without a reranker."""

    def image_side(self) -> ImageSide | None:
        """The reranker's own image encoder, when what it caches is not derived from the
        first-stage encoder's patch tokens (e.g. BLIP's vision transformer, with its own
        preprocessing): index runs and ``mmr cache build`` then decode each image once for both
        models (:class:`mm_retrieval.encoding.ImageEncoding`) and write its :meth:`ImageSide.encode`
        output through :meth:`token_writer`. None (the default): :meth:`token_writer` takes the
        encoder's patch tokens. May warm the reranker up."""
        return None

    def attention_maps(self, query: "Query", hit: Hit, image: Any = None) -> AttentionMaps:
        """What the reranker attended to when scoring ``hit`` for ``query``; ``image`` (a PIL
        image not in the collection) is scored instead of the hit's cached data. Only rerankers
        with ``can_explain``; the others raise :class:`ConfigError`."""
        raise ConfigError(
            f"{self.label} cannot show what it attended to; explaining needs a reranker that can "
            "(e.g. reranker/cross_attention: pass --rerank DIR from `mmr train-reranker`)"
        )


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Yield lists of at most ``size`` items."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
