"""The reranker's phrase head: which query tokens name the subject, the object and the relation
(:mod:`...cross_attention.phrases`), and the head that compares where the two phrases are found."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from mm_retrieval.errors import ConfigError, InputError
from mm_retrieval.stages.rerankers.cross_attention.model import CrossAttentionScorer, RerankerConfig
from mm_retrieval.stages.rerankers.cross_attention.phrases import OBJECT, RELATION, SUBJECT, token_roles, word_roles
from mm_retrieval.stages.rerankers.cross_attention.stage import word_spans

S, O, R = SUBJECT, OBJECT, RELATION


@pytest.mark.parametrize(
    ("caption", "roles"),
    [
        ("a small red circle left of a large blue square", [S, S, S, S, R, R, O, O, O, O]),
        # a third object: only the first relation between two phrases gets roles
        ("a red circle above a blue square, and a green triangle below them",
         [S, S, S, R, O, O, O, 0, 0, 0, 0, 0, 0]),
        ("A man in a red shirt holding a cup.", [S, S, R, O, O, O, 0, 0, 0]),
        ("a dog and a cat", [S, S, 0, O, O]),  # no relation: the first two phrases, no relation words
        ("the dog", [S, S]),
        ("red car", [0, 0]),  # no noun phrase: no roles, the head adds nothing
        ("a cat to the left of a dog", [S, S, R, R, R, R, O, O]),
    ],
)
def test_word_roles(caption, roles):
    assert word_roles(caption) == roles


def test_token_roles_follow_the_tokenizers_words():
    tok = open_clip.get_tokenizer("ViT-B-32")  # BPE vocabulary ships in the wheel: nothing downloaded
    caps = ["a small red circle left of a large blue square,", "red car", "a cat"]
    ids = tok(caps)
    roles = token_roles(tok, caps, (ids != 0).numpy())
    assert roles.shape == tuple(ids.shape)
    # [SOT] a small red circle left of a large blue square , [EOT]: the comma is part of the last word
    assert roles[0, :14].tolist() == [0, S, S, S, S, R, R, O, O, O, O, O, 0, 0]
    assert not roles[1].any()
    assert roles[2, :4].tolist() == [0, S, S, 0]
    # a tokenizer that cannot encode word by word, or a truncated caption: no roles
    assert not token_roles(object(), caps, (ids != 0).numpy()).any()
    short = (ids != 0).numpy()
    short[0, 5:] = False
    assert not token_roles(tok, caps[:1], short[:1]).any()
    assert [w for w, _ in word_spans(tok, caps[0], 11)][:3] == ["a", "small", "red"]


def _config(**kw):
    base = dict(text_dim=8, image_dim=8, width=16, heads=2, memory_dim=8, num_patches=9, phrase_dim=8)
    return RerankerConfig(**{**base, **kw})


def test_a_fresh_phrase_head_adds_nothing_and_pairs_equal_the_grid():
    torch.manual_seed(0)
    model = CrossAttentionScorer(_config()).eval()
    text, mask = torch.randn(3, 6, 8), torch.ones(3, 6, dtype=torch.bool)
    roles = torch.tensor([[0, S, S, R, O, O]] * 3)
    memory = model.image_memory(torch.randn(4, 9, 8))
    score = torch.rand(4)
    assert torch.equal(model(text, mask, memory, score, roles=roles), model(text, mask, memory, score))
    with torch.no_grad():
        model.phrases.direction.weight.normal_()
        model.phrases.match.fill_(1.0)
    grid = model(text, mask, memory, score, roles=roles)
    assert not torch.allclose(grid, model(text, mask, memory, score))
    pairs = model(text.repeat_interleave(4, 0), mask.repeat_interleave(4, 0), memory.repeat(3, 1, 1), score.repeat(3),
                  roles=roles.repeat_interleave(4, 0), pairs=True)
    torch.testing.assert_close(pairs.view(3, 4), grid, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="roles"):
        model(text, mask, memory, score, roles=roles[:, :4])


def test_phrase_head_config_errors():
    with pytest.raises(ConfigError, match="phrase_dim needs num_patches"):
        _config(num_patches=0)
    with pytest.raises(ConfigError, match="phrase_dim needs num_patches"):
        _config(num_patches=8)
    with pytest.raises(ConfigError, match="phrase_dim"):
        _config(phrase_dim=-1)


def test_the_phrase_head_learns_relations_and_applies_them_to_pairs_never_seen_together():
    """Queries "X rel Y" over 3x3 images holding concept X and concept Y in two cells; the
    negative image holds them in swapped cells, so only *where* each concept is tells the two
    apart (the first-stage score is 0). Training sees some concept pairs, the test others."""
    torch.manual_seed(0)
    D, K = 8, 8  # width, concepts
    concepts = F.normalize(torch.randn(K, D), dim=-1) * 3
    relations = torch.randn(4, D)  # left of, right of, above, below
    axis = {0: (0, -1), 1: (0, 1), 2: (1, -1), 3: (1, 1)}  # (x or y, sign of subject - object)
    pairs = [(a, b) for a in range(K) for b in range(K) if a != b]
    held_out = {p for p in pairs if (p[0] + p[1]) % 4 == 0}
    train_pairs = [p for p in pairs if p not in held_out]
    g = torch.Generator().manual_seed(1)

    def batch(n, pool):
        text = torch.zeros(n, 4, D)
        pos, neg = torch.zeros(n, 9, D), torch.zeros(n, 9, D)
        for i in range(n):
            a, b = pool[int(torch.randint(len(pool), (1,), generator=g))]
            rel = int(torch.randint(4, (1,), generator=g))
            dim, sign = axis[rel]
            # two cells apart along the relation's axis, the subject's on the side it names
            lo, hi, other = int(torch.randint(2, (1,), generator=g)), 2, int(torch.randint(3, (1,), generator=g))
            ca, cb = (lo, hi) if sign < 0 else (hi, lo)
            cell = (lambda c: other * 3 + c) if dim == 0 else (lambda c: c * 3 + other)
            pos[i, cell(ca)], pos[i, cell(cb)] = concepts[a], concepts[b]
            neg[i, cell(cb)], neg[i, cell(ca)] = concepts[a], concepts[b]
            text[i] = torch.stack([concepts[a], relations[rel], concepts[b], torch.zeros(D)])
        return text, pos, neg

    roles = torch.tensor([S, R, O, 0])
    model = CrossAttentionScorer(_config(width=32, heads=2, memory_dim=16, phrase_dim=16, retrieval_scale_init=1.0))
    test = batch(256, sorted(held_out))

    def accuracy():
        model.eval()
        text, pos, neg = test
        mask, zero = torch.ones(len(text), 4, dtype=torch.bool), torch.zeros(len(text))
        r = roles.expand(len(text), 4)
        with torch.no_grad():
            sp = model.score_images(text, mask, pos, zero, pairs=True, roles=r)
            sn = model.score_images(text, mask, neg, zero, pairs=True, roles=r)
        model.train()
        return ((sp > sn).float() + 0.5 * (sp == sn).float()).mean().item()

    assert accuracy() == 0.5  # a fresh head adds nothing: only the uninformative first stage
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        text, pos, neg = batch(64, train_pairs)
        mask, zero, r = torch.ones(64, 4, dtype=torch.bool), torch.zeros(64), roles.expand(64, 4)
        sp = model.score_images(text, mask, pos, zero, pairs=True, roles=r)
        sn = model.score_images(text, mask, neg, zero, pairs=True, roles=r)
        loss = F.softplus(sn - sp).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert accuracy() >= 0.9
