"""The ``reranker/cross_attention`` stage: the query's text tokens attend to each candidate's
image tokens (the model is :mod:`.model`, its checkpoints :mod:`.checkpoint`).

It reads each candidate's image memory from the token cache (never re-encoding an indexed
image), takes the query's token features from :meth:`Query.text_features` (the same forward
that gave the first stage its vector), scores all candidates of a query in one batch (chunked
when large) and builds on the first stage's score. A checkpoint trained on another encoder is
refused.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ....devices import autocast, autocast_dtype, check_device, check_precision, resolve_device
from ....errors import ConfigError, InputError
from ....query import Query
from ....registry import register
from ....tokencache import TokenCache, TokenWriter, cache_path, open_raw_cache
from ....types import AttentionMaps, Hit
from ...base import Reranker
from .phrases import token_roles, word_positions

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class CrossAttentionConfig:
    checkpoint: str = ""  # a directory written by `mmr train-reranker`
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto: bf16 (or fp16) autocast on CUDA, fp32 on CPU
    chunk_size: int = 512  # (query, image) pairs in flight at once

    def __post_init__(self) -> None:
        check_device(self.device, where="reranker device")
        check_precision(self.precision)


@register("reranker", "cross_attention")
class CrossAttentionReranker(Reranker):
    """Rescores first-stage hits with a trained cross-attention model."""

    Config = CrossAttentionConfig
    needs_text_features = True
    can_explain = True
    reads_image_tokens = True
    references = "a directory written by `mmr train-reranker TABLE --out DIR` (it holds reranker.json)"

    @classmethod
    def accepts(cls, ref: str) -> bool:
        """A checkpoint directory of ours (or its ``reranker.json``: :data:`.checkpoint.META_FILE`,
        not imported here, since that module imports torch)."""
        p = Path(ref).expanduser()
        return (p / "reranker.json").is_file() or (p.name == "reranker.json" and p.is_file())

    # ---- loading ---------------------------------------------------------------------------
    def _warm_up(self) -> None:
        from .checkpoint import load_reranker

        if not self.config.checkpoint:
            raise ConfigError("the reranker needs a checkpoint: pass --rerank DIR (train one with `mmr train-reranker TABLE --out DIR`)")
        if self.encoder is None or self.store is None:
            raise ConfigError(f"{self.label} needs its encoder and store: call bind(encoder=..., store=...) first (Pipeline does)")
        self.encoder.warm_up()
        self.device = resolve_device(self.config.device)
        self.model, self.meta = load_reranker(
            self.config.checkpoint, expected_encoder_fingerprint=self.encoder.fingerprint, device=self.device
        )
        if self.model.needs_pixels:  # its memory needs pixels, which the index path does not hand it yet
            raise ConfigError(
                f"the reranker at {self.config.checkpoint!r} has its own image side (local_channels="
                f"{self.model.config.local_channels}), which this stage cannot index or score with yet; "
                "train one without local_channels (the default) to use it in a pipeline"
            )
        self.fingerprint = _checkpoint_digest(Path(self.config.checkpoint))
        self._dtype = autocast_dtype(self.device, self.config.precision)

    def autocast(self) -> Any:
        """The precision the model runs in (:func:`~mm_retrieval.devices.autocast_dtype`), as a context manager."""
        self.warm_up()
        return autocast(self.device, self._dtype)

    # ---- the token cache -------------------------------------------------------------------
    @property
    def memory_fingerprint(self) -> str:
        """Keys this reranker's image memory: it depends on the encoder and the reranker weights."""
        self.warm_up()
        return f"{self.encoder.fingerprint}-{self.fingerprint}"

    def memory_cache(self) -> TokenCache:
        """The collection's cache of this reranker's image memory (created when missing)."""
        fp = self.memory_fingerprint
        return TokenCache(cache_path(self.store.cache_dir(), fp), fp)

    def raw_cache(self) -> TokenCache | None:
        """The collection's cache of the encoder's raw patch tokens, if there is one."""
        return open_raw_cache(self.store.cache_dir(), self.encoder.fingerprint)

    def token_writer(self) -> TokenWriter:
        """Index runs write this reranker's memory (small) instead of raw tokens."""
        return TokenWriter(self.memory_cache(), project=self.project)

    def project(self, raw: np.ndarray) -> np.ndarray:
        """Raw patch tokens [n, P, W] -> this reranker's image memory [n, P, M] (fp16)."""
        import torch

        self.warm_up()
        with torch.inference_mode(), self.autocast():
            mem = self.model.image_memory(torch.from_numpy(np.asarray(raw)).to(self.device).float())
        return mem.to(torch.float16).cpu().numpy()

    def memories(self, ids: Sequence[str]) -> np.ndarray:
        """[len(ids), P, M] memory for the candidates, gathered from the memory-mapped cache in
        one copy; derived from raw tokens where only those are cached (and written back, so it
        happens once per image)."""
        reader = self._memory_reader()
        got, present = reader.gather(ids)
        if not present.all():
            missing = list(dict.fromkeys(i for i, p in zip(ids, present) if not p))
            raw = self.raw_cache()
            found = raw.get(missing) if raw is not None else {}
            if found:
                cache = self.memory_cache()  # its own writer: concurrent queries never share a write buffer
                keys = list(found)
                derived = dict(zip(keys, self.project(np.stack([found[k] for k in keys]))))
                for k, m in derived.items():
                    cache.add(k, m)
                cache.commit()
                cache.close()
                if got.shape[1:] != derived[keys[0]].shape:  # the memory cache was empty: nothing gathered
                    got = np.zeros((len(ids), *derived[keys[0]].shape), np.float16)
                for row, i in enumerate(ids):
                    if i in derived:
                        got[row], present[row] = derived[i], True
        still = [i for i, p in zip(ids, present) if not p]
        if still:
            raise InputError(
                f"{len(still)} of {len(ids)} candidates have no cached image tokens (e.g. id {still[0]}); "
                f"build them once with `mmr cache build --rerank {self.config.checkpoint}`"
            )
        return got

    def _memory_reader(self) -> TokenCache:
        """One cache instance kept for reads (its connections and file mapping are reused by every
        query); writes go through :meth:`memory_cache`."""
        fp = self.memory_fingerprint
        reader = getattr(self, "_reader", None)
        if reader is None or reader.fingerprint != fp or reader.path.parent != self.store.cache_dir() or reader.replaced():
            reader = self._reader = self.memory_cache()
        return reader

    # ---- scoring ---------------------------------------------------------------------------
    def score(self, query: Query, hits: Sequence[Hit]) -> np.ndarray:
        """One logit per hit: ``scale * first-stage score + correction`` (see :mod:`.model`)."""
        self.warm_up()
        if not hits:
            return np.zeros(0)
        return self.score_memory(query, self.memories_on_device([h.id for h in hits]), _retrieval(hits))

    def memories_on_device(self, ids: Sequence[str]) -> Any:
        """:meth:`memories` as a tensor on the model's device; on CUDA gathered straight into
        page-locked memory and copied to the device once (:meth:`TokenCache.gather_tensor`)."""
        import torch

        if str(self.device).startswith("cuda"):
            memory, present = self._memory_reader().gather_tensor(ids, self.device)
            if present.all():
                return memory
        return torch.from_numpy(self.memories(ids)).to(self.device)

    def score_memory(self, query: Query, memory: Any, retrieval: np.ndarray) -> np.ndarray:
        """Scores from image memory already at hand: ``memory`` [N, P, M] (:meth:`memories` or
        :meth:`project`; numpy, or a tensor on the model's device), ``retrieval`` [N] the first
        stage's image-text similarities."""
        import torch

        self.warm_up()
        tokens, mask = self._text([query])
        memory = memory if torch.is_tensor(memory) else torch.from_numpy(np.asarray(memory))
        with torch.inference_mode(), self.autocast():
            logits = self.model(
                tokens, mask, memory.to(self.device),
                torch.as_tensor(np.asarray(retrieval, dtype=np.float32), device=self.device),
                chunk_size=self.config.chunk_size, roles=self._roles([query], mask),
            )
        return logits[0].float().cpu().numpy()

    def score_batch(
        self,
        requests: Sequence[tuple[Query, Sequence[Hit]]],
        *,
        image_tokens: Mapping[str, np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """Several queries' candidates in one forward, in the model's *pairs* layout: each
        (query, candidate) pair is one row, so requests with different queries and different
        candidates share the forward without scoring one query against another's images.
        ``image_tokens``: raw patch tokens [P, W] of candidates outside the collection, by hit id."""
        import torch

        self.warm_up()
        sizes = [len(hits) for _, hits in requests]
        if sum(sizes) == 0:
            return [np.zeros(0) for _ in requests]
        if len(requests) == 1:  # one query: the query-by-candidates layout runs its text once
            query, hits = requests[0]
            return [self.score_memory(query, self._memory(hits, image_tokens), _retrieval(hits)).astype(np.float64)]
        queries = list({q.text: q for q, _ in requests}.values())
        row_of = {q.text: i for i, q in enumerate(queries)}
        tokens, mask = self._text(queries)
        roles = self._roles(queries, mask)
        hits = [h for _, hs in requests for h in hs]
        rows = torch.as_tensor(np.repeat([row_of[q.text] for q, _ in requests], sizes), device=self.device)
        memory = torch.from_numpy(self._memory(hits, image_tokens)).to(self.device)
        retrieval = torch.from_numpy(_retrieval(hits)).to(self.device)
        step = int(self.config.chunk_size)
        out = []
        with torch.inference_mode(), self.autocast():
            for s in range(0, len(hits), step):
                r = rows[s : s + step]
                out.append(self.model(tokens[r], mask[r], memory[s : s + step], retrieval[s : s + step],
                                      pairs=True, chunk_size=step, roles=None if roles is None else roles[r]).float())
        logits = torch.cat(out).cpu().numpy().astype(np.float64)
        return np.split(logits, np.cumsum(sizes)[:-1])

    # ---- explaining ------------------------------------------------------------------------
    def attention_maps(self, query: Query, hit: Hit, image: Any = None) -> AttentionMaps:
        """The cross-attention (text token -> image patch) of every layer and head, per query
        word. ``image``: a PIL image scored from freshly encoded tokens instead of ``hit``'s
        cached memory; its first-stage score is then its cosine with the query."""
        import torch

        self.warm_up()
        if image is None:
            memory, retrieval = self.memories([hit.id]), hit.first_stage_image_score
        else:
            pixels = self.encoder.image_transform(image.convert("RGB")).unsqueeze(0)
            emb, raw = self.encoder.encode_pixels(pixels, with_tokens=True)
            memory, retrieval = self.project(raw), float(emb[0] @ query.embedding())
        tokens, mask = self._text([query])
        with torch.inference_mode(), self.autocast():
            logits, layers = self.model(
                tokens, mask, torch.from_numpy(memory).to(self.device),
                torch.tensor([retrieval], dtype=torch.float32, device=self.device), return_attention=True,
                roles=self._roles([query], mask),
            )
        att = torch.stack([m[0, 0] for m in layers]).float().cpu().numpy()  # [layers, H, L, P]
        P = att.shape[-1]
        g = int(round(P**0.5))
        if g * g != P:
            raise ConfigError(f"cannot lay {P} patch tokens out as a square grid")
        n_tokens = int(mask[0].sum()) - 2  # without the start and end tokens
        spans = word_spans(self.encoder.tokenizer, query.text, n_tokens)
        maps = np.stack([att[:, :, idx, :].mean(2) for _, idx in spans], axis=2)  # [layers, H, words, P]
        return AttentionMaps(
            score=float(logits[0, 0]), retrieval_score=float(retrieval), words=[w for w, _ in spans],
            maps=maps.reshape(*maps.shape[:3], g, g),
        )

    # ---- pieces ----------------------------------------------------------------------------
    def _text(self, queries: Sequence[Query]) -> tuple[Any, Any]:
        """The queries' token features [B, L, W] and mask [B, L] on the model's device, trimmed
        after the last real token of any of them (padding never changes a score)."""
        import torch

        feats = [q.text_features() for q in queries]
        mask = torch.stack([f.mask for f in feats]).to(self.device)
        used = int(mask.any(0).nonzero().max()) + 1
        tokens = torch.stack([f.tokens[:used] for f in feats]).to(self.device)
        return tokens, mask[:, :used]

    def _roles(self, queries: Sequence[Query], mask: Any) -> Any:
        """[B, L] token roles of the queries for the model's phrase head (:mod:`.phrases`), on
        its device; None when the model has none."""
        import torch

        if self.model.phrases is None:
            return None
        roles = token_roles(self.encoder.tokenizer, [q.text for q in queries], mask.cpu().numpy())
        return torch.from_numpy(roles).to(self.device)

    def _memory(self, hits: Sequence[Hit], image_tokens: Mapping[str, np.ndarray] | None) -> np.ndarray:
        """[N, P, M] memory of ``hits``: projected from ``image_tokens`` where given, else cached."""
        inline = [i for i, h in enumerate(hits) if image_tokens and h.id in image_tokens]
        if not inline:
            return self.memories([h.id for h in hits])
        indexed = [i for i in range(len(hits)) if i not in set(inline)]
        projected = self.project(np.stack([image_tokens[hits[i].id] for i in inline]))
        out = np.empty((len(hits), *projected.shape[1:]), dtype=projected.dtype)
        out[inline] = projected
        if indexed:
            out[indexed] = self.memories([hits[i].id for i in indexed])
        return out


def word_spans(tokenizer: Any, text: str, n_tokens: int) -> list[tuple[str, list[int]]]:
    """Group token positions (1..n_tokens, after the start token) by word of ``text``. Falls back
    to one entry per token when the tokenizer can't encode words one at a time."""
    words = text.split()
    positions = word_positions(tokenizer, words, n_tokens)
    if positions is not None and any(positions):
        return [(w, pos) for w, pos in zip(words, positions) if pos]
    return [(f"token {i}", [i]) for i in range(1, n_tokens + 1)]


def _retrieval(hits: Sequence[Hit]) -> np.ndarray:
    """[N] float32: the first-stage image-text similarity the model builds on."""
    return np.array([h.first_stage_image_score for h in hits], dtype=np.float32)


def _checkpoint_digest(path: Path) -> str:
    """Identity of the reranker weights (keys its cached image memory)."""
    d = path if path.is_dir() else path.parent
    h = hashlib.sha256()
    for name in ("reranker.json", "model.safetensors"):
        h.update((d / name).read_bytes())
    return h.hexdigest()[:12]
