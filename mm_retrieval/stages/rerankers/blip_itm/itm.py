"""BLIP's query side over cached vision tokens: the text encoder's forward and the ITM head, with
each cross-attention layer either *standard* or *folded*.

Per layer and head h (head width hd, query rows q_h, cached tokens x_j of width e):

* **standard** (transformers' order): project every cached token to a key and a value,
  ``k_j = W_k x_j + b_k``, ``v_j = W_v x_j + b_v``, then attend. Cost per (query, image) pair and
  layer: ``2 P e d`` for the projections, whatever the query's length.
* **folded**: ``q_h . (W_k,h x_j + b_k,h) = (W_k,h^T q_h) . x_j + q_h . b_k,h``; the second term is
  the same for every token j and cancels in the softmax, so the scores come from ``q~_h = W_k,h^T
  q_h`` (width e) against the raw tokens. ``sum_j a_j (W_v,h x_j + b_v,h) = W_v,h (sum_j a_j x_j) +
  b_v,h`` because the weights sum to 1 (eval mode: no dropout). The heads are stacked, so both
  products against the cache are one batched matrix multiply per candidate: ``[H L, e] x [e, P]``
  and ``[H L, P] x [P, e]``. Cost: ``2 H L P e + 2 L d e``, linear in the query length L.

Folding wins while ``2 H L P e + 2 L d e < 2 P e d + 2 L P d``: for BLIP-base (d = e = 768, H = 12,
P = 577) below about 62 query tokens (:func:`break_even_tokens`). Queries are therefore never padded
to a fixed length, and the cache is never padded either (transformers ignores the cross-attention
mask: a padded token would be attended to).

Either way the last layer computes only the [CLS] row the ITM head reads (its keys and values for
self-attention still come from every query token); a single query row always folds. With
``attentions=True`` (explain) every row of every layer is computed and the cross-attention weights
are returned, equal in both paths.

Both paths equal transformers' ``BlipForImageTextRetrieval(..., use_itm_head=True)`` within float
rounding (checked in fp32 at 1e-5 by tests/integration/reranking/test_blip_fold.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

PATHS = ("folded", "standard")


@dataclass(frozen=True)
class TextGeometry:
    """What the cost of the query side depends on (from the model's config)."""

    layers: int
    hidden: int  # d: the text encoder's width
    heads: int  # H
    intermediate: int  # the feed-forward width
    encoder_width: int  # e: the cached tokens' width (the vision model's)

    @classmethod
    def of(cls, config: Any) -> TextGeometry:
        """From a ``BlipConfig`` (a model's ``.config``)."""
        tc = config.text_config
        e = int(getattr(tc, "encoder_hidden_size", 0) or config.vision_config.hidden_size)
        return cls(int(tc.num_hidden_layers), int(tc.hidden_size), int(tc.num_attention_heads), int(tc.intermediate_size), e)


def text_macs(g: TextGeometry, query_tokens: int, image_tokens: int, path: str) -> int:
    """Multiply-accumulates of the query side for one (query, image) pair, as this module computes
    it (analytic; the last layer only for the [CLS] row)."""
    L, P, d, e, H, f = query_tokens, image_tokens, g.hidden, g.encoder_width, g.heads, g.intermediate

    def layer(rows: int, cross_path: str) -> int:
        self_attn = L * d * 2 * d + rows * d * d + 2 * rows * L * d + rows * d * d  # K,V of all rows; Q; scores+context; output
        if cross_path == "folded":
            cross = rows * d * d + 2 * rows * d * e + 2 * H * rows * P * e + rows * d * d  # Q; fold W_k, W_v; vs cache; output
        else:
            cross = rows * d * d + 2 * P * e * d + 2 * rows * P * d + rows * d * d  # Q; K,V of the cache; vs K,V; output
        return self_attn + cross + 2 * rows * d * f

    return (g.layers - 1) * layer(L, path) + layer(1, "folded") + d * 2  # + the ITM head


def break_even_tokens(g: TextGeometry, image_tokens: int) -> int:
    """The longest query (tokens) for which the folded path does fewer multiply-accumulates."""
    L = 1
    while L < 4096 and text_macs(g, L + 1, image_tokens, "folded") <= text_macs(g, L + 1, image_tokens, "standard"):
        L += 1
    return L


class BlipItmTextSide:
    """BLIP's text encoder + ITM head, reading the weights of a loaded ``BlipForImageTextRetrieval``
    (no copy of them, apart from the fused Q/K/V matrices below). ``forward`` scores text rows
    against vision tokens; ``dtype`` (bf16/fp16 on CUDA, else None) is what the caller's autocast
    computes in: the cached tokens are cast to it once, not once per layer."""

    def __init__(self, model: Any):
        import torch

        te = model.text_encoder
        cfg = te.config
        if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
            raise NotImplementedError(f"BLIP text encoder with {cfg.position_embedding_type} position embeddings")
        self.geometry = TextGeometry.of(model.config)
        self.embeddings = te.embeddings
        self.layers = list(te.encoder.layer)
        self.itm_head = model.itm_head
        self.heads = self.geometry.heads
        self.head_width = self.geometry.hidden // self.heads
        self.scale = 1.0 / math.sqrt(self.head_width)
        with torch.no_grad():
            self._self_qkv = [self._cat(layer.attention.self, ("query", "key", "value")) for layer in self.layers]
            self._cross_kv = [self._cat(layer.crossattention.self, ("key", "value")) for layer in self.layers]
            h, hd = self.heads, self.head_width
            self._folds = [(c.key.weight.view(h, hd, -1), c.value.weight.view(h, hd, -1).transpose(1, 2).contiguous())
                           for c in (layer.crossattention.self for layer in self.layers)]  # [H, hd, e], [H, e, hd]

    @staticmethod
    def _cat(attn: Any, names: tuple[str, ...]) -> tuple[Any, Any]:
        import torch

        return (torch.cat([getattr(attn, n).weight for n in names]).contiguous(),
                torch.cat([getattr(attn, n).bias for n in names]).contiguous())

    def forward(self, ids: Any, mask: Any, image_tokens: Any, *, path: str = "folded", attentions: bool = False,
                dtype: Any = None) -> tuple[Any, list[Any] | None]:
        """(ITM logits [n, 2], cross-attention weights per layer [n, H, L, P] or None) of text rows
        ``ids``/``mask`` [n, L] (right-padded, padding masked) against ``image_tokens`` [n, P, e]."""
        if path not in PATHS:
            raise ValueError(f"unknown cross-attention path {path!r}; one of {PATHS}")
        x = image_tokens if dtype is None else image_tokens.to(dtype)
        h = self.embeddings.LayerNorm(self.embeddings.word_embeddings(ids) + self.embeddings.position_embeddings(
            self.embeddings.position_ids[:, : ids.shape[1]]))
        keep = mask[:, None, None, :].bool()  # [n, 1, 1, L]: padding keys masked in self-attention
        maps: list[Any] | None = [] if attentions else None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            cls_only = i == last and not attentions  # the ITM head reads the [CLS] row only
            h = self._self_attention(i, layer, h, keep, cls_only)
            h, a = self._cross_attention(i, layer, h, x, "folded" if h.shape[1] == 1 else path, attentions)
            if maps is not None:
                maps.append(a)
            h = layer.output(layer.intermediate(h), h)
        return self.itm_head(h[:, 0, :]), maps

    def _split(self, t: Any) -> Any:
        """[n, L, d] -> [n, H, L, hd]."""
        n, L, _ = t.shape
        return t.view(n, L, self.heads, self.head_width).transpose(1, 2)

    def _merge(self, t: Any) -> Any:
        """[n, H, L, hd] -> [n, L, d]."""
        n, _, L, _ = t.shape
        return t.transpose(1, 2).reshape(n, L, self.heads * self.head_width)

    def _self_attention(self, i: int, layer: Any, h: Any, keep: Any, cls_only: bool) -> Any:
        import torch.nn.functional as F

        w, b = self._self_qkv[i]
        if cls_only:  # keys and values of every row, the query of [CLS] only
            d = h.shape[-1]
            k, v = F.linear(h, w[d:], b[d:]).chunk(2, dim=-1)
            h = h[:, :1]
            q = F.linear(h, w[:d], b[:d])
        else:
            q, k, v = F.linear(h, w, b).chunk(3, dim=-1)
        ctx = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v), attn_mask=keep)
        return layer.attention.output(self._merge(ctx), h)

    def _cross_attention(self, i: int, layer: Any, h: Any, x: Any, path: str, attentions: bool) -> tuple[Any, Any]:
        import torch
        import torch.nn.functional as F

        attn = layer.crossattention.self
        n, L, d = h.shape
        H, hd = self.heads, self.head_width
        q = F.linear(h, attn.query.weight, attn.query.bias)  # [n, L, d]
        if path == "standard":
            w, b = self._cross_kv[i]
            k, v = F.linear(x, w, b).chunk(2, dim=-1)  # [n, P, d] each: every cached token projected
            q, k, v = self._split(q), self._split(k), self._split(v)
            if attentions:
                a = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
                ctx = a @ v
            else:
                a, ctx = None, F.scaled_dot_product_attention(q, k, v)
            return layer.crossattention.output(self._merge(ctx), h), a
        e, P = x.shape[-1], x.shape[1]
        dt = x.dtype  # explicit: the out= products below are not autocast
        wk, wvt = self._folds[i]
        # Rows are ordered (token, head) per candidate, so each product writes straight into the
        # layout the next one reads: no transposing copies (~15% of the forward when they were there).
        # fold W_k into the query: per head [n L, hd] x [hd, e], written as qt [n, L H, e]
        qh = (q * self.scale).to(dt).view(n * L, H, hd).transpose(0, 1)  # [H, n L, hd]
        qt = torch.empty((n, L * H, e), dtype=dt, device=x.device)
        torch.bmm(qh, wk.to(dt), out=qt.view(n * L, H, e).transpose(0, 1))
        a = torch.softmax(torch.bmm(qt, x.transpose(1, 2)), dim=-1)  # [n, L H, P]; q.b_k cancels here
        raw = torch.bmm(a.to(dt), x)  # [n, L H, e]: sum_j a_j x_j per (token, head)
        ctx = torch.empty((n, L, d), dtype=dt, device=x.device)  # per head [n L, e] x [e, hd] -> W_v (sum_j a_j x_j)
        torch.bmm(raw.view(n * L, H, e).transpose(0, 1), wvt.to(dt), out=ctx.view(n * L, H, hd).transpose(0, 1))
        ctx = ctx + attn.value.bias.to(dt)
        maps = a.view(n, L, H, P).transpose(1, 2) if attentions else None
        return layer.crossattention.output(ctx.to(h.dtype) if dt != h.dtype else ctx, h), maps
