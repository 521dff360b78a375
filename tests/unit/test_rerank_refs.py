"""Which reranker a ``--rerank REF`` reaches: each reranker claims its own references
(``Reranker.accepts``, asked in registry order), ``NAME:REF`` names one outright, and a third
reranker registered as a plugin registers (no edit outside its own code) is reached the same way."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from mm_retrieval import Pipeline, registry
from mm_retrieval.errors import InputError
from mm_retrieval.pipeline import reranker_spec
from mm_retrieval.stages.base import Reranker
from mm_retrieval.testing.fakes import HashEncoder, InMemoryStore


@dataclass(frozen=True)
class FakeConfig:
    checkpoint: str = ""


@pytest.fixture
def fake_reranker(monkeypatch):
    """Registers ``reranker/fake`` for one test, as a module plugin's ``@register`` does: it claims
    ``fake-hub/...`` references and ranks the first stage's hits in reverse."""
    registry.names("reranker")  # the entry points are read before the registry is copied
    monkeypatch.setattr(registry, "_stages", dict(registry._stages))  # forgotten after the test

    @registry.register("reranker", "fake")
    class FakeReranker(Reranker):
        Config = FakeConfig
        references = "fake-hub/NAME"
        created: list[str] = []

        @classmethod
        def accepts(cls, ref: str) -> bool:
            return ref.startswith("fake-hub/")

        def _warm_up(self) -> None:
            FakeReranker.created.append(self.config.checkpoint)

        def score(self, query, hits):
            return -np.array([h.retrieval_score for h in hits])

        def token_writer(self):
            return None

    return FakeReranker


def _filled():
    """A hash encoder and an in-memory collection of four images for it."""
    encoder, store = HashEncoder(), InMemoryStore()
    store.ensure_collection(encoder.info())
    vectors = encoder.encode_text([f"picture {i}" for i in range(4)])  # as image vectors: any unit vectors do
    store.upsert([{"id": f"{i:032x}", "vector": v, "path": f"/p/{i}.png", "has_image": True} for i, v in enumerate(vectors)])
    return encoder, store


def _ours(tmp_path):
    d = tmp_path / "ours"
    d.mkdir()
    (d / "reranker.json").write_text("{}")  # what `mmr train-reranker` writes
    return d


def test_each_reranker_claims_its_own_references(tmp_path):
    ours = _ours(tmp_path)
    assert reranker_spec(str(ours)).name == "cross_attention"
    assert reranker_spec(str(ours / "reranker.json")).name == "cross_attention"
    assert reranker_spec("Salesforce/blip-itm-base-coco").name == "blip_itm"
    blip = tmp_path / "blip"
    blip.mkdir()
    (blip / "config.json").write_text("{}")  # a transformers checkpoint directory
    assert reranker_spec(str(blip)).name == "blip_itm"


def test_a_name_prefix_picks_the_reranker(tmp_path):
    ours = _ours(tmp_path)
    spec = reranker_spec(f"blip_itm:{ours}")  # claimed by cross_attention, but named
    assert (spec.name, spec.params["checkpoint"]) == ("blip_itm", str(ours))
    spec = reranker_spec("cross_attention:Salesforce/blip-itm-base-coco")
    assert (spec.name, spec.params["checkpoint"]) == ("cross_attention", "Salesforce/blip-itm-base-coco")
    with pytest.raises(InputError, match="name the checkpoint after the prefix"):
        reranker_spec("blip_itm:")


def test_a_reference_nobody_claims_is_an_error_saying_what_each_takes(tmp_path):
    with pytest.raises(InputError) as e:
        reranker_spec(str(tmp_path / "missing"))
    msg = str(e.value)
    assert "the path does not exist" in msg and "mmr train-reranker" in msg and "Salesforce/blip-itm-base-coco" in msg
    assert "--rerank NAME:CHECKPOINT" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no reranker recognises it"):
        reranker_spec(str(tmp_path / "empty"))


def test_a_configured_reranker_keeps_its_params_when_the_ref_picks_it(tmp_path):
    from mm_retrieval.config import StageSpec

    ours = _ours(tmp_path)
    configured = StageSpec("reranker", "cross_attention", {"checkpoint": "old", "chunk_size": 8})
    assert reranker_spec(str(ours), configured).params == {"checkpoint": str(ours), "chunk_size": 8}
    assert reranker_spec("Salesforce/blip-itm-base-coco", configured).params == {"checkpoint": "Salesforce/blip-itm-base-coco"}


def test_a_plugin_reranker_is_reached_by_its_references_and_its_name(fake_reranker, tmp_path):
    assert reranker_spec("fake-hub/model").name == "fake"
    spec = reranker_spec("fake:anything/at all")
    assert (spec.name, spec.params) == ("fake", {"checkpoint": "anything/at all"})
    with pytest.raises(InputError, match="fake: fake-hub/NAME"):  # said with the others when nobody claims a ref
        reranker_spec(str(tmp_path / "missing"))

    encoder, store = _filled()
    pipe = Pipeline(encoder=encoder, store=store, reranker="fake:weights-7")
    plain = pipe.search("a red picture", mode="image", rerank=False, k=4)
    reranked = pipe.search("a red picture", mode="image", k=4)
    assert reranked.reranked and fake_reranker.created == ["weights-7"]
    assert [h.id for h in reranked.hits] == [h.id for h in reversed(plain.hits)]


def test_cli_rerank_name_prefix_reaches_a_plugin_reranker(fake_reranker, monkeypatch, capsys):
    import json

    from mm_retrieval import cli

    encoder, store = _filled()
    # the command's pipeline on the in-memory collection; --rerank reaches Pipeline as the CLI passes it
    monkeypatch.setattr(cli, "_pipeline", lambda opts, **extra: Pipeline(encoder=encoder, store=store, **extra))
    assert cli.main(["search", "a picture", "--rerank", "fake:weights-9", "--mode", "image", "--k", "4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["reranked"] and fake_reranker.created == ["weights-9"]
    assert cli.main(["search", "a picture", "--rerank", "nobody:x", "--mode", "image"]) == 2  # not a reranker's name
    assert "--rerank 'nobody:x'" in capsys.readouterr().err
