"""Binding negatives: caption rewriting rules and twin selection (pure Python, no model)."""

from __future__ import annotations

from mm_retrieval.training.reranker.negatives import rewrite_caption, twin_lists, word_key


def test_rewrites_swap_attributes_and_objects_of_a_relation():
    out = rewrite_caption("a small red circle left of a large blue square")
    assert out == [
        "a small blue circle left of a large red square",  # rule 1: colours (next to the noun)
        "a large red circle left of a small blue square",  # rule 1: sizes
        "a large blue square left of a small red circle",  # rule 2: objects around the relation
    ]
    for r in out:  # every rewrite is a permutation of the original's words
        assert word_key(r) == word_key("a small red circle left of a large blue square")


def test_rewrites_agree_articles_and_keep_case_and_punctuation():
    assert "an orange circle above a red square." in rewrite_caption("a red circle above an orange square.")
    assert rewrite_caption("A brown dog on top of a red car.") == [
        "A red dog on top of a brown car.",
        "A red car on top of a brown dog.",
    ]


def test_same_kind_words_outside_noun_phrases_are_swapped():
    assert rewrite_caption("A man in red and a woman in blue") == ["A man in blue and a woman in red"]
    assert rewrite_caption("two light-skinned men next to a dark-skinned woman") == [
        "two dark-skinned men next to a light-skinned woman"
    ]


def test_captions_without_two_phrases_or_kind_words_yield_nothing():
    assert rewrite_caption("a dog") == []
    assert rewrite_caption("sunset over the sea") == []
    assert rewrite_caption("") == []


def test_identical_rewrites_are_dropped():
    # both objects red: swapping the colours gives the original back
    assert rewrite_caption("a red circle left of a red square") == ["a red square left of a red circle"]


def test_three_object_captions_swap_every_pair():
    out = rewrite_caption("a small red circle left of a large blue square, and a large green triangle above them")
    assert "a small green circle left of a large blue square, and a large red triangle above them" in out
    assert "a large blue square left of a small red circle, and a large green triangle above them" in out
    assert len(out) == len(set(out)) == 6


def test_twins_are_word_permutations_or_group_mates_never_identical_captions():
    caps = ["a red x left of a blue y", "a blue x left of a red y", "A red x left of a blue y.", "a cat", "a dog"]
    assert twin_lists(caps) == [[1], [0, 2], [1], [], []]
    groups = ["g1", "g1", "g2", "g3", "g3"]
    assert twin_lists(caps, groups) == [[1], [0, 2], [1], [4], [3]]
    assert twin_lists(caps, [None, None, float("nan"), None, None]) == [[1], [0, 2], [1], [], []]
