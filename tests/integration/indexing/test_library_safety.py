"""Library users are safe: what one Pipeline does in a process does not break another, a failed
run leaves nothing half-made behind, and results say what scored them. The stages here are the
real Milvus Lite store with the hash encoder of :mod:`mm_retrieval.testing.fakes` (no model to
load), or the in-memory store where no database is involved."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from mm_retrieval import Pipeline
from mm_retrieval.cli import main
from mm_retrieval.errors import StageError
from mm_retrieval.stages.base import Reranker
from mm_retrieval.testing.fakes import HashEncoder, InMemoryStore
from tests.helpers import COLORS, make_image


@pytest.fixture
def photos(tmp_path):
    for i, (name, rgb) in enumerate(COLORS.items()):
        make_image(tmp_path / "photos" / f"{name}.png", rgb, seed=i)
    return tmp_path / "photos"


def test_closing_one_pipeline_leaves_the_lite_database_open_for_the_others(tmp_path, photos):
    db = str(tmp_path / "mmr.db")
    first, second = Pipeline(db=db, encoder=HashEncoder()), Pipeline(db=db, encoder=HashEncoder())
    first.index(photos, progress=False)
    query = str(photos / "red.png")
    assert second.search(image=query, k=1).hits[0].path == query
    first.close()
    assert second.search(image=query, k=1).hits[0].path == query  # was: the database stopped under it
    assert first.search(image=query, k=1).hits[0].path == query  # a closed pipeline reconnects
    first.close()
    second.close()  # the last one out releases the file: another process can open it
    out = subprocess.run([sys.executable, "-m", "mm_retrieval", "cache", "info", "--db", db, "--json"],
                         capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["items"] == len(COLORS)


def test_cache_info_of_a_missing_collection_is_an_error_naming_those_there_are(tmp_path, photos, capsys):
    db = str(tmp_path / "mmr.db")
    with Pipeline(db=db, collection="holiday", encoder=HashEncoder()) as pipe:
        pipe.index(photos, progress=False)
    capsys.readouterr()
    assert main(["cache", "info", "--db", db, "--collection", "holidays"]) == 2
    captured = capsys.readouterr()
    assert "'holidays' does not exist" in captured.err and "holiday" in captured.err.replace("'holidays'", "")
    assert "0 items" not in captured.out
    assert main(["cache", "info", "--db", db, "--collection", "holiday", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == len(COLORS)


class BrokenEncoder(HashEncoder):
    """The hash encoder whose image forward fails, as a model that runs out of memory does."""

    def encode_pixels(self, pixels, *, with_tokens=False):
        raise RuntimeError("out of memory")


def test_an_index_run_that_fails_leaves_no_new_collection_behind(tmp_path, photos):
    db = str(tmp_path / "mmr.db")
    with Pipeline(db=db, collection="fresh", encoder=BrokenEncoder()) as pipe:
        with pytest.raises(StageError, match="out of memory"):
            pipe.index(photos, progress=False)
        assert not pipe.store.exists()  # was: an empty collection, which later runs took for a real one
        assert not pipe.store.cache_dir().exists()
        with pytest.raises(StageError, match="out of memory"):
            pipe.sync(photos, progress=False)  # a first sync is an index run too
        assert not pipe.store.exists()
    # a collection that was there before a failed run stays, with what it held
    with Pipeline(db=db, collection="kept", encoder=HashEncoder()) as pipe:
        pipe.index(photos, progress=False)
    make_image(photos / "new.png", (10, 20, 30), seed=99)
    with Pipeline(db=db, collection="kept", encoder=BrokenEncoder()) as pipe:
        with pytest.raises(StageError):
            pipe.index(photos, progress=False)
        assert pipe.store.count() == len(COLORS)


class ReversingReranker(Reranker):
    """Scores each hit by minus its first-stage image score: a reranker that reorders everything."""

    def score(self, query, hits):
        return np.array([-h.first_stage_image_score for h in hits])

    def token_writer(self):
        return None


@pytest.fixture
def captioned(tmp_path):
    """A table of the 8 images (5 with captions) in an in-memory collection, with a reranker."""
    rows = [{"path": str(make_image(tmp_path / "img" / f"{n}.png", rgb, seed=i)), "caption": f"a {n} picture" if i < 5 else None}
            for i, (n, rgb) in enumerate(COLORS.items())]
    pd.DataFrame(rows).to_csv(tmp_path / "items.csv", index=False)
    pipe = Pipeline(encoder=HashEncoder(), store=InMemoryStore({"cache_dir": str(tmp_path / "caches")}), reranker=ReversingReranker())
    pipe.index(tmp_path / "items.csv", progress=False)
    return pipe


@pytest.mark.parametrize("mode", ["image", "hybrid"])
def test_hits_a_reranker_scored_carry_its_score(captioned, mode):
    result = captioned.search("a red picture", mode=mode, k=8, rerank=True)
    assert result.reranked and len(result.hits) == 8
    for hit in result.hits:
        assert hit.rerank_score == pytest.approx(-hit.first_stage_image_score)  # was None in image mode
        assert hit.to_dict()["rerank_score"] == hit.rerank_score
    unranked = captioned.search("a red picture", mode=mode, k=8, rerank=False)
    assert all(h.rerank_score is None and "rerank_score" not in h.to_dict() for h in unranked.hits)


def test_the_fused_column_tells_rows_apart(tmp_path, capsys):
    """RRF scores of neighbouring rows differ in the 4th or 5th decimal (1/61 + 1/64 vs 1/62 + 1/63):
    each row whose fused score differs from another's prints differently."""
    rows = [{"path": str(make_image(tmp_path / "img" / f"{n}.png", rgb, seed=i)), "caption": f"a {n} picture"}
            for i, (n, rgb) in enumerate(COLORS.items())]
    rows += [{"path": None, "caption": f"note {i}"} for i in range(8)]
    pd.DataFrame(rows).to_csv(tmp_path / "items.csv", index=False)
    db = str(tmp_path / "mmr.db")
    with Pipeline(db=db, encoder=HashEncoder()) as pipe:
        pipe.index(tmp_path / "items.csv", progress=False)
    (tmp_path / "hash.toml").write_text('[encoder]\nname = "hash"\n')
    args = ["search", "a red picture", "--db", db, "--config", str(tmp_path / "hash.toml"), "--mode", "hybrid", "--k", "16"]
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    scores = [h["score"] for h in json.loads(capsys.readouterr().out)["hits"]]
    assert main(args) == 0
    head, _legend, _columns, *table = capsys.readouterr().out.splitlines()
    assert head.endswith("ordered by fused") and len(table) == len(scores) == 16
    cells = [line.split()[1] for line in table]
    for cell, score in zip(cells, scores):
        decimals = len(cell.split(".")[1])
        assert decimals >= 3 and abs(float(cell) - score) <= 0.5 * 10 ** -decimals + 1e-12, (cell, score)
    distinct = len({round(s, 12) for s in scores})
    assert distinct > len({f"{s:.3f}" for s in scores}), "the test needs scores that 3 decimals can't tell apart"
    assert len(set(cells)) == distinct
    assert all(re.fullmatch(r"-?\d+\.\d+", c) for c in cells)
