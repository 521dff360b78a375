"""A text query, validated once and encoded at most once.

The search flow builds one :class:`Query` per text query and hands the same object to every
stage that needs it: the first stage reads :meth:`Query.embedding`, a reranker that reads the
encoder's token features reads :meth:`Query.text_features` (one forward pass yields both), and a
reranker with a text side of its own (BLIP's BERT) keeps its encoding in :meth:`Query.memo`.
Nothing re-encodes the query.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, Callable, TypeVar

import numpy as np

from .errors import InputError

MAX_QUERY_CHARS = 2000

T = TypeVar("T")


def validate_query(query: Any) -> str:
    """A usable text query, or InputError saying what is wrong with it."""
    if not isinstance(query, str):
        raise InputError(f"query must be text, got {type(query).__name__}")
    q = query.strip()
    if not q:
        raise InputError("the query is empty; give some words to search for, e.g. mmr search \"a red bicycle\"")
    if len(q) > MAX_QUERY_CHARS:
        raise InputError(f"the query is {len(q):,} characters long; the limit is {MAX_QUERY_CHARS:,}. Shorten it.")
    if "\x00" in q:
        raise InputError("the query contains a NUL character; pass plain text")
    return q


@dataclass
class TextFeatures:
    """The encoder's view of one query: ``embedding`` [D] float32 (L2-normalised), ``tokens``
    [C, W] float32 torch tensor (token features before pooling) and ``mask`` [C] bool torch
    tensor (True at real tokens)."""

    embedding: np.ndarray
    tokens: Any
    mask: Any


class Query:
    """One text query and its encodings, each computed on first use and remembered.

    ``encoder`` is the first stage's encoder (anything with ``encode_text`` and
    ``encode_text_tokens``); ``encodes`` counts the encoder forward passes made for this query
    (tests check it stays at one).
    """

    def __init__(self, text: str, encoder: Any):
        self.text = validate_query(text)
        self.encoder = encoder
        self.encodes = 0
        self._embedding: np.ndarray | None = None
        self._features: TextFeatures | None = None
        self._memo: dict[str, Any] = {}

    def embedding(self) -> np.ndarray:
        """[D] float32, L2-normalised: what the first stage searches with."""
        if self._embedding is None:
            if self._features is not None:
                self._embedding = self._features.embedding
            else:
                self.encodes += 1
                self._embedding = np.asarray(self.encoder.encode_text([self.text])[0], dtype=np.float32)
        return self._embedding

    def text_features(self) -> TextFeatures:
        """The embedding plus the token features, from one forward pass. Call it before
        :meth:`embedding` when both are needed (the search flow does)."""
        if self._features is None:
            self.encodes += 1
            emb, tokens, mask = self.encoder.encode_text_tokens([self.text])
            emb = emb[0].float().cpu().numpy()  # a torch tensor, like tokens and mask
            self._features = TextFeatures(embedding=emb, tokens=tokens[0], mask=mask[0])
            if self._embedding is None:
                self._embedding = emb
        return self._features

    def memo(self, key: str, compute: Callable[[], T]) -> T:
        """``compute()`` once per ``key`` for this query (a reranker's own text encoding)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def __repr__(self) -> str:
        return f"Query({self.text!r})"


def encode_queries(queries: Sequence[Query]) -> None:
    """Compute :meth:`Query.text_features` of many queries (of one encoder) in one forward pass:
    the server's batcher encodes a batch of requests together. Queries already encoded are
    left as they are."""
    todo = [q for q in queries if q._features is None]
    if not todo:
        return
    emb, tokens, mask = todo[0].encoder.encode_text_tokens([q.text for q in todo])
    emb = emb.float().cpu().numpy()
    for i, q in enumerate(todo):
        q.encodes += 1
        q._features = TextFeatures(embedding=emb[i], tokens=tokens[i], mask=mask[i])
        if q._embedding is None:
            q._embedding = emb[i]
