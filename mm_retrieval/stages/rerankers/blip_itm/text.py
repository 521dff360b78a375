"""BLIP's query side: its own BERT tokenizer, and query words for attention maps.

A query is tokenised once (kept in ``Query.memo``) as ``[CLS] pieces [SEP]``, the input
transformers' ``BlipProcessor`` gives ``BlipForImageTextRetrieval``. BLIP's original evaluation
replaces the first token with ``[ENC]`` for image-text matching; ``first_token="enc"`` does that
(the hub checkpoints' tokenizers have ``[ENC]``). Queries longer than the text encoder's 512
positions are cut to 512 tokens (the last kept token is ``[SEP]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ....errors import ConfigError


@dataclass(frozen=True)
class QueryTokens:
    """One tokenised query. ``ids`` and ``mask`` are ``[1, L]`` torch tensors; ``word_of[i]`` is
    the index in ``words`` of token i (None for special tokens); ``truncated`` counts dropped tokens."""

    ids: Any
    mask: Any
    words: list[str]
    word_of: list[int | None]
    truncated: int = 0


def tokenize_query(tokenizer: Any, text: str, *, max_tokens: int, first_token: str = "cls") -> QueryTokens:
    """Tokenise ``text`` for BLIP's text encoder (see the module docstring)."""
    import torch

    # verbose=False: transformers' own "longer than the maximum" warning; ours is said once, by the stage
    full = len(tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])
    enc = tokenizer(text, truncation=True, max_length=max_tokens, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if first_token == "enc":
        enc_id = tokenizer.convert_tokens_to_ids("[ENC]")
        if enc_id is None or enc_id == tokenizer.unk_token_id:
            raise ConfigError("first_token 'enc': this checkpoint's tokenizer has no [ENC] token; use first_token 'cls'")
        ids[0] = enc_id
    words, word_of = _words(text, enc.word_ids(), enc["offset_mapping"])
    return QueryTokens(
        ids=torch.tensor([ids], dtype=torch.long),
        mask=torch.ones((1, len(ids)), dtype=torch.long),
        words=words,
        word_of=word_of,
        truncated=max(0, full - len(ids)),
    )


def _words(text: str, word_ids: list[int | None], offsets: list[tuple[int, int]]) -> tuple[list[str], list[int | None]]:
    """Query words (word pieces merged back, spelled as in ``text``) and each token's word index."""
    spans: dict[int, list[int]] = {}
    for wid, (start, end) in zip(word_ids, offsets):
        if wid is not None:
            s = spans.setdefault(wid, [start, end])
            s[0], s[1] = min(s[0], start), max(s[1], end)
    order = {wid: i for i, wid in enumerate(sorted(spans))}
    words = [text[spans[wid][0] : spans[wid][1]] for wid in sorted(spans)]
    return words, [None if wid is None else order[wid] for wid in word_ids]
