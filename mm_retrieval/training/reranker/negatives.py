"""Negatives that need binding: *twins* (other rows with the same caption words) and *rewritten
captions* (the same words bound differently). Pure Python; no network, no downloaded model.

A pooled dual encoder reads a caption much like a bag of words, so the negatives it confuses most
are the ones with exactly the query's words in another arrangement. Training the reranker on them
is what makes it bind ("which colour goes with which shape", "which object is left").

**Twins** (:func:`twin_lists`): two captions are twins when they are permutations of each other's
words (case and punctuation ignored) but not the same text; with a ``group`` column (the
compositional set's contrast groups), rows of one group are twins too. Training puts every twin's
image into a caption's listwise set (image side) and every twin's caption into its image's set
(text side).

**Rewrites** (:func:`rewrite_caption`), English, by rule. A caption is read as *noun phrases*
(an article -- ``a``, ``an``, ``the`` -- then words up to the noun: the last word before a
relation phrase, a comma, ``and``/``with``/``of``, or the end) joined by *relation phrases* from
:data:`RELATIONS` (``left of``, ``above``, ``on top of``, ...). Three rules, each giving captions
with exactly the original's words:

1. **Swap attributes between objects**: for two noun phrases, exchange the modifiers at the same
   distance from the noun (English orders them by kind -- size before colour -- so the same
   position is usually the same kind): "a *small red* circle ... a *large blue* square" gives
   "a small *blue* circle ... a large *red* square" and "a *large* red circle ... a *small* blue
   square".
2. **Swap the objects around a relation**: "X left of Y" gives "Y left of X".
3. **Swap two same-kind words** anywhere in the caption, for the kinds in :data:`KINDS` (colours,
   sizes, skin tones, ...): covers attributes outside noun phrases ("a man in red and a woman in
   blue").

Articles are re-agreed after a swap ("a orange" -> "an orange"). A rewrite that equals the
original (e.g. both objects red) is dropped; duplicates are kept once. A caption with fewer than
two noun phrases or kind words yields nothing; training then uses its twins (if any) and the
image-side negatives as before, and says how many captions had no rewrite.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

# The English parse (noun phrases, relation phrases) is shared with the reranker's phrase head.
from mm_retrieval.stages.rerankers.cross_attention.phrases import (
    PUNCT,
    RELATIONS,
    TOKEN,
    core_word,
    noun_phrases,
    relation_spans,
)

__all__ = ["KINDS", "RELATIONS", "rewrite_caption", "twin_lists", "word_key"]

# Words of one kind that can stand in for each other (rule 3). Small and generic on purpose.
KINDS: dict[str, frozenset[str]] = {
    "colour": frozenset(
        "red green blue yellow purple orange pink brown black white gray grey silver gold beige "
        "violet cyan magenta turquoise".split()
    ),
    "size": frozenset("small large big little tiny huge tall short long wide narrow".split()),
    "skin tone": frozenset("light-skinned medium-skinned dark-skinned fair-skinned pale tanned".split()),
    "age": frozenset("young old elderly".split()),
    "count": frozenset("one two three four five six seven eight nine ten".split()),
}

_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def word_key(caption: str) -> tuple[str, ...]:
    """The caption's words, lower-cased and sorted: equal for captions that are word permutations."""
    return tuple(sorted(_WORD.findall(caption.lower())))


def twin_lists(captions: Sequence[str], groups: Sequence[object] | None = None) -> list[list[int]]:
    """For each caption (by position), the positions of its twins: captions with the same words
    in another order (:func:`word_key`) and, when ``groups`` is given, other captions of the same
    group (``None``/NaN group values link nothing). A caption is never its own twin, nor is one
    with the same words in the same order (case and punctuation aside: it says the same thing)."""
    by_key: dict[tuple[str, ...], list[int]] = {}
    by_group: dict[str, list[int]] = {}
    for i, c in enumerate(captions):
        by_key.setdefault(word_key(c), []).append(i)
        g = None if groups is None else groups[i]
        if g is not None and not (isinstance(g, float) and math.isnan(g)):  # NaN: no group (pandas)
            by_group.setdefault(str(g), []).append(i)
    out = []
    for i, c in enumerate(captions):
        mates = dict.fromkeys(by_key[word_key(c)])
        if groups is not None and str(groups[i]) in by_group:
            mates.update(dict.fromkeys(by_group[str(groups[i])]))
        words = _WORD.findall(c.lower())
        out.append([j for j in mates if _WORD.findall(captions[j].lower()) != words])
    return out


def _replace_core(token: str, word: str) -> str:
    pre, core, post = PUNCT.match(token).groups()  # type: ignore[union-attr]
    if core[:1].isupper():
        word = word[:1].upper() + word[1:]
    return f"{pre}{word}{post}"


def _fix_articles(tokens: list[str]) -> list[str]:
    out = list(tokens)
    for i in range(len(out) - 1):
        core = core_word(out[i])
        if core in ("a", "an"):
            nxt = core_word(out[i + 1])
            want = "an" if nxt[:1] in set("aeiou") else "a"
            if want != core:
                out[i] = _replace_core(out[i], want)
    return out


def rewrite_caption(caption: str) -> list[str]:
    """Captions with ``caption``'s words bound differently, by the three rules of the module
    docstring, in rule order, without duplicates and without the original."""
    tokens = TOKEN.findall(caption)
    words = [core_word(t) for t in tokens]
    phrases = noun_phrases(tokens)
    found: list[list[str]] = []

    # 1. attributes at the same distance from the noun, between every two noun phrases
    for a in range(len(phrases)):
        for b in range(a + 1, len(phrases)):
            pa, pb = phrases[a], phrases[b]
            for k in range(1, min(pa.end - pa.start, pb.end - pb.start)):
                ia, ib = pa.end - k, pb.end - k
                if words[ia] != words[ib]:
                    t = list(tokens)
                    t[ia], t[ib] = _replace_core(tokens[ia], words[ib]), _replace_core(tokens[ib], words[ia])
                    found.append(t)

    # 2. the noun phrases on either side of a relation trade places
    rels = relation_spans(words)
    for pa, pb in zip(phrases, phrases[1:]):
        if pa.end + 1 in rels and rels[pa.end + 1] == pb.start:
            left, right = tokens[pa.start : pa.end + 1], tokens[pb.start : pb.end + 1]
            # keep trailing punctuation where it was (e.g. "square," stays before the comma)
            tail_l, tail_r = PUNCT.match(left[-1]).group(3), PUNCT.match(right[-1]).group(3)  # type: ignore[union-attr]
            left = left[:-1] + [left[-1][: len(left[-1]) - len(tail_l)] + tail_r]
            right = right[:-1] + [right[-1][: len(right[-1]) - len(tail_r)] + tail_l]
            rel = tokens[pa.end + 1 : pb.start]
            right = [_replace_core(right[0], core_word(right[0]))] + right[1:]
            if tokens[pa.start][:1].isupper():  # sentence case moves with the position
                right[0] = right[0][:1].upper() + right[0][1:]
                left[0] = left[0][:1].lower() + left[0][1:]
            found.append(tokens[: pa.start] + right + rel + left + tokens[pb.end + 1 :])

    # 3. two different words of one kind anywhere
    for vocab in KINDS.values():
        idx = [i for i, w in enumerate(words) if w in vocab]
        for x in range(len(idx)):
            for y in range(x + 1, len(idx)):
                i, j = idx[x], idx[y]
                if words[i] != words[j]:
                    t = list(tokens)
                    t[i], t[j] = _replace_core(tokens[i], words[j]), _replace_core(tokens[j], words[i])
                    found.append(t)

    original = " ".join(tokens)
    out: dict[str, None] = {}
    for t in found:
        text = " ".join(_fix_articles(t))
        if text != original and text.lower() != caption.strip().lower():
            out.setdefault(text)
    return list(out)
