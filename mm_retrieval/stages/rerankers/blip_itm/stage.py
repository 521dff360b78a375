"""The stage ``reranker/blip_itm``: BLIP's image-text matching head over cached vision tokens.

At index time BLIP's vision transformer runs once per image (:meth:`BlipItmReranker.image_side`)
and its tokens go to the token cache (:meth:`BlipItmReranker.token_writer`), keyed by item id and
:attr:`BlipItmReranker.fingerprint` (checkpoint identity, input size and storage option). At
query time BLIP's text encoder cross-attends to the cached tokens of all candidates in one batch
(chunked) and the ITM head scores each pair; no image is decoded or encoded again.

Score, as BLIP's own retrieval evaluation ranks its ITC top-k::

    score = itm_match_logit + itc_weight * first_stage_cosine

where ``itm_match_logit`` is the raw logit of the ITM head's class 1 ("match"), not a softmax
probability, and the first-stage cosine stands in for BLIP's ITC similarity (``itc_weight`` 1.0
as in BLIP; 0 ranks by ITM alone, as ALBEF does).

The text side (:mod:`.itm`) folds each cross-attention layer's key and value projections into
the query for short queries (``cross_attention="auto"``: up to ``fold_max_tokens`` tokens, by
default where folding stops paying) instead of projecting all cached tokens of every candidate in
every layer; both ways give transformers' logits (fp32 parity is tested).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ....devices import autocast, autocast_dtype, check_device, check_precision, resolve_device
from ....errors import ConfigError, IncompatibleError, InputError
from ....registry import register
from ....tokencache import TokenCache, TokenWriter, cache_path, caches_in
from ....types import AttentionMaps, Hit
from ...base import Reranker
from . import storage as store_codec
from .load import DEFAULT_CHECKPOINT, checkpoint_digest, load_blip, looks_like_blip, read_config, require_transformers, resolve_checkpoint

log = logging.getLogger(__name__)

_LAZY_INIT = threading.RLock()  # image_side() may warm the stage up, which must not deadlock
_MAX_KEPT_BYTES = 1 << 30  # larger candidate lists read into a fresh (pageable) buffer
FIRST_TOKENS = ("cls", "enc")
CROSS_ATTENTION = ("auto", "folded", "standard")
# Where folding stops paying, as a fraction of the multiply-accumulate break-even (itm.break_even_tokens:
# 62 query tokens for BLIP-base): the folded products run at ~38 GMAC/s of CPU time against the
# standard path's ~43 (fp32, BLIP-base, 8 candidates, one thread of a shared 2-core CPU: per pair 73
# vs 215 ms at 12 tokens, 290 vs 296 at 48, 360 vs 317 at 64), so time crosses near 50 tokens.
# `mmr bench --suite blip` measures it again ("fold" -> "break_even").
MEASURED_BREAK_EVEN_FRACTION = 0.8


@dataclass(frozen=True)
class BlipItmConfig:
    checkpoint: str = DEFAULT_CHECKPOINT  # a hub id or a local directory saved with save_pretrained
    storage: str = "fp16"  # cached token format: fp16 (886 KB/image, base 384 px) | int8 (444 KB) | fp32 (exact)
    image_size: int = 0  # input pixels per side; 0: the checkpoint's (384 for the hub models); e.g. 224
    itc_weight: float = 1.0  # score = ITM match logit + itc_weight * first-stage cosine (BLIP's eval: 1)
    first_token: str = "cls"  # cls: transformers' BlipProcessor input | enc: BLIP's original [ENC]
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto: bf16 (or fp16) autocast on CUDA, fp32 on CPU
    chunk_size: int = 128  # candidates per text-encoder forward
    cross_attention: str = "auto"  # auto (folded up to fold_max_tokens query tokens, standard above) | folded | standard
    fold_max_tokens: int = 0  # auto's switch point (query tokens, padding included); 0: this model's break-even
    cache_dir: str | None = None  # Hugging Face cache for hub checkpoints (default: HF_HOME's)

    def __post_init__(self) -> None:
        store_codec.check_storage(self.storage)
        if self.first_token not in FIRST_TOKENS:
            raise ConfigError(f"unknown first_token {self.first_token!r}; use one of {', '.join(FIRST_TOKENS)}")
        check_device(self.device, where="reranker device")
        check_precision(self.precision)
        if self.image_size < 0:
            raise ConfigError(f"image_size must be 0 (the checkpoint's) or a positive number of pixels, got {self.image_size}")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be at least 1, got {self.chunk_size}")
        if self.cross_attention not in CROSS_ATTENTION:
            raise ConfigError(f"unknown cross_attention {self.cross_attention!r}; use one of {', '.join(CROSS_ATTENTION)}")
        if self.fold_max_tokens < 0:
            raise ConfigError(f"fold_max_tokens must be 0 (this model's break-even) or a number of query tokens, got {self.fold_max_tokens}")


class BlipTokenWriter(TokenWriter):
    """Writes BLIP vision tokens ``[P, W]`` in the reranker's storage format. Anything of another
    shape (e.g. the first-stage encoder's patch tokens) is refused, never stored."""

    def __init__(self, cache: TokenCache, *, storage: str, shape: tuple[int, int], info: Mapping[str, Any] | None = None):
        super().__init__(cache, project=lambda batch: store_codec.encode(batch, storage))
        self.shape = shape
        if info is not None and cache.info != dict(info):
            cache.set_info(dict(info))  # `mmr cache info` shows the real [P, W], not the packed fp16 shape

    def add(self, item_id: str, tokens: np.ndarray) -> None:
        if tuple(np.shape(tokens)) != self.shape:
            raise IncompatibleError(
                f"BLIP token writer got tokens of shape {tuple(np.shape(tokens))}, expected {self.shape}: index runs must "
                "feed it the output of the reranker's own image side (BlipItmReranker.image_side()), not the encoder's tokens"
            )
        super().add(item_id, tokens)


@register("reranker", "blip_itm")
class BlipItmReranker(Reranker):
    """Rescores first-stage hits with a BLIP image-text retrieval model (``--rerank Salesforce/blip-itm-base-coco``)."""

    Config = BlipItmConfig
    needs_text_features: ClassVar[bool] = False  # BLIP has its own text side (query.memo)
    can_explain: ClassVar[bool] = True
    references: ClassVar[str] = ("a BLIP image-text retrieval model: a hub name such as Salesforce/blip-itm-base-coco, "
                                 "or a directory saved from one (it holds config.json)")

    @classmethod
    def accepts(cls, ref: str) -> bool:
        """A hub id (``org/name``, not a local path) or a transformers checkpoint directory (see
        :func:`~.load.looks_like_blip`)."""
        return looks_like_blip(ref)

    # ---- identity (no model loaded) --------------------------------------------------------
    @cached_property
    def checkpoint_dir(self) -> Path:
        """The local directory of the checkpoint (a hub id is fetched or found in the cache)."""
        return resolve_checkpoint(self.config.checkpoint, cache_dir=self.config.cache_dir)

    @cached_property
    def geometry(self) -> dict[str, int]:
        """Input size, patch size, token count and width of the cached tokens (from config.json)."""
        vc = read_config(self.checkpoint_dir).get("vision_config") or {}
        native, patch, width = int(vc.get("image_size", 384)), int(vc.get("patch_size", 16)), int(vc.get("hidden_size", 768))
        size = self.config.image_size or native
        if size % patch or size < patch:
            raise ConfigError(f"image_size {size} is not a multiple of {self.config.checkpoint}'s patch size {patch} (e.g. 224 or 384)")
        grid = size // patch
        return {"image_size": size, "native_size": native, "patch_size": patch, "grid": grid, "tokens": grid * grid + 1, "width": width}

    @cached_property
    def fingerprint(self) -> str:
        """Keys the token cache: checkpoint files, input size and storage option. Another
        checkpoint, resolution or storage gets another cache file, never these tokens."""
        g = self.geometry
        return f"blip-{checkpoint_digest(self.checkpoint_dir)[:12]}-{g['image_size']}px-{self.config.storage}"

    def info(self) -> dict[str, Any]:
        """What the reranker caches per image (for `mmr cache info` and benchmarks)."""
        g = self.geometry
        return {
            "stage": self.label, "checkpoint": self.config.checkpoint, "fingerprint": self.fingerprint,
            "image_size": g["image_size"], "storage": self.config.storage, "tokens": g["tokens"], "width": g["width"],
            "bytes_per_image": store_codec.stored_bytes(g["tokens"], g["width"], self.config.storage),
        }

    # ---- loading ---------------------------------------------------------------------------
    def _warm_up(self) -> None:
        from .image import BlipImageSide, BlipImageTransform
        from .itm import BlipItmTextSide, break_even_tokens

        require_transformers()
        self.device = resolve_device(self.config.device)
        g = self.geometry
        loaded = load_blip(self.checkpoint_dir, ref=self.config.checkpoint, device=self.device)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        vc = self.model.config.vision_config
        if (int(vc.image_size), int(vc.patch_size), int(vc.hidden_size)) != (g["native_size"], g["patch_size"], g["width"]):
            raise IncompatibleError(f"{self.config.checkpoint}: the loaded vision config does not match its config.json")
        self._transform = BlipImageTransform.from_processor(loaded.image_processor, g["image_size"])
        self._dtype = autocast_dtype(self.device, self.config.precision)
        self._image_side = BlipImageSide(self.model, self._transform, native_size=g["native_size"], device=self.device, autocast=self._autocast)
        self._text = BlipItmTextSide(self.model)
        self.fold_max_tokens = self.config.fold_max_tokens or max(
            1, round(MEASURED_BREAK_EVEN_FRACTION * break_even_tokens(self._text.geometry, g["tokens"])))
        tc = self.model.config.text_config
        self.max_tokens = int(min(tc.max_position_embeddings, getattr(self.tokenizer, "model_max_length", 512) or 512))
        self._memo_key = f"blip_itm/{checkpoint_digest(self.checkpoint_dir)[:12]}/{self.config.first_token}/{self.max_tokens}"
        self._said_truncated = False
        self._cache: TokenCache | None = None
        self._stored_shape = store_codec.stored_shape(g["tokens"], g["width"], self.config.storage)
        self._buffers = threading.local()

    def _autocast(self):
        return autocast(self.device, self._dtype)

    # ---- index time ------------------------------------------------------------------------
    def image_side(self):
        """BLIP's own image side (picklable ``transform`` for the decoding workers, ``encode``
        for each batch): what an index run or ``mmr cache build`` runs on every image, in the
        same decode batches as the first-stage encoder; the tokens go to :meth:`token_writer`."""
        self.warm_up()
        return self._image_side

    @property
    def transform(self):
        """BLIP's preprocessing: PIL image -> [3, S, S] float32 (picklable; see :mod:`.image`)."""
        self.warm_up()
        return self._transform

    @property
    def cache_path(self) -> Path:
        """This reranker's token cache file in the bound store's cache folder."""
        if self.store is None:
            raise ConfigError(f"{self.label} needs its store: call bind(encoder=..., store=...) first (Pipeline does)")
        return cache_path(self.store.cache_dir(), self.fingerprint)

    def token_writer(self) -> BlipTokenWriter:
        """Where an index run writes the output of :meth:`image_side` (per item id)."""
        g = self.geometry
        shape = store_codec.stored_shape(g["tokens"], g["width"], self.config.storage)
        cache = TokenCache(self.cache_path, self.fingerprint)
        if cache.shape is not None and tuple(cache.shape) != shape:
            raise IncompatibleError(f"token cache {self.cache_path} holds arrays of shape {cache.shape}, not {shape}; delete it and rebuild")
        info = {k: v for k, v in self.info().items() if k != "stage"}
        return BlipTokenWriter(cache, storage=self.config.storage, shape=(g["tokens"], g["width"]), info=info)

    # ---- query time ------------------------------------------------------------------------
    def query_tokens(self, query: Any):
        """The query's BLIP tokens, computed once per query (``query.memo``)."""
        from .text import tokenize_query

        self.warm_up()
        q = query.memo(self._memo_key, lambda: tokenize_query(
            self.tokenizer, query.text, max_tokens=self.max_tokens, first_token=self.config.first_token))
        if q.truncated and not self._said_truncated:
            self._said_truncated = True
            log.warning("a query of %d BLIP tokens was cut to the text encoder's limit of %d (said once)",
                        q.truncated + int(q.ids.shape[1]), self.max_tokens)
        return q

    def cached_tokens(self, ids: Sequence[str]) -> np.ndarray:
        """[len(ids), *stored shape] fp16 arrays from the token cache; InputError naming the fix
        when any is missing (or IncompatibleError when the cache is another checkpoint's)."""
        out = np.empty((len(ids), *self._stored_shape), dtype=np.float16)
        self._read(ids, out)
        return out

    def _read(self, ids: Sequence[str], out: np.ndarray, hits: Sequence[Hit] | None = None, keep: Sequence[str] = ()) -> dict[int, str]:
        """Fill ``out`` [len(ids), *stored shape] with the cached arrays of ``ids``. In a cache
        filled lazily (``mmr index --tokens lazy``) the missing ones are computed from ``hits``'
        files in one batch and stored (a budget evicts none of ``ids`` and ``keep``); returns
        {row: why} for those that could not be (their rows are zeros). Else a missing one is an
        InputError naming the fix."""
        cache = self._open_cache()
        if cache is None:
            raise self._missing(list(ids), len(ids))
        _, present = cache.gather(ids, out=out)  # straight into ``out``: one copy of ~90 MB, not two
        if present.all():
            return {}
        missing = [k for k, ok in enumerate(present) if not ok]
        if hits is None or cache.fill != "lazy":
            raise self._missing([ids[k] for k in missing], len(ids))
        with self.lazy.lock:  # one fill at a time: another query may have just filled these
            _, again = cache.gather([ids[k] for k in missing], out=(part := np.empty((len(missing), *out.shape[1:]), out.dtype)))
            for j, k in enumerate(missing):
                if again[j]:
                    out[k] = part[j]
            missing = [k for j, k in enumerate(missing) if not again[j]]
            done, failed = self.lazy.fill(cache, [hits[k] for k in missing], keep=[*ids, *keep])
        unscored = {}
        for k in missing:
            if ids[k] in done:
                out[k] = done[ids[k]]
            else:
                out[k] = 0
                unscored[k] = failed.get(ids[k], "its tokens could not be computed")
        return unscored

    def _open_cache(self) -> TokenCache | None:
        self.warm_up()
        if self._cache is not None and self._cache.replaced():
            self._cache.close()
            self._cache = None
        if self._cache is None:
            if not self.cache_path.exists():
                return None
            self._cache = TokenCache(self.cache_path, self.fingerprint, create=False)
        return self._cache

    @property
    def lazy(self):
        """What computes missing tokens at query time in a lazily filled cache (:mod:`mm_retrieval.tokencache.lazy`):
        one per stage, made on first use (by whichever thread comes first: a server's worker or its device thread)."""
        from ....tokencache.lazy import LazyFill

        with _LAZY_INIT:
            if self.__dict__.get("_lazy") is None:
                self._lazy = LazyFill(self.image_side(), lambda tokens: store_codec.encode(tokens, self.config.storage),
                                      batch_size=min(16, self.config.chunk_size))
            return self._lazy

    def tokens_to_fill(self, hits: Sequence[Hit]) -> list[Hit]:
        """The hits a rerank would compute tokens for now (a lazily filled cache's uncached
        candidates whose files were not just found unreadable); reads the map only."""
        cache = self._open_cache()
        if cache is None or cache.fill != "lazy" or not hits:
            return []
        have = cache.contains([h.id for h in hits])
        return [h for h, ok in zip(hits, have) if not ok and self.lazy.reason(h.id) is None]

    def fill_tokens(self, hits: Sequence[Hit], *, keep: Sequence[str] = ()) -> None:
        """Compute and store the tokens of ``hits`` now (e.g. on a server's worker thread, before
        the scoring job, so that the device thread is not held up): as a rerank would."""
        if hits:
            self._read([h.id for h in hits], np.empty((len(hits), *self._stored_shape), np.float16), hits, keep)

    def unscored_reason(self, item_id: str) -> str | None:
        """Why a candidate was left unscored (its tokens could not be computed), or None."""
        lazy = self.__dict__.get("_lazy")
        return lazy.reason(item_id) if lazy is not None else None

    def _host_buffer(self, n: int):
        """A reused [>= n, *stored shape] fp16 host tensor (page-locked when scoring on CUDA, so
        the copy to the device is a fast DMA), one per thread. Allocating and first touching
        ~90 MB per query (100 base candidates) cost more than reading them; each score call ends
        with a synchronising ``.cpu()``, so the next call never overwrites a copy in flight."""
        import torch

        buf = getattr(self._buffers, "tokens", None)
        if buf is None or buf.shape[0] < n:
            keep = n * int(np.prod(self._stored_shape)) * 2 <= _MAX_KEPT_BYTES
            buf = torch.empty((n, *self._stored_shape), dtype=torch.float16, pin_memory=keep and self.device != "cpu")
            if keep:
                self._buffers.tokens = buf
        return buf[:n]

    def _missing(self, missing: list[str], total: int) -> InputError:
        fix = f"`mmr cache build --rerank {self.config.checkpoint}`"
        others = [p.name for p in caches_in(self.cache_path.parent) if p.name.startswith("tokens-blip-") and p != self.cache_path]
        if not self.cache_path.exists() and others:
            g = self.geometry
            return IncompatibleError(
                f"this collection's BLIP tokens were built for another checkpoint, resolution or storage ({', '.join(others)}); "
                f"{self.config.checkpoint} at {g['image_size']} px, {self.config.storage} needs {self.cache_path.name}: build it with {fix}"
            )
        return InputError(
            f"{len(missing)} of {total} candidates have no cached BLIP tokens (e.g. id {missing[0]}); the collection was indexed "
            f"without them: build them once with {fix}"
        )

    def itm_logits(self, query: Any, image_tokens: Any, *, path: str | None = None) -> np.ndarray:
        """Raw ITM match logits [n] of ``query`` against ``[n, P, W]`` vision tokens (a float
        torch tensor or a numpy array: freshly encoded, or decoded from the cache). ``path``
        (``folded`` / ``standard``) overrides :meth:`cross_attention_path` (benchmarks compare them)."""
        import torch

        q = self.query_tokens(query)
        t = torch.as_tensor(image_tokens)
        step = self.config.chunk_size
        out = [self._itm(*_padded([q] * len(t[s : s + step])), t[s : s + step].to(self.device).float(), path=path)[0]
               for s in range(0, t.shape[0], step)]
        return np.concatenate(out) if out else np.zeros(0)

    def score(self, query: Any, hits: Sequence[Hit]) -> np.ndarray:
        """ITM match logit + ``itc_weight`` x first-stage cosine, per hit, from cached tokens."""
        return self.score_batch([(query, hits)])[0]

    def score_batch(
        self,
        requests: Sequence[tuple[Any, Sequence[Hit]]],
        *,
        image_tokens: Mapping[str, np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """Several queries' candidates in one batch: each (query, candidate) pair is one row of
        the text encoder (queries padded to the longest in a chunk, padding masked, as
        transformers pads a text batch), so concurrent requests share the forward passes."""
        if image_tokens:
            raise InputError(f"{self.label} scores indexed images only (BLIP's tokens are computed at index time); "
                             "it cannot score images sent inline")
        self.warm_up()
        sizes = [len(hits) for _, hits in requests]
        if sum(sizes) == 0:
            return [np.zeros(0) for _ in requests]
        queries = [self.query_tokens(q) if hits else None for q, hits in requests]
        hits = [h for _, hs in requests for h in hs]
        rows = np.repeat(np.arange(len(requests)), sizes)
        stored = self._host_buffer(len(hits))
        unscored = self._read([h.id for h in hits], stored.numpy(), hits)
        width, step = self.geometry["width"], self.config.chunk_size
        itm = np.concatenate([
            self._itm(*_padded([queries[r] for r in rows[s : s + step]]),
                      store_codec.decode(stored[s : s + step], self.config.storage, width, device=self.device))[0]
            for s in range(0, len(hits), step)
        ])
        retrieval = np.array([h.first_stage_image_score for h in hits], dtype=np.float64)
        scores = itm.astype(np.float64) + self.config.itc_weight * retrieval
        scores[list(unscored)] = np.nan  # no tokens: the search keeps its first-stage score and marks it
        return np.split(scores, np.cumsum(sizes)[:-1])

    def cross_attention_path(self, query_tokens: int) -> str:
        """``folded`` or ``standard``: how the text side computes cross-attention for text rows of
        ``query_tokens`` tokens (a chunk's longest query, padding included)."""
        if self.config.cross_attention != "auto":
            return self.config.cross_attention
        self.warm_up()
        return "folded" if query_tokens <= self.fold_max_tokens else "standard"

    def _itm(self, ids, mask, image_tokens, *, attentions: bool = False, path: str | None = None):
        """(match logits [n] numpy, cross-attention per layer [n, H, L, P] or None) of text rows
        ``ids``/``mask`` [n, L] against ``image_tokens`` [n, P, W]."""
        import torch

        with torch.inference_mode(), self._autocast():
            logits, maps = self._text.forward(
                ids.to(self.device), mask.to(self.device), image_tokens, path=path or self.cross_attention_path(int(ids.shape[1])),
                attentions=attentions, dtype=self._dtype,
            )
        return logits[:, 1].float().cpu().numpy(), maps

    # ---- explaining ------------------------------------------------------------------------
    def attention_maps(self, query: Any, hit: Hit, image: Any = None) -> AttentionMaps:
        """BLIP's cross-attention of each query word over the image's patch grid, per layer and
        head: [layers, heads, words, gh, gw], the CLS image token left out and each map
        renormalised to sum to 1. Word pieces are merged (averaged) back into words. With
        ``image`` (a PIL image) its tokens are computed on the fly; else the cached ones are used.
        ``retrieval_score`` is the hit's first-stage cosine."""
        import torch

        from .storage import decode

        self.warm_up()
        q = self.query_tokens(query)
        retrieval = float(hit.first_stage_image_score)
        if image is None:
            tokens = decode(self.cached_tokens([hit.id]), self.config.storage, self.geometry["width"], device=self.device)
        else:
            tokens = self._image_side.tokens(self.transform(image).unsqueeze(0)).float()
            if self.encoder is not None:
                emb, _ = self.encoder.encode_pixels(self.encoder.image_transform(image.convert("RGB")).unsqueeze(0))
                retrieval = float(emb[0] @ query.embedding())
        logits, cross = self._itm(*_padded([q]), tokens, attentions=True)
        att = torch.stack([a[0].float() for a in cross]).cpu()  # [layers, H, L, P]
        att = att[..., 1:]  # patches only
        att = att / att.sum(-1, keepdim=True).clamp_min(1e-12)
        n_words = len(q.words)
        rows = [[i for i, w in enumerate(q.word_of) if w == k] for k in range(n_words)]
        maps = torch.stack([att[:, :, r, :].mean(2) for r in rows], dim=2) if rows else att[:, :, :0, :]
        g = self.geometry["grid"]
        return AttentionMaps(
            score=float(logits[0]) + self.config.itc_weight * retrieval,
            retrieval_score=retrieval,
            words=list(q.words),
            maps=maps.reshape(maps.shape[0], maps.shape[1], n_words, g, g).numpy(),
        )


def _padded(queries: Sequence[Any]) -> tuple[Any, Any]:
    """Token ids and attention mask [n, L] of tokenised queries, right-padded (with 0, BERT's
    [PAD]; masked) to the longest: one row per (query, candidate) pair."""
    import torch

    longest = max(int(q.ids.shape[1]) for q in queries)
    ids = torch.zeros((len(queries), longest), dtype=torch.long)
    mask = torch.zeros((len(queries), longest), dtype=torch.long)
    for i, q in enumerate(queries):
        n = int(q.ids.shape[1])
        ids[i, :n], mask[i, :n] = q.ids[0], q.mask[0]
    return ids, mask
