"""Which query tokens name the two objects of a relation, and which name the relation itself.

The reranker's phrase head (:class:`.model.PhraseHead`) lets each of the two noun phrases around a
relation ("*a small red circle* **left of** *a large blue square*") attend to the image on its own
and compares where the two attentions land along the relation's direction. This module finds
those tokens: a rule-based English parse of the caption into words, then the text tower's token
positions of each word. Pure Python and numpy; no network, no downloaded model.

**The parse** (shared with the binding negatives of ``training/reranker/negatives.py``). A caption
is read as *noun phrases* (an article -- ``a``, ``an``, ``the`` -- then words up to the noun: the
last word before a relation phrase, a comma, ``and``/``with``/``of``, or the end) joined by
*relation phrases* from :data:`RELATIONS`. The first relation with a noun phrase directly on each
side gives the roles: the phrase before it is the *subject* (1), the one after it the *object* (2),
the relation's words the *relation* (3); every other word is 0. A caption without such a relation
gets its first two noun phrases as subject and object and no relation words; one without a noun
phrase gets no roles at all, and the head then adds nothing to its score.

**Tokens.** Each whitespace word is encoded on its own with the tokenizer's ``encode`` (open_clip's
BPE tokenizers split words exactly so), placed after the start token. A tokenizer without
``encode``, or whose words do not add up to the caption's tokens, gives no roles.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "OBJECT", "RELATION", "RELATIONS", "SUBJECT", "Phrase", "core_word", "noun_phrases",
    "relation_spans", "token_roles", "word_positions", "word_roles",
]  # fmt: skip

SUBJECT, OBJECT, RELATION = 1, 2, 3  # token roles; 0 = none

# Multi-word relations first, so "on top of" wins over "on".
RELATIONS: tuple[str, ...] = (
    "to the left of", "to the right of", "in front of", "on top of", "next to", "left of", "right of",
    "above", "below", "under", "underneath", "over", "behind", "beside", "near", "on", "in", "inside",
    "holding", "riding", "carrying", "wearing", "beneath", "against",
)  # fmt: skip

ARTICLES = frozenset({"a", "an", "the"})
STOPS = frozenset({"and", "with", "of", "while", "but", "them", "it", "each"})
TOKEN = re.compile(r"\S+")
PUNCT = re.compile(r"^(\W*)(.*?)(\W*)$")


@dataclass
class Phrase:
    """A noun phrase as whitespace-token indices: ``start`` the article, ``end`` the noun (inclusive)."""

    start: int
    end: int


def core_word(token: str) -> str:
    """A whitespace token without its surrounding punctuation, lower-cased."""
    return PUNCT.match(token).group(2).lower()  # type: ignore[union-attr]


def noun_phrases(tokens: list[str]) -> list[Phrase]:
    """Noun phrases of whitespace tokens (see the module docstring)."""
    words = [core_word(t) for t in tokens]
    rel_starts = relation_spans(words)
    out, i = [], 0
    while i < len(tokens):
        if i in rel_starts:  # "the" in "to the left of" starts no phrase
            i = rel_starts[i]
        elif words[i] in ARTICLES:
            j = i
            while j + 1 < len(tokens):
                nxt = words[j + 1]
                if nxt in ARTICLES or nxt in STOPS or (j + 1) in rel_starts or not nxt:
                    break
                j += 1
                if tokens[j].endswith((",", ".", ";", ":")):
                    break
            if j > i:
                out.append(Phrase(i, j))
            i = j + 1
        else:
            i += 1
    return out


def relation_spans(words: list[str]) -> dict[int, int]:
    """{start: end (exclusive)} of every relation phrase in ``words``, longest match first."""
    spans, i = {}, 0
    rels = [tuple(r.split()) for r in RELATIONS]
    while i < len(words):
        for r in rels:
            if tuple(words[i : i + len(r)]) == r:
                spans[i] = i + len(r)
                i += len(r) - 1
                break
        i += 1
    return spans


def word_roles(caption: str) -> list[int]:
    """One role per whitespace token of ``caption``: :data:`SUBJECT`, :data:`OBJECT`,
    :data:`RELATION` or 0 (see the module docstring for the rule)."""
    tokens = TOKEN.findall(caption)
    roles = [0] * len(tokens)
    phrases = noun_phrases(tokens)
    rels = relation_spans([core_word(t) for t in tokens])
    pair = next(((a, b) for a, b in zip(phrases, phrases[1:])
                 if a.end + 1 in rels and rels[a.end + 1] == b.start), None)
    if pair is not None:
        for i in range(pair[0].end + 1, pair[1].start):
            roles[i] = RELATION
    elif len(phrases) >= 2:
        pair = (phrases[0], phrases[1])
    elif phrases:
        pair = (phrases[0], None)
    else:
        return roles
    for role, phrase in zip((SUBJECT, OBJECT), pair):
        if phrase is not None:
            for i in range(phrase.start, phrase.end + 1):
                roles[i] = role
    return roles


def word_positions(tokenizer: Any, words: Sequence[str], n_tokens: int) -> list[list[int]] | None:
    """Token positions (1-based: after the start token) of each word, or None when the tokenizer
    can't encode words one at a time or the words need more than ``n_tokens`` tokens."""
    if not hasattr(tokenizer, "encode"):
        return None
    out, pos = [], 1
    for w in words:
        n = len(tokenizer.encode(w))
        out.append(list(range(pos, pos + n)))
        pos += n
    return out if pos - 1 == n_tokens else None


def token_roles(tokenizer: Any, captions: Sequence[str], mask: Any) -> np.ndarray:
    """[C, L] int8 role of each token (:func:`word_roles` spread over the word's tokens) for
    ``captions`` tokenized with ``mask`` [C, L] (True at real tokens, start and end included).
    A caption whose tokens can't be matched to its words (truncated, or a tokenizer without
    ``encode``) gets all zeros: the phrase head then adds nothing for it."""
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, dtype=np.int8)
    for c, caption in enumerate(captions):
        words = TOKEN.findall(caption)
        n_tokens = int(mask[c].sum()) - 2  # without the start and end tokens
        positions = word_positions(tokenizer, words, n_tokens)
        if positions is None:
            continue
        for role, pos in zip(word_roles(caption), positions):
            if role:
                out[c, pos] = role
    return out
