"""Experiment: encode a query with the text tower on its real tokens only, not all 77 positions.

CLIP's tokenizer pads every text to the context length (77 for ViT-B-32); a search query has ~10
real tokens. The CLIP text transformer is causal and pools at the end-of-text token, so positions
after the last end-of-text token of a batch cannot change any output the product uses: the
embedding (pooled at EOT) or the per-token features up to EOT (what the reranker reads; it drops
padding columns itself). Running the tower on ``ids[:, :L]`` instead of ``ids`` is therefore exact
and does ~77/L times less work. The rerank suite measures the gain and the largest difference
against the stage's own ``encode_text_tokens``; the change itself belongs in the encoder stage
(see ``benchmarks/README.md``).

Applies to open_clip's built-in text tower (``CLIP`` with a causal ``attn_mask`` and ``argmax`` or
``eos`` pooling); :func:`supported` says when.
"""

from __future__ import annotations

from typing import Any


def supported(model: Any) -> bool:
    """True when truncating after the last EOT is exact for this open_clip model."""
    import torch

    mask = getattr(model, "attn_mask", None)
    if mask is None or not hasattr(model, "token_embedding") or not hasattr(model, "positional_embedding"):
        return False
    blocked = torch.isinf(mask)
    causal = bool((blocked == torch.ones_like(blocked).triu(1)).all())  # -inf exactly above the diagonal
    return causal and getattr(model, "text_pool_type", "argmax") in ("argmax", "eos")


def encode_trimmed(encoder: Any, texts: list[str]):
    """Like ``OpenClipEncoder.encode_text_tokens``: (embeddings [N, D] normalised, token features
    [N, L, W] for the first L positions, mask [N, L]) with L = last real token + 1 over the batch."""
    import torch
    import torch.nn.functional as F
    from open_clip.transformer import text_global_pool

    from ..stages.encoders.open_clip import _pad_id

    model = encoder.model
    ids = encoder.tokenize(texts).to(encoder.device)
    pad = _pad_id(encoder.tokenizer)
    real = ids != pad
    L = int(real.int().cumsum(1).argmax(1).max()) + 1  # position of the last real token, +1
    ids = ids[:, :L]
    with torch.inference_mode(), encoder._autocast():
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(ids).to(cast) + model.positional_embedding[:L].to(cast)
        x = model.transformer(x, attn_mask=model.attn_mask[:L, :L])
        x = model.ln_final(x)
        tokens = x
        pooled = text_global_pool(x, ids, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        if model.text_projection is not None:
            pooled = model.text_projection(pooled) if isinstance(model.text_projection, torch.nn.Linear) else pooled @ model.text_projection
        emb = F.normalize(pooled.float(), dim=-1)
    return emb, tokens.float(), real[:, :L]


def compare(encoder: Any, texts: list[str]) -> dict[str, Any]:
    """Largest absolute differences between the trimmed and the full encoding."""
    full_emb, full_tok, full_mask = encoder.encode_text_tokens(texts)
    emb, tok, mask = encoder.encode_text_tokens(texts) if not supported(encoder.model) else encode_trimmed(encoder, texts)
    L = tok.shape[1]
    m = full_mask[:, :L]
    return {
        "positions": [int(full_tok.shape[1]), int(L)],
        "max_abs_diff_embedding": float((full_emb - emb).abs().max()),
        "max_abs_diff_real_tokens": float(((full_tok[:, :L] - tok).abs() * m[..., None]).max()),
        "masks_equal": bool((full_mask[:, :L] == mask).all() and not full_mask[:, L:].any()),
    }
