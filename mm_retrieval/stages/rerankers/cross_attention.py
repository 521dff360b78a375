"""Reranker ``cross_attention``: the query's text tokens attend to each candidate's image tokens.

It reads each candidate's image memory from the token cache (never re-encoding an image), scores
all candidates of a query in one batch (chunked when large), and builds on the first stage's score
(see :mod:`mm_retrieval.models.reranker`). A checkpoint trained on another encoder is refused.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigError, InputError
from ...registry import register
from ...tokencache import TokenCache, TokenWriter
from ...types import Hit
from ..base import Reranker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CrossAttentionConfig:
    checkpoint: str = ""  # a directory written by `mmr train-reranker`
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 (or fp16) autocast on CUDA, fp32 on CPU
    chunk_size: int = 512  # (query, image) pairs in flight at once


@register("reranker", "cross_attention")
class CrossAttentionReranker(Reranker):
    """Rescores first-stage hits with a trained cross-attention model."""

    Config = CrossAttentionConfig

    def bind(self, pipeline: Any) -> None:
        """Attach the pipeline whose encoder and token caches this reranker uses."""
        self.pipeline = pipeline

    # ---- loading ---------------------------------------------------------------------------
    def _warm_up(self) -> None:
        import torch

        from ...reranking import load_reranker
        from ..encoders.open_clip import resolve_device

        if not self.config.checkpoint:
            raise ConfigError("the reranker needs a checkpoint: pass --rerank DIR (train one with `mmr train-reranker TABLE --out DIR`)")
        if getattr(self, "pipeline", None) is None:
            raise ConfigError("the cross_attention reranker must be bound to a pipeline (Pipeline does this)")
        self.encoder = self.pipeline.encoder
        self.encoder.warm_up()
        self.device = resolve_device(self.config.device)
        self.model, self.meta = load_reranker(
            self.config.checkpoint, expected_encoder_fingerprint=self.encoder.fingerprint, device=self.device
        )
        self.model.eval()
        self.fingerprint = _checkpoint_digest(Path(self.config.checkpoint))
        self._dtype = None
        if self.device != "cpu" and self.config.precision in ("auto", "bf16", "fp16"):
            bf16 = self.config.precision != "fp16" and torch.cuda.is_bf16_supported()
            self._dtype = torch.bfloat16 if bf16 else torch.float16

    @property
    def memory_fingerprint(self) -> str:
        """Keys this reranker's image memory: it depends on the encoder and the reranker weights."""
        self.warm_up()
        return f"{self.encoder.fingerprint}-{self.fingerprint}"

    def memory_cache(self) -> TokenCache:
        store = self.pipeline.store
        return TokenCache(store.cache_dir() / f"tokens-{self.memory_fingerprint}.sqlite", self.memory_fingerprint)

    def raw_cache(self) -> TokenCache | None:
        path = self.pipeline.store.cache_dir() / f"tokens-raw-{self.encoder.fingerprint}.sqlite"
        return TokenCache(path, f"raw-{self.encoder.fingerprint}", create=False) if path.exists() else None

    def project(self, raw: np.ndarray) -> np.ndarray:
        """Raw patch tokens [n, P, W] -> this reranker's image memory [n, P, M] (fp16)."""
        import torch

        self.warm_up()
        with torch.inference_mode(), self._autocast():
            mem = self.model.image_memory(torch.from_numpy(np.asarray(raw)).to(self.device).float())
        return mem.to(torch.float16).cpu().numpy()

    def memory_writer(self) -> TokenWriter:
        """Index runs write this reranker's memory (small) instead of raw tokens."""
        return TokenWriter(self.memory_cache(), project=self.project)

    def _autocast(self):
        import contextlib

        import torch

        if self._dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self._dtype)

    # ---- scoring ---------------------------------------------------------------------------
    def memories(self, ids: Sequence[str]) -> np.ndarray:
        """[len(ids), P, M] memory for the candidates, derived from raw tokens where only those
        are cached (and written back, so it happens once per image)."""
        cache = self.memory_cache()
        got = cache.get(ids)
        missing = [i for i in ids if i not in got]
        if missing:
            raw = self.raw_cache()
            found = raw.get(missing) if raw is not None else {}
            if found:
                keys = list(found)
                for k, m in zip(keys, self.project(np.stack([found[k] for k in keys]))):
                    cache.add(k, m)
                    got[k] = m
                cache.commit()
        still = [i for i in ids if i not in got]
        if still:
            raise InputError(
                f"{len(still)} of {len(ids)} candidates have no cached image tokens (e.g. id {still[0]}); "
                f"build them once with `mmr cache build --rerank {self.config.checkpoint}`"
            )
        return np.stack([got[i] for i in ids])

    def score(self, query: str, hits: Sequence[Hit]) -> np.ndarray:
        return self.score_with_attention(query, hits, attention=False)[0]

    def score_with_attention(self, query: str, hits: Sequence[Hit], *, attention: bool = True):
        """(scores [N], per-layer attention [N, H, L, P] list or None, text mask [L])."""
        import torch

        self.warm_up()
        if not hits:
            return np.zeros(0), None, None
        memory = torch.from_numpy(self.memories([h.id for h in hits])).to(self.device)
        _, tokens, mask = self.encoder.encode_text_tokens([query])
        retrieval = torch.tensor([h.first_stage_image_score for h in hits], dtype=torch.float32, device=self.device)
        with torch.inference_mode(), self._autocast():
            out = self.model(
                tokens.to(self.device), mask.to(self.device), memory, retrieval,
                chunk_size=self.config.chunk_size, return_attention=attention,
            )
        if attention:
            logits, maps = out
            return logits[0].float().cpu().numpy(), [m[0].float().cpu() for m in maps], mask[0].cpu()
        return out[0].float().cpu().numpy(), None, None


def _checkpoint_digest(path: Path) -> str:
    """Identity of the reranker weights (keys its cached image memory)."""
    d = path if path.is_dir() else path.parent
    h = hashlib.sha256()
    for name in ("reranker.json", "model.safetensors"):
        h.update((d / name).read_bytes())
    return h.hexdigest()[:12]
