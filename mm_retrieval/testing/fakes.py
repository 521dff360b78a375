"""A second implementation of the encoder and store contracts: fast, deterministic, in memory.

:class:`HashEncoder` (``encoder/hash``) turns texts and images into unit vectors by hashing and a
fixed random projection: no model, no download, the same vector in every process.
:class:`InMemoryStore` (``store/memory``) keeps a collection in a dict and searches it by brute
force, with the same filter language (:mod:`.filters`), search modes, hybrid fusion and media
grouping as Milvus. Both pass the same contract tests as ``encoder/open_clip`` and
``store/milvus`` (:mod:`mm_retrieval.testing.contracts`, run in ``tests/contract/``), so code
above them can be unit-tested in seconds::

    from mm_retrieval import Pipeline
    from mm_retrieval.testing.fakes import HashEncoder, InMemoryStore

    pipe = Pipeline(encoder=HashEncoder(), store=InMemoryStore())
    pipe.index("photos/")

The vectors carry no meaning (a text and an image of the same thing are not close); tests of
ranking quality need a real model (``tests.helpers.TINY``). Importing this module registers both
stages, so that ``registry.create("store", "memory")`` and pipeline files naming them work.
"""

from __future__ import annotations

import copy
import hashlib
import math
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..decode import DEFAULT_MAX_PIXELS
from ..errors import ConfigError, IncompatibleError, InputError
from ..registry import register
from ..stages.base import Encoder, SettingsFromConfig, Store
from ..types import Hit
from .filters import compile_filter

__all__ = ["HashEncoder", "HashEncoderConfig", "InMemoryStore", "InMemoryStoreConfig"]


# ---- encoder -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HashEncoderConfig:
    dim: int = 32  # length of every vector
    image_size: int = 16  # images are resized to image_size x image_size before the projection
    patch: int = 4  # patch side in pixels: (image_size / patch)^2 patch tokens per image
    context_length: int = 16  # text tokens (words) per text, as a tokenizer's context length
    seed: int = 0  # another seed, another projection (and another fingerprint)
    batch_size: int = 32
    workers: int = 0  # decoding worker processes at index time
    index_threads: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are skipped as decompression bombs


class ResizeToTensor:
    """PIL image -> float32 tensor [3, S, S] in [0, 1]; a module-level class so it pickles into
    decoding workers."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Any) -> Any:
        import torch
        from PIL import Image

        rgb = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0)


class WordTokenizer:
    """``list[str] -> [N, C]`` int64 token ids: one per word (a hash), 0 for padding."""

    def __init__(self, context_length: int):
        self.context_length = context_length

    def words(self, text: str) -> list[str]:
        return text.lower().split()[: self.context_length]

    def __call__(self, texts: Sequence[str]) -> Any:
        import torch

        ids = torch.zeros((len(texts), self.context_length), dtype=torch.int64)
        for i, text in enumerate(texts):
            for j, word in enumerate(self.words(text)):
                ids[i, j] = 1 + int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little")
        return ids


def _hashed_unit(key: str, dim: int) -> np.ndarray:
    """A unit vector [dim] that depends only on ``key`` (the same in every process)."""
    seed = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim)
    return (v / np.linalg.norm(v)).astype(np.float32)


@register("encoder", "hash")
class HashEncoder(SettingsFromConfig, Encoder):
    """Texts -> a vector seeded by their hash; images -> a fixed random projection of their
    pixels (so similar images get similar vectors). CPU only, no model files."""

    Config = HashEncoderConfig

    def __init__(self, config: Any = None, **overrides: Any):
        super().__init__(config, **overrides)
        c = self.config
        if c.dim < 1 or c.patch < 1 or c.image_size % c.patch:
            raise ConfigError(f"encoder/hash: dim ({c.dim}) and patch ({c.patch}) must be at least 1, and image_size "
                              f"({c.image_size}) a multiple of patch")

    @property
    def dim(self) -> int:
        return int(self.config.dim)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def fingerprint(self) -> str:
        c = self.config
        return f"hash-d{c.dim}-s{c.image_size}-p{c.patch}-c{c.context_length}-seed{c.seed}"

    def _warm_up(self) -> None:
        c = self.config
        rng = np.random.default_rng(c.seed)
        self._project = rng.standard_normal((3 * c.image_size ** 2, c.dim)) / math.sqrt(3 * c.image_size ** 2)
        self._patch_project = rng.standard_normal((3 * c.patch ** 2, c.dim)).astype(np.float32)
        self.tokenizer = WordTokenizer(c.context_length)

    @property
    def image_transform(self) -> Any:
        return ResizeToTensor(self.config.image_size)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i] = _hashed_unit(f"{self.config.seed}:text:{text}", self.dim)
        return out

    def encode_text_tokens(self, texts: Sequence[str], *, with_tokens: bool = True) -> tuple[Any, Any, Any]:
        import torch

        self.warm_up()
        n, c = len(texts), self.config.context_length
        mask = torch.zeros((n, c), dtype=torch.bool)
        tokens = torch.zeros((n, c, self.dim), dtype=torch.float32) if with_tokens else None
        for i, text in enumerate(texts):
            words = self.tokenizer.words(text) or [""]  # an empty text still has one token
            mask[i, : len(words)] = True
            if tokens is not None:
                for j, word in enumerate(words):
                    tokens[i, j] = torch.from_numpy(_hashed_unit(f"{self.config.seed}:word:{word}", self.dim))
        return torch.from_numpy(self.encode_text(texts)), tokens, mask

    def encode_pixels(self, pixels: Any, *, with_tokens: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        self.warm_up()
        x = np.asarray(pixels.detach().cpu().float().numpy() if hasattr(pixels, "detach") else pixels, dtype=np.float64)
        n = x.shape[0]
        flat = x.reshape(n, -1) - 0.5  # centred, so that colours point different ways
        emb = flat @ self._project
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        if not with_tokens:
            return emb.astype(np.float32), None
        p, s = self.config.patch, self.config.image_size
        g = s // p
        patches = x.reshape(n, 3, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, 3 * p * p)
        tokens = (patches.astype(np.float32) @ self._patch_project).astype(np.float16)
        return emb.astype(np.float32), tokens


# ---- store ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InMemoryStoreConfig:
    collection: str = "images"
    metric: str = "IP"  # IP (cosine on unit vectors), COSINE or L2 (reported negated)
    cache_dir: str = ""  # token caches go in a folder per collection here; empty: a temporary folder per store


# The fields a filter may name, and those a hit carries.
ROW_FIELDS = ("id", "path", "content_hash", "caption", "metadata", "file_size", "mtime_ns", "has_image", "has_text",
              "media_id", "start", "end", "frame", "segments")


@register("store", "memory")
class InMemoryStore(Store):
    """One collection in a dict, searched by brute force. It lives as long as the object (closing
    keeps it: :meth:`close` releases nothing), so two stores never share data."""

    Config = InMemoryStoreConfig

    def __init__(self, config: Any = None, **overrides: Any):
        super().__init__(config, **overrides)
        if self.config.metric.upper() not in ("IP", "COSINE", "L2"):
            raise ConfigError(f"store/memory: unknown metric {self.config.metric!r}; use IP, COSINE or L2")
        self._lock = threading.RLock()
        self._info: dict[str, Any] | None = None  # the encoder's info; None: no collection
        self._rows: dict[str, dict[str, Any]] = {}
        self._tmp: str | None = None

    # ---- the collection ------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.collection

    @property
    def metric(self) -> str:
        return self.config.metric.upper()

    def cache_dir(self) -> Path:
        if self.config.cache_dir:
            return Path(self.config.cache_dir).expanduser() / self.name
        if self._tmp is None:  # named now, created by whoever writes there first
            self._tmp = str(Path(tempfile.gettempdir()) / f"mmr-memory-{uuid.uuid4().hex}")
        return Path(self._tmp) / self.name

    def close(self) -> None:
        self._warm = False

    def exists(self) -> bool:
        return self._info is not None

    def require(self) -> None:
        if not self.exists():
            raise InputError(f"collection {self.name!r} does not exist in this in-memory store; index some items first")

    def encoder_info(self) -> dict[str, Any] | None:
        return copy.deepcopy(self._info)

    def check_compatible(self, encoder_info: dict[str, Any]) -> None:
        stored = self._info
        if stored is None:
            return
        dim = encoder_info.get("dim")  # None: not known without the model (Encoder.cheap_info)
        if stored.get("fingerprint") != encoder_info.get("fingerprint") or (dim is not None and stored.get("dim") != dim):
            raise IncompatibleError(
                f"collection {self.name!r} was built with encoder {stored.get('fingerprint')} (dim {stored.get('dim')}), "
                f"not {encoder_info.get('fingerprint')} (dim {encoder_info.get('dim')}): vectors of different encoders "
                "can't be compared; use the collection's encoder, or another collection"
            )

    def check_filter(self, filter: str) -> None:
        compile_filter(filter, ROW_FIELDS)

    def ensure_collection(self, encoder_info: dict[str, Any]) -> None:
        with self._lock:
            if self._info is not None:
                self.check_compatible(encoder_info)
                return
            self._info = copy.deepcopy(dict(encoder_info))

    def drop(self) -> None:
        with self._lock:
            self._info, self._rows = None, {}
        shutil.rmtree(self.cache_dir(), ignore_errors=True)

    @property
    def _dim(self) -> int:
        return int(self._info["dim"]) if self._info else 0

    # ---- writes --------------------------------------------------------------------------
    def upsert(self, rows: Sequence[dict[str, Any]]) -> None:
        self.require()
        clean = [self._clean(r) for r in rows]  # all checked before any is written
        with self._lock:
            for row in clean:
                self._rows[row["id"]] = row

    def _clean(self, r: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(r.get("id"), str) or not r["id"] or len(r["id"]) > 64:
            raise InputError(f"store/memory: a row's id must be a string of 1 to 64 characters, got {r.get('id')!r}")
        vector = np.array(r["vector"], dtype=np.float32).reshape(-1)
        text = r.get("text_vector")
        text = None if text is None else np.array(text, dtype=np.float32).reshape(-1)
        for what, v in (("vector", vector), ("text_vector", text)):
            if v is not None and v.shape != (self._dim,):
                raise InputError(f"store/memory: row {r['id']}: {what} has {v.shape[0]} values; collection "
                                 f"{self.name!r} holds vectors of dim {self._dim}")
        return {
            "id": r["id"], "vector": vector, "text_vector": text, "has_image": bool(r.get("has_image", True)),
            "has_text": text is not None, "path": r["path"], "content_hash": r.get("content_hash", ""),
            "caption": r.get("caption") or "", "metadata": copy.deepcopy(r.get("metadata") or {}),
            "file_size": int(r.get("file_size") or 0), "mtime_ns": int(r.get("mtime_ns") or 0),
            "media_id": r.get("media_id") or r["id"], "start": float(r.get("start") or 0.0),
            "end": float(r.get("end") or 0.0), "frame": float(r.get("frame") or 0.0), "segments": int(r.get("segments") or 0),
        }

    def delete(self, ids: Iterable[str]) -> None:
        with self._lock:
            for i in ids:
                self._rows.pop(i, None)

    def flush(self) -> None:
        pass  # every write is visible at once

    # ---- reads ---------------------------------------------------------------------------
    def count(self) -> int:
        return len(self._rows)

    def count_with_text(self) -> int:
        return sum(r["has_text"] for r in self._snapshot())

    def has_text_vectors(self) -> bool:
        return self.exists()

    def has_media_fields(self) -> bool:
        return True

    def _snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._rows.values())

    def _matching(self, filter: str) -> list[dict[str, Any]]:
        keep = compile_filter(filter, ROW_FIELDS)
        return [r for r in self._snapshot() if keep(r)]

    def _fields(self, row: dict[str, Any], fields: Sequence[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"id": row["id"]}
        for f in fields:
            if f not in row:
                raise InputError(f"store/memory: unknown field {f!r}; fields: vector, text_vector, {', '.join(ROW_FIELDS)}")
            v = row[f]
            if f in ("vector", "text_vector"):
                v = (np.zeros(self._dim, np.float32) if v is None else v).tolist()
            out[f] = copy.deepcopy(v)
        return out

    def get(self, ids: Sequence[str], fields: Sequence[str]) -> list[dict[str, Any]]:
        with self._lock:
            rows = [self._rows[i] for i in dict.fromkeys(ids) if i in self._rows]
        return [self._fields(r, fields) for r in rows]

    def iter_rows(self, fields: Sequence[str] = ("id", "path"), filter: str = "") -> Iterator[dict[str, Any]]:
        for r in self._matching(filter):
            yield self._fields(r, fields)

    def query(self, filter: str, fields: Sequence[str], limit: int) -> list[dict[str, Any]]:
        return [self._fields(r, fields) for r in self._matching(filter)[:limit]]

    # ---- search --------------------------------------------------------------------------
    def _scores(self, rows: list[dict[str, Any]], field: str, q: np.ndarray) -> np.ndarray:
        if not rows:
            return np.zeros(0)
        m = np.stack([r[field] for r in rows]).astype(np.float64)
        q = q.astype(np.float64)
        if self.metric == "L2":
            return -np.sum((m - q) ** 2, axis=1)
        s = m @ q
        if self.metric == "COSINE":
            s /= np.maximum(np.linalg.norm(m, axis=1) * np.linalg.norm(q), 1e-12)
        return s

    def _ranked(self, rows: list[dict[str, Any]], scores: np.ndarray, limit: int, group: bool) -> list[tuple[dict, float]]:
        order = np.argsort(-scores, kind="stable")
        out: list[tuple[dict, float]] = []
        seen: set[str] = set()
        for i in order:
            row = rows[int(i)]
            if group:
                if row["media_id"] in seen:
                    continue
                seen.add(row["media_id"])
            out.append((row, float(scores[i])))
            if len(out) >= limit:
                break
        return out

    def _leg(self, mode: str, filter: str, *, images_only: bool = False) -> list[dict[str, Any]]:
        rows = self._matching(filter)
        if mode == "image":
            return [r for r in rows if r["has_image"]]
        return [r for r in rows if r["has_text"] and (r["has_image"] or not images_only)]

    def search(self, vectors: np.ndarray, limit: int, filter: str = "", *, mode: str = "image",
               group_by_media: bool = False) -> list[list[Hit]]:
        if mode not in ("image", "text"):
            raise InputError(f"unknown search mode {mode!r}; use image, text or hybrid")
        self.require()
        rows = self._leg(mode, filter)
        field = "vector" if mode == "image" else "text_vector"
        out = []
        for q in np.asarray(vectors, dtype=np.float32).reshape(-1, self._dim):
            ranked = self._ranked(rows, self._scores(rows, field, q), limit, group_by_media)
            out.append([_hit(row, score, rank) for rank, (row, score) in enumerate(ranked, start=1)])
        return out

    def hybrid_search(self, vector: np.ndarray, limit: int, filter: str = "", *, ranker: str = "rrf",
                      weights: tuple[float, float] = (0.5, 0.5), rrf_k: int = 60,
                      images_only: bool = False, group_by_media: bool = False) -> list[Hit]:
        """Like Milvus: each leg's best ``limit`` rows, fused by RRF (``1 / (rrf_k + rank)`` summed
        over the legs a row is in) or a weighted sum of scores squashed into (0, 1) (IP and
        COSINE: ``0.5 + atan(s) / pi``; L2: ``1 - 2 atan(d) / pi``)."""
        if ranker not in ("rrf", "weighted"):
            raise InputError(f"unknown hybrid ranker {ranker!r}; use rrf or weighted")
        self.require()
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        fused: dict[str, float] = {}
        rows: dict[str, dict[str, Any]] = {}
        for leg, (mode, field) in enumerate((("image", "vector"), ("text", "text_vector"))):
            candidates = self._leg(mode, filter, images_only=images_only)
            for rank, (row, score) in enumerate(self._ranked(candidates, self._scores(candidates, field, q), limit, False), 1):
                rows[row["id"]] = row
                if ranker == "rrf":
                    part = 1.0 / (rrf_k + rank)
                else:
                    squashed = 1 - 2 * math.atan(-score) / math.pi if self.metric == "L2" else 0.5 + math.atan(score) / math.pi
                    part = weights[leg] * squashed
                fused[row["id"]] = fused.get(row["id"], 0.0) + part
        ids = list(fused)
        ranked = self._ranked([rows[i] for i in ids], np.array([fused[i] for i in ids]), limit, group_by_media)
        hits = []
        for rank, (row, score) in enumerate(ranked, start=1):
            hit = _hit(row, score, rank)
            if row["has_image"]:
                hit.image_score = float(self._scores([row], "vector", q)[0])
            if row["has_text"]:
                hit.text_score = float(self._scores([row], "text_vector", q)[0])
            hits.append(hit)
        return hits


def _hit(row: dict[str, Any], score: float, rank: int) -> Hit:
    hit = Hit(id=row["id"], path=row["path"], score=score, retrieval_score=score, caption=row["caption"] or None,
              metadata=copy.deepcopy(row["metadata"]), rank=rank, has_image=row["has_image"])
    if row["media_id"] != row["id"]:  # a video segment
        hit.video_id, hit.start, hit.end, hit.frame = row["media_id"], row["start"], row["end"], row["frame"]
    return hit
