"""The stage interfaces.

Every stage has one lifecycle: ``__init__(config)`` is cheap and JSON-serialisable (it only
validates the config), ``warm_up()`` does the heavy loading (models, connections) and is called
once, lazily, by whoever first needs it. Each role has one abstract method; the base classes own
batching, sorting and validation.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from contextlib import contextmanager
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..config import config_from_dict, config_to_dict
from ..errors import MMRError, StageError
from ..types import Hit, Record


@dataclasses.dataclass(frozen=True)
class NoConfig:
    """Config of a stage that takes no parameters."""


class Stage:
    """Base of every stage. Subclasses set ``Config`` to a frozen dataclass."""

    Config: ClassVar[type] = NoConfig
    stage_kind: ClassVar[str] = ""
    stage_name: ClassVar[str] = ""

    def __init__(self, config: Any = None, **overrides: Any):
        if config is None or isinstance(config, dict):
            data = {**(config or {}), **{k: v for k, v in overrides.items() if v is not None}}
            config = config_from_dict(self.Config, data, where=f"{self.label} config")
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


class Source(Stage):
    """Lists the records (image files + text + metadata) to index."""

    @abstractmethod
    def records(self) -> Iterator[Record]:
        """Yield every record; unreadable rows are reported through :attr:`problems`."""

    @property
    def problems(self) -> list[tuple[str, str]]:
        """(path, reason) for entries the source itself had to drop (e.g. missing files)."""
        return getattr(self, "_problems", [])


class Encoder(Stage):
    """Turns images and texts into L2-normalised vectors of one shared space.

    Subclasses provide the model; the base class owns decoding in workers and batching
    (see :meth:`encode_files`).
    """

    dim: int
    fingerprint: str  # identifies the weights: collections and caches are keyed by it

    @abstractmethod
    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """[N, D] float32, L2-normalised."""

    @abstractmethod
    def encode_pixels(self, pixels: Any, *, with_tokens: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Encode a preprocessed batch: ([N, D] float32 normalised, [N, P, W] tokens or None)."""

    @property
    @abstractmethod
    def image_transform(self) -> Any:
        """PIL image -> model input tensor. Runs in decoding workers, so it must be picklable."""

    def info(self) -> dict[str, Any]:
        """What a collection records about the encoder that built it."""
        return {"stage": self.stage_name, "fingerprint": self.fingerprint, "dim": self.dim}


class Store(Stage):
    """A vector collection with metadata, searchable with filters."""

    def cache_dir(self) -> Path:
        """Folder for this collection's side data (token caches); stores override it."""
        raise NotImplementedError(f"{self.label} does not provide a cache folder")

    @abstractmethod
    def search(self, vectors: np.ndarray, limit: int, filter: str = "") -> list[list[Hit]]:
        """For each query vector, the best ``limit`` hits (score = similarity, higher is better)."""


class Reranker(Stage):
    """Rescores first-stage hits for a text query."""

    @abstractmethod
    def score(self, query: str, hits: Sequence[Hit]) -> np.ndarray:
        """One score per hit (higher is better)."""

    def rerank(self, query: str, hits: Sequence[Hit], k: int) -> list[Hit]:
        """Score, sort (stable, ties keep first-stage order), keep the top ``k``, renumber ranks."""
        if not hits:
            return []
        scores = np.asarray(self.score(query, hits), dtype=np.float64)
        order = np.argsort(-scores, kind="stable")[:k]
        out = []
        for rank, i in enumerate(order, start=1):
            h = dataclasses.replace(hits[int(i)], score=float(scores[i]), rank=rank)
            out.append(h)
        return out


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


def encode_files(
    encoder: Encoder,
    paths: list[str],
    *,
    known_ids: frozenset[str] = frozenset(),
    with_tokens: bool = False,
) -> Iterator[tuple[list[Any], np.ndarray, np.ndarray | None]]:
    """Read, hash, decode and encode image files, decoding in DataLoader workers so that it
    overlaps the forward pass. Yields ``(items, embeddings, tokens)`` per batch, where
    ``embeddings[j]`` belongs to the j-th item with ``decoded`` set.
    """
    from torch.utils.data import DataLoader

    from ..decode import DEFAULT_MAX_PIXELS, ImageFileDataset, collate_items

    encoder.warm_up()
    cfg = encoder.config
    workers = int(getattr(cfg, "workers", 0))
    dataset = ImageFileDataset(
        paths, encoder.image_transform, known_ids=known_ids, max_pixels=int(getattr(cfg, "max_pixels", DEFAULT_MAX_PIXELS))
    )
    loader = DataLoader(
        dataset,
        batch_size=int(getattr(cfg, "batch_size", 32)),
        num_workers=workers,
        collate_fn=collate_items,
        prefetch_factor=4 if workers else None,
        pin_memory=str(getattr(encoder, "device", "cpu")).startswith("cuda"),
    )
    empty = np.zeros((0, 0), dtype=np.float32)
    with _cpu_threads(encoder):
        for items, pixels in loader:
            if pixels is None:
                yield items, empty, None
                continue
            emb, tokens = encoder.encode_pixels(pixels, with_tokens=with_tokens)
            yield items, emb, tokens


def indexing_threads(encoder: Encoder) -> int:
    """The torch thread count :func:`encode_files` runs a (warm) encoder with: on a CPU, one
    thread fewer per decoding worker (at least one), since torch's intra-op threads and the
    workers otherwise compete for the same cores and an OpenMP thread that loses its core stalls
    the others at every barrier (measured 1.2x indexing throughput on 2 cores with 2 workers);
    the encoder config's ``index_threads`` (when > 0) instead. Elsewhere torch's current count."""
    import torch

    current = torch.get_num_threads()
    if str(getattr(encoder, "device", "cpu")) != "cpu":
        return current
    configured = int(getattr(encoder.config, "index_threads", 0) or 0)
    return configured if configured > 0 else max(1, current - int(getattr(encoder.config, "workers", 0)))


@contextmanager
def _cpu_threads(encoder: Encoder) -> Iterator[None]:
    """Torch on :func:`indexing_threads` threads; the setting is process-wide, so it is restored
    as soon as the loop ends or is abandoned."""
    import torch

    before, wanted = torch.get_num_threads(), indexing_threads(encoder)
    if wanted == before:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)
