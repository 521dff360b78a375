"""The cross-attention reranker's torch model: rescores the first stage's (query, image) candidates.

Read top to bottom: config -> attention helper -> layers -> :class:`CrossAttentionScorer`.

The model reads the CLIP towers' token outputs *before pooling*: text tokens are queries, image
patch tokens are keys/values. It is split in two so images are never re-encoded at query time:

* :meth:`CrossAttentionScorer.image_memory` -- depends on the image only. Run once per image at index time;
  downstream caches the result. Layout: one [P, memory_dim] row-major tensor per image (a LayerNorm
  output, so fp16 storage is safe): ``P * memory_dim * 2`` bytes in fp16, i.e. 49 * 128 * 2 =
  12,544 B (12.25 KiB) for ViT-B-32's 49 patch tokens with the default config. The per-layer K/V
  are projected from it at query time, so the cache size does not grow with depth or heads.
* :meth:`CrossAttentionScorer.forward` (alias :meth:`CrossAttentionScorer.score`) -- query time: text tokens + cached memory
  + first-stage score -> one logit per (query, image).

The score is residual: ``scale * retrieval_score + head(features)`` with the head's last layer
initialised at zero, so a fresh model ranks exactly like the first stage and training only learns
corrections. A reranker can therefore never start out worse than doing nothing.

Shape letters: B queries, L text tokens, N candidate images (n per chunk), P patch tokens per image,
Dt/Di text/image feature widths, W model width, M memory width, H heads, Hkv key/value heads,
G = H // Hkv query heads per key/value head, hd = W // H head width.

Torch only; no file I/O (:mod:`.checkpoint` saves and loads it, :mod:`.stage` runs it in a pipeline).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ....errors import ConfigError, InputError

__all__ = ["RerankerConfig", "CrossAttentionScorer"]


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class RerankerConfig:
    """Hyper-parameters of :class:`CrossAttentionScorer`. Round-trips through :meth:`to_dict`/:meth:`from_dict`."""

    text_dim: int  # Dt: per-token width of the CLIP text tower (512 for ViT-B-32)
    image_dim: int  # Di: per-patch width of the vision tower before its projection (768 for ViT-B-32)
    width: int = 256  # W: small on purpose; a query is scored against up to ~1000 candidates
    depth: int = 2  # blocks: attend to the image, re-read the text, attend again
    heads: int = 4  # query heads; head width W/H = 64 suits the fused SDPA kernels
    kv_heads: int = 1  # cross-attn key/value heads: 1 = multi-query (cheapest), = heads = multi-head
    memory_dim: int = 128  # M: cached width per patch; 49 patches * 128 * 2 B = 12.25 KiB/image in fp16
    mlp_ratio: float = 4.0  # the usual transformer MLP expansion
    dropout: float = 0.0  # residual dropout; few thousand training pairs may want 0.1, eval ignores it
    text_self_attn: bool = True  # tokens combine ("red" + "car") before/after looking at the image
    # The first-stage cosine is multiplied by this. 100 is CLIP's logit scale (exp(4.6052)), so
    # scale * cos are the first stage's own softmax logits and a listwise loss starts calibrated.
    retrieval_scale_init: float = 100.0
    learn_retrieval_scale: bool = True  # let training re-balance first stage vs corrections
    # Patch tokens per image (P) for a learned per-patch position added to the memory; 0 = none.
    # Deep in a ViT, patch tokens keep little of where they are, and relations ("left of") need it.
    num_patches: int = 0
    # A small convolutional image side owned by the reranker, over the encoder's preprocessed pixels
    # (``image_size`` square): its features are added to each patch's memory. 0 = none. Why: per-patch
    # ViT tokens carry an object's colour but not its shape (an 8 px patch of a 20 px object shows a
    # flat colour; benchmarks/RESULTS.md, issue #25); the stem's receptive field spans whole objects.
    local_channels: int = 0
    image_size: int = 0  # input side of the local image side, in pixels (the encoder's)
    # A phrase head (:class:`PhraseHead`) of this width: the two noun phrases around a relation
    # each attend to the patches on their own, and the relation's words say along which direction
    # the two attention centroids must lie. 0 = none. Why: a pooled first stage is at chance on
    # "A left of B" vs "B left of A", and a pair-level head did not learn it from a few thousand
    # captions (benchmarks/RESULTS.md, issue #25); per phrase it generalises to unseen pairs.
    phrase_dim: int = 0

    def __post_init__(self) -> None:
        for name in ("local_channels", "image_size", "phrase_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"reranker config: {name} must be an integer >= 0, got {value!r}")
        if self.phrase_dim and (not self.num_patches or math.isqrt(self.num_patches) ** 2 != self.num_patches):
            raise ConfigError("reranker config: phrase_dim needs num_patches (a square patch grid)")
        if self.local_channels and (not self.num_patches or not self.image_size):
            raise ConfigError(
                "reranker config: local_channels needs num_patches (a square patch grid) and image_size"
            )
        if isinstance(self.num_patches, bool) or not isinstance(self.num_patches, int) or self.num_patches < 0:
            raise ConfigError(f"reranker config: num_patches must be an integer >= 0, got {self.num_patches!r}")
        for name in ("text_dim", "image_dim", "width", "depth", "heads", "kv_heads", "memory_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"reranker config: {name} must be a positive integer, got {value!r}")
        if self.width % self.heads:
            raise ConfigError(
                f"reranker config: width ({self.width}) must be divisible by heads ({self.heads})"
            )
        if self.heads % self.kv_heads:
            raise ConfigError(
                f"reranker config: heads ({self.heads}) must be a multiple of "
                f"kv_heads ({self.kv_heads})"
            )
        if not self.mlp_ratio > 0:
            raise ConfigError(f"reranker config: mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"reranker config: dropout must be in [0, 1), got {self.dropout!r}")
        if not self.retrieval_scale_init > 0:
            raise ConfigError(
                "reranker config: retrieval_scale_init must be > 0 (a fresh model must rank like "
                f"the first stage), got {self.retrieval_scale_init!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def memory_bytes_per_image(self, num_patches: int, dtype: torch.dtype = torch.float16) -> int:
        """Bytes of cached image memory per image: ``num_patches * memory_dim * itemsize``."""
        return num_patches * self.memory_dim * dtype.itemsize

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RerankerConfig:
        """Build from :meth:`to_dict` output; unknown or missing keys raise :class:`ConfigError`."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        valid = ", ".join(fields)
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"unknown reranker config key(s) {unknown}; valid keys: {valid}")
        missing = [
            name
            for name, f in fields.items()
            if name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(
                f"reranker config is missing required key(s) {missing}; valid keys: {valid}"
            )
        return cls(**data)


# ----------------------------------------------------------------------------------------------
# Attention


def _attend(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, need_weights: bool):
    """softmax(q k^T / sqrt(hd)) v.

    q [Q, Hk, Lq, hd], k/v [Q, Hk, S, hd], key_mask broadcastable to [Q, 1, 1, S] (True = attend).
    Returns (out [Q, Hk, Lq, hd], weights [Q, Hk, Lq, S] or None).
    """
    if not need_weights:
        # Fused kernels (flash / memory-efficient) on GPU; the math fallback on CPU.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask), None
    # SDPA never returns its weights: recompute them the way it does (same scale, same mask) and
    # use them for the output too, so the weights returned are exactly the ones applied.
    att = (q @ k.transpose(-2, -1)) * (q.size(-1) ** -0.5)  # [Q, Hk, Lq, S]
    if key_mask is not None:
        att = att.masked_fill(~key_mask, float("-inf"))
    att = att.softmax(dim=-1)
    return att.to(v.dtype) @ v, att


class SelfAttention(nn.Module):
    """Masked multi-head self-attention over text tokens (text only, so nothing is cached: MHA)."""

    def __init__(self, cfg: RerankerConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.ln = nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        # x [Q, L, W]; key_mask [Q, 1, 1, L]: padding is never a key, so it cannot leak into real tokens
        Q, L, W = x.shape
        qkv = self.qkv(self.ln(x)).view(Q, L, 3, self.heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # each [Q, L, H, hd]
        y, _ = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_mask, False)
        return self.drop(self.proj(y.transpose(1, 2).reshape(Q, L, W)))  # [Q, L, W]


class CrossAttention(nn.Module):
    """Text tokens (queries) attend to image patches (keys/values) with Hkv <= H key/value heads.

    Grouped/multi-query attention without copying K/V: the G query heads that share one key/value
    head are folded into the query-length axis ([Hkv, L*G] instead of [H, L]). That is exact because
    in cross-attention every query row attends independently and no key is masked.
    """

    def __init__(self, cfg: RerankerConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.groups = cfg.heads // cfg.kv_heads
        self.ln = nn.LayerNorm(cfg.width)
        self.q = nn.Linear(cfg.width, cfg.width)
        self.kv = nn.Linear(cfg.memory_dim, 2 * cfg.kv_heads * cfg.head_dim)  # from the cached memory
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        # memory [n, P, M] -> k, v [n, Hkv, P, hd]. Computed at query time: cheap next to the text
        # stream, and it keeps the cache to one M-wide vector per patch whatever the depth.
        n, P, _ = memory.shape
        k, v = self.kv(memory).view(n, P, 2, self.kv_heads, self.head_dim).unbind(2)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, need_weights: bool):
        # x [G0, C, L, W] with C = 1 (one copy per query, before the first cross-attention) or C = G1;
        # k, v [G0*G1, Hkv, P, hd] aligned with the flattened (G0, G1) grid of pairs.
        G0, C, L, W = x.shape
        G1, P = k.shape[0] // G0, k.shape[2]
        Hk, G, hd = self.kv_heads, self.groups, self.head_dim
        q = self.q(self.ln(x)).view(G0, C, L, Hk, G, hd)
        q = q.permute(0, 1, 3, 2, 4, 5).reshape(G0, C, Hk, L * G, hd)  # fold groups into the length
        # Broadcast the query over the candidates; a view (no copy) when G0 == 1 or C == G1.
        q = q.expand(G0, G1, Hk, L * G, hd).reshape(G0 * G1, Hk, L * G, hd)
        y, att = _attend(q, k, v, None, need_weights)  # y [G0*G1, Hk, L*G, hd]
        y = y.view(G0, G1, Hk, L, G, hd).permute(0, 1, 3, 2, 4, 5).reshape(G0, G1, L, W)
        if att is not None:  # [G0*G1, Hk, L*G, P] -> [G0, G1, H, L, P]; head h = kv_head * G + g
            att = att.view(G0, G1, Hk, L, G, P).permute(0, 1, 2, 4, 3, 5).reshape(G0, G1, -1, L, P)
        return self.drop(self.proj(y)), att  # [G0, G1, L, W]


class MLP(nn.Module):
    def __init__(self, cfg: RerankerConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.width)
        self.net = nn.Sequential(
            nn.LayerNorm(cfg.width),
            nn.Linear(cfg.width, hidden),
            nn.GELU(),
            nn.Linear(hidden, cfg.width),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Block(nn.Module):
    """Pre-norm block: [masked text self-attention] -> cross-attention to the image -> MLP."""

    def __init__(self, cfg: RerankerConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg) if cfg.text_self_attn else None
        self.cross_attn = CrossAttention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, text_mask: Tensor, k: Tensor, v: Tensor, need_weights: bool):
        # x [G0, C, L, W]; text_mask [G0, L]; k, v [G0*G1, Hkv, P, hd] -> x [G0, G1, L, W]
        if self.self_attn is not None:
            G0, C, L, W = x.shape
            key_mask = text_mask[:, None, None, None, :].expand(G0, C, 1, 1, L).reshape(G0 * C, 1, 1, L)
            x = x + self.self_attn(x.reshape(G0 * C, L, W), key_mask).view(G0, C, L, W)
        y, att = self.cross_attn(x, k, v, need_weights)
        x = x + y  # C = 1 broadcasts over the candidates: the first per-pair tensor is made here
        x = x + self.mlp(x)
        return x, att


class LocalImageSide(nn.Module):
    """Conv stem: pixels [N, 3, S, S] -> features [N, g*g, C] on the encoder's g x g patch grid.

    Stride-2 3x3 convolutions down to about the grid, an average pool onto it exactly, then two
    3x3 convolutions at the grid: each output sees the patch and its 8 neighbours' pixels (e.g.
    47 px on 64 px images with 8 px patches), enough to tell a circle's outline from a square's.
    """

    def __init__(self, cfg: RerankerConfig):
        super().__init__()
        g = math.isqrt(cfg.num_patches)
        if g * g != cfg.num_patches:
            raise ConfigError(f"local_channels needs a square patch grid, got num_patches={cfg.num_patches}")
        self.grid, c = g, cfg.local_channels
        layers: list[nn.Module] = []
        size, width = cfg.image_size, 3
        while size >= 4 * g:  # halve while at least twice the grid remains
            out = max(16, c // 2) if size >= 8 * g else c
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.GELU()]
            size, width = (size + 1) // 2, out
        self.down = nn.Sequential(*layers)
        self.at_grid = nn.Sequential(
            nn.Conv2d(width, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, c, 3, padding=1), nn.GELU(),
        )

    def forward(self, pixels: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(self.down(pixels), self.grid)
        return self.at_grid(x).flatten(2).transpose(1, 2)  # [N, g*g, C], row-major like ViT patches


class PhraseHead(nn.Module):
    """Per-phrase attention and a relation term over where it lands.

    Roles (:mod:`.phrases`) mark the query's subject phrase (1), object phrase (2) and relation
    words (3). Each phrase, pooled over its tokens, attends to the candidate's patches on its own
    (one softmax over the patches); the attention's centroid on the patch grid is where the phrase
    was found, and the log-mean-exp of its logits how well. The score is::

        match * (found_1 + found_2) + direction(relation words) . (centroid_1 - centroid_2)

    ``direction`` is a learned 2-vector per relation wording ("left of" learns to point left), so
    the head knows "which object is where" for any pair of phrases whose words it has seen, also
    pairs never seen together. ``match`` and ``direction`` start at zero: a fresh head adds nothing.
    """

    def __init__(self, cfg: RerankerConfig):
        super().__init__()
        d, g = cfg.phrase_dim, math.isqrt(cfg.num_patches)
        self.ln = nn.LayerNorm(cfg.width)
        self.q = nn.Linear(cfg.width, d)
        self.k = nn.Linear(cfg.memory_dim, d)
        self.direction = nn.Linear(cfg.width, 2)
        self.match = nn.Parameter(torch.zeros(()))
        nn.init.zeros_(self.direction.weight)
        nn.init.zeros_(self.direction.bias)
        # Patch centres in [-1, 1], x to the right and y down, row-major like ViT patches.
        axis = torch.linspace(-1.0, 1.0, g) if g > 1 else torch.zeros(1)
        yy, xx = torch.meshgrid(axis, axis, indexing="ij")
        self.register_buffer("grid", torch.stack([xx.flatten(), yy.flatten()], -1), persistent=False)  # [P, 2]

    def forward(self, x: Tensor, roles: Tensor, memory: Tensor, pairs: bool) -> Tensor:
        """x [B, L, W] projected text tokens, roles [B, L], memory [N, P, M] -> [N] if ``pairs``
        (B == N) else [B, N]."""
        h = self.ln(x)

        def pooled(role: int) -> tuple[Tensor, Tensor]:
            m = (roles == role).to(h.dtype)[..., None]  # [B, L, 1]
            n = m.sum(1)  # [B, 1]
            return (h * m).sum(1) / n.clamp(min=1.0), (n[:, 0] > 0).to(h.dtype)

        (p1, ok1), (p2, ok2), (rel, ok_rel) = pooled(1), pooled(2), pooled(3)
        q = self.q(torch.stack([p1, p2], 1))  # [B, 2, d]
        k = self.k(memory)  # [N, P, d]
        scale = q.shape[-1] ** -0.5
        if pairs:
            logits = torch.einsum("bkd,bpd->bkp", q, k) * scale  # [N, 2, P]
        else:
            logits = torch.einsum("bkd,npd->bnkp", q, k) * scale  # [B, N, 2, P]
        centroid = logits.softmax(-1) @ self.grid.to(logits.dtype)  # [..., 2, 2]
        found = logits.logsumexp(-1) - math.log(logits.shape[-1])  # [..., 2]
        ok = torch.stack([ok1, ok2], -1)  # [B, 2]
        direction = self.direction(rel) * ok_rel[:, None]  # [B, 2]: zero without relation words
        if not pairs:
            ok, direction = ok[:, None], direction[:, None]
        relation = ((centroid[..., 0, :] - centroid[..., 1, :]) * direction).sum(-1) * ok.prod(-1)
        return self.match * (found * ok).sum(-1) + relation


# ----------------------------------------------------------------------------------------------
# Model


class CrossAttentionScorer(nn.Module):
    """Cross-attention reranker over CLIP token features. See the module docstring for the design.

    Typical use::

        memory = model.image_memory(image_tokens).half()   # index time, [N, P, M], cache it
        logits = model(text_tokens, text_mask, memory, retrieval_score)   # query time, [B, N]
    """

    def __init__(self, config: RerankerConfig):
        super().__init__()
        self.config = cfg = config
        self.text_in = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, cfg.width))
        # Image side: normalise, project to the small memory width, normalise again so the cached
        # values are O(1) and survive fp16 storage.
        self.image_in = nn.Sequential(
            nn.LayerNorm(cfg.image_dim),
            nn.Linear(cfg.image_dim, cfg.memory_dim),
            nn.LayerNorm(cfg.memory_dim),
        )
        # Added before the last LayerNorm, so the cached memory keeps the same layout and scale.
        self.patch_pos = nn.Parameter(torch.randn(cfg.num_patches, cfg.memory_dim)) if cfg.num_patches else None
        # Optional reranker-owned image side (see RerankerConfig.local_channels), added like patch_pos.
        self.local = LocalImageSide(cfg) if cfg.local_channels else None
        self.local_proj = nn.Linear(cfg.local_channels, cfg.memory_dim) if cfg.local_channels else None
        self.phrases = PhraseHead(cfg) if cfg.phrase_dim else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head = nn.Sequential(nn.Linear(cfg.width, cfg.width), nn.GELU(), nn.Linear(cfg.width, 1))
        # log-parametrised so the scale stays > 0: a fresh model's ranking is the first stage's.
        self.log_retrieval_scale = nn.Parameter(
            torch.tensor(math.log(cfg.retrieval_scale_init)), requires_grad=cfg.learn_retrieval_scale
        )
        self.apply(self._init_weights)
        # Residual scoring: the correction starts at exactly zero.
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        if self.phrases is not None:  # the phrase head's relation term starts at zero too
            nn.init.zeros_(self.phrases.direction.weight)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Variance-preserving (std = 1/sqrt(fan_in)) rather than GPT-2's fixed 0.02: at the small
        # widths used here 0.02 makes q.k ~ 0, attention uniform, and training stalls at the start.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features**-0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # -- small helpers ------------------------------------------------------------------------

    @property
    def retrieval_scale(self) -> Tensor:
        """The positive scalar multiplying the first-stage score."""
        return self.log_retrieval_scale.exp()

    def memory_bytes_per_image(self, num_patches: int, dtype: torch.dtype = torch.float16) -> int:
        """Bytes of cached :meth:`image_memory` per image with ``num_patches`` patch tokens."""
        return self.config.memory_bytes_per_image(num_patches, dtype)

    def _weight(self) -> Tensor:
        return self.text_in[1].weight  # where the parameters live (device, dtype)

    # -- image side (index time) --------------------------------------------------------------

    @property
    def needs_pixels(self) -> bool:
        """True when :meth:`image_memory` needs the image's pixels (a local image side)."""
        return self.local is not None

    def image_memory(self, image_tokens: Tensor, pixels: Tensor | None = None) -> Tensor:
        """Image-only part of the model: patch tokens [N, P, Di] -> memory [N, P, memory_dim].

        Depends on nothing but the image, so compute it once per image, cache it (fp16 is fine) and
        pass it to :meth:`forward` at query time. ``pixels`` [N, 3, S, S] (the encoder's
        preprocessed input): required when the model has a local image side (:attr:`needs_pixels`).
        """
        if image_tokens.dim() != 3 or image_tokens.shape[-1] != self.config.image_dim:
            raise InputError(
                f"image_tokens must be [N, P, {self.config.image_dim}], got {list(image_tokens.shape)}"
            )
        w = self._weight()
        x = image_tokens.to(device=w.device, dtype=w.dtype)
        if self.patch_pos is None:
            return self.image_in(x)
        if x.shape[1] != self.config.num_patches:
            raise InputError(
                f"image_tokens have {x.shape[1]} patches but this reranker was trained on "
                f"{self.config.num_patches}; use the encoder it was trained with"
            )
        norm_in, proj, norm_out = self.image_in
        x = proj(norm_in(x)) + self.patch_pos
        if self.local is not None:
            size = self.config.image_size
            if pixels is None or pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size) or len(pixels) != len(x):
                got = None if pixels is None else list(pixels.shape)
                raise InputError(
                    f"this reranker has its own image side: image_memory needs the encoder's "
                    f"preprocessed pixels [N, 3, {size}, {size}] with N = {len(x)}, got {got}"
                )
            x = x + self.local_proj(self.local(pixels.to(device=w.device, dtype=w.dtype)))
        return norm_out(x)

    # -- query time ---------------------------------------------------------------------------

    def forward(
        self,
        text_tokens: Tensor,
        text_mask: Tensor,
        memory: Tensor,
        retrieval_score: Tensor,
        *,
        pairs: bool = False,
        chunk_size: int = 512,
        return_attention: bool = False,
        roles: Tensor | None = None,
    ):
        """Score queries against candidate images.

        Args:
            text_tokens: [B, L, Dt] text tower tokens before pooling.
            text_mask: [B, L] bool, True = real token; every query needs at least one.
            memory: [N, P, M] from :meth:`image_memory` (any float dtype; cast to the model's).
            retrieval_score: first-stage cosine, [B, N] or [N] (same for every query); [N] if ``pairs``.
            pairs: False -> every query against every candidate, logits [B, N].
                True -> training layout, B == N and query i is scored with image i, logits [N].
            chunk_size: at most this many (query, image) pairs are in flight at once, bounding memory.
            return_attention: also return per-layer cross-attention weights (text token -> patch),
                a list of ``depth`` tensors [B, N, H, L, P] ([N, H, L, P] if ``pairs``). Rows of
                padding tokens are zero; the other rows sum to 1. Computed explicitly, so slower.
            roles: [B, L] int token roles for the phrase head (:func:`.phrases.token_roles`);
                ignored without one. None: no phrases, the phrase head adds nothing.

        Returns:
            float32 logits ``retrieval_scale * retrieval_score + head(features)``, or
            ``(logits, attention)`` when ``return_attention``.
        """
        w = self._weight()
        B, L = self._check(text_tokens, text_mask, memory, retrieval_score, pairs, chunk_size)
        if roles is not None and tuple(roles.shape) != (B, L):
            raise InputError(f"roles must be [B, L] = {[B, L]} like text_mask, got {list(roles.shape)}")
        N = memory.shape[0]
        text_mask = text_mask.to(device=w.device).bool()
        memory = memory.to(device=w.device, dtype=w.dtype)
        score = retrieval_score.to(device=w.device, dtype=torch.float32)
        if not pairs:
            score = score.expand(B, N)

        # Padding never changes the output, so drop trailing all-padding columns: CLIP pads every
        # query to 77 tokens, real queries are ~10.
        L_used = int(text_mask.any(0).nonzero().max()) + 1
        x = self.text_in(text_tokens[:, :L_used].to(dtype=w.dtype, device=w.device))  # [B, L', W]
        mask = text_mask[:, :L_used]  # [B, L']

        heads, maps = [], []
        if pairs:
            for s in range(0, N, chunk_size):
                e = min(N, s + chunk_size)
                h, att = self._score_chunk(x[s:e], mask[s:e], memory[s:e], True, return_attention)
                heads.append(h[:, 0])  # [n]
                maps.append(att)
            head = torch.cat(heads, 0) if heads else score.new_zeros(0)  # [N]
        else:
            step = max(1, chunk_size // B)
            for s in range(0, N, step):
                h, att = self._score_chunk(x, mask, memory[s : s + step], False, return_attention)
                heads.append(h)  # [B, n]
                maps.append(att)
            head = torch.cat(heads, 1) if heads else score.new_zeros(B, 0)  # [B, N]

        if self.phrases is not None and roles is not None:
            roles = roles[:, :L_used].to(device=w.device)
            head = head + self.phrases(x, roles, memory, pairs).to(head.dtype)
        logits = self.retrieval_scale.float() * score + head.float()
        if not return_attention:
            return logits
        return logits, self._collect_maps(maps, text_mask, L, memory.shape[1], pairs)

    def score(self, *args, **kwargs):
        """Query-time scoring from cached memory; the same as calling the model (:meth:`forward`)."""
        return self(*args, **kwargs)

    def score_images(
        self,
        text_tokens: Tensor,
        text_mask: Tensor,
        image_tokens: Tensor,
        retrieval_score: Tensor,
        **kwargs: Any,
    ):
        """Full forward from raw patch tokens [N, P, Di]: forward() on ``image_memory(image_tokens)``."""
        return self(text_tokens, text_mask, self.image_memory(image_tokens), retrieval_score, **kwargs)

    def _score_chunk(self, x: Tensor, mask: Tensor, memory: Tensor, pairs: bool, need_weights: bool):
        """Head logits for one chunk. x [G0, L, W] projected text, mask [G0, L], memory [n, P, M].

        pairs=False: grid (G0, G1) = (queries, n candidates). pairs=True: (G0, G1) = (n, 1), n == G0.
        Returns (head [G0, G1], per-layer maps [G0, G1, H, L, P] or None).
        """
        G0 = x.shape[0]
        h = x[:, None]  # [G0, 1, L, W]: one copy per query, broadcast over candidates in the blocks
        maps = []
        for block in self.blocks:
            k, v = block.cross_attn.project_kv(memory)  # [n, Hkv, P, hd]
            if not pairs:  # every query x every candidate; a view (no copy) when there is one query
                k = k[None].expand(G0, *k.shape).flatten(0, 1)  # [G0*n, Hkv, P, hd]
                v = v[None].expand(G0, *v.shape).flatten(0, 1)
            h, att = block(h, mask, k, v, need_weights)  # h [G0, G1, L, W]
            maps.append(att)
        m = mask[:, None, :, None].to(h.dtype)  # [G0, 1, L, 1]
        pooled = (self.ln_f(h) * m).sum(2) / m.sum(2)  # [G0, G1, W] masked mean: padding never counts
        return self.head(pooled).squeeze(-1), maps  # [G0, G1]

    def _collect_maps(self, maps, text_mask: Tensor, L: int, P: int, pairs: bool) -> list[Tensor]:
        """Per-chunk, per-layer maps -> per layer float32 [B, N, H, L, P] ([N, H, L, P] if pairs)."""
        B, H = text_mask.shape[0], self.config.heads
        out = []
        for layer in range(self.config.depth):
            parts = [chunk[layer].float() for chunk in maps]
            if not parts:  # no candidates
                shape = (0, H, L, P) if pairs else (B, 0, H, L, P)
                out.append(torch.zeros(shape, device=text_mask.device))
                continue
            att = torch.cat(parts, 0 if pairs else 1)  # [G0, G1, H, L', P]
            att = F.pad(att, (0, 0, 0, L - att.shape[3]))  # restore the trimmed padding rows
            att = att * text_mask[:, None, None, :, None].to(att.dtype)  # padding rows -> 0
            out.append(att[:, 0] if pairs else att)
        return out

    def _check(self, text_tokens, text_mask, memory, retrieval_score, pairs, chunk_size):
        """Validate shapes; returns (B, L)."""
        cfg = self.config
        if text_tokens.dim() != 3 or text_tokens.shape[-1] != cfg.text_dim:
            raise InputError(
                f"text_tokens must be [B, L, {cfg.text_dim}], got {list(text_tokens.shape)}"
            )
        B, L, _ = text_tokens.shape
        if tuple(text_mask.shape) != (B, L):
            raise InputError(f"text_mask must be [B, L] = {[B, L]}, got {list(text_mask.shape)}")
        if B == 0:
            raise InputError("no queries: text_tokens has B == 0 rows")
        if not bool(text_mask.bool().any(1).all()):
            raise InputError("every query needs at least one real token (text_mask all False in a row)")
        if memory.dim() != 3 or memory.shape[-1] != cfg.memory_dim:
            raise InputError(
                f"memory must be [N, P, {cfg.memory_dim}] from image_memory(), got {list(memory.shape)}"
            )
        N = memory.shape[0]
        if pairs:
            if N != B or tuple(retrieval_score.shape) != (N,):
                raise InputError(
                    f"pairs=True needs B == N and retrieval_score [N]; got B={B}, N={N}, "
                    f"retrieval_score {list(retrieval_score.shape)}"
                )
        elif tuple(retrieval_score.shape) not in ((B, N), (N,)):
            raise InputError(
                f"retrieval_score must be [B, N] = {[B, N]} or [N], got {list(retrieval_score.shape)}"
            )
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise InputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        return B, L
