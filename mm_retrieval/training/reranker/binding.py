"""Binding negatives on the training features: twins, rewritten captions, pixels for a local image side.

:func:`add_binding_negatives` fills :class:`~.data.Features`' ``caption_twins`` and
``caption_rewrites`` (the rules are :mod:`.negatives`'); the rewritten captions are encoded once by
the frozen encoder and appended after the table's captions. :func:`load_pixels` keeps each image's
preprocessed pixels for a reranker with its own image side (``RerankerConfig.local_channels``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from mm_retrieval.training.reranker.negatives import rewrite_caption, twin_lists

if TYPE_CHECKING:
    from mm_retrieval.training.reranker.data import Features

logger = logging.getLogger(__name__)


def add_binding_negatives(feats: Features, encoder: Any, captions: list[str], max_rewrites: int = 8) -> dict[str, int]:
    """Set ``feats.caption_twins`` / ``feats.caption_rewrites`` for ``captions`` (the table's unique
    captions, in caption-id order); returns counts for the log and the checkpoint's metadata."""
    import torch

    from mm_retrieval.training.reranker.data import _encode_captions

    groups = None
    if feats.row_group is not None:  # a caption's group: that of its first row
        first: dict[int, Any] = {}
        for c, g in zip(feats.row_caption.tolist(), feats.row_group):
            first.setdefault(c, g)
        groups = [first.get(i) for i in range(len(captions))]
    feats.caption_twins = twin_lists(captions, groups)
    known = {c: i for i, c in enumerate(captions)}
    extra: dict[str, int] = {}
    rewrites: list[list[int]] = []
    for c in captions:
        ids = []
        for r in rewrite_caption(c)[:max_rewrites]:
            if r in known:  # another row's caption (e.g. a twin's): reuse its features
                ids.append(known[r])
            else:
                ids.append(len(captions) + extra.setdefault(r, len(extra)))
        rewrites.append(ids)
    feats.caption_rewrites = rewrites
    if extra:
        emb, tok, mask = _encode_captions(encoder, list(extra))
        L = max(tok.shape[1], feats.text_tokens.shape[1])

        def pad(t, n):
            return torch.nn.functional.pad(t, (0, 0, 0, n - t.shape[1])) if t.dim() == 3 else \
                torch.nn.functional.pad(t, (0, n - t.shape[1]))

        if feats.text_roles is not None:
            from mm_retrieval.training.reranker.data import caption_roles

            feats.text_roles = torch.cat([pad(feats.text_roles, L), pad(caption_roles(encoder, list(extra), mask), L)])
        feats.text_tokens = torch.cat([pad(feats.text_tokens, L), pad(tok, L)])
        feats.text_mask = torch.cat([pad(feats.text_mask, L), pad(mask, L)])
        feats.text_emb = torch.cat([feats.text_emb, emb])
    stats = {
        "captions": len(captions),
        "with_twins": sum(bool(t) for t in feats.caption_twins),
        "with_rewrites": sum(bool(r) for r in rewrites),
        "new_captions": len(extra),
    }
    no_neg = sum(not t and not r for t, r in zip(feats.caption_twins, rewrites))
    logger.info(
        "train-reranker: binding negatives: %d of %d captions have twins, %d have rewritten captions "
        "(%d new captions encoded); %d have neither and train on image-side negatives only",
        stats["with_twins"], len(captions), stats["with_rewrites"], len(extra), no_neg,
    )
    stats["neither"] = no_neg
    return stats


def load_pixels(encoder: Any, paths: list[str]):
    """[I, 3, S, S] float16: each image through the encoder's own preprocessing."""
    import torch
    from PIL import Image

    encoder.warm_up()
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(encoder.image_transform(im.convert("RGB")).half())
    return torch.stack(out)
