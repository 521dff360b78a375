"""The README's main job, `mmr demo`: the shipped weights fit the demo's data, the --quick run end to end."""

import json
import os
import subprocess
import sys

import pytest

from mm_retrieval.demo import ENCODER_FILES, RERANKER_FILES, SHIPPED


def test_shipped_weights_are_small_and_belong_together():
    """The package ships the encoder and the reranker trained on it (`mmr demo --train --export`)."""
    from mm_retrieval.stages.encoders.open_clip import OpenClipEncoder

    files = [SHIPPED / "encoder" / f for f in ENCODER_FILES] + [SHIPPED / "reranker" / f for f in RERANKER_FILES]
    assert all(f.is_file() for f in files), [str(f) for f in files if not f.is_file()]
    assert sum(f.stat().st_size for f in files) < 10 * 2**20
    meta = json.loads((SHIPPED / "reranker" / "reranker.json").read_text())
    # the reranker was trained on exactly these encoder weights (fingerprint: config + weights digest)
    assert meta["encoder_fingerprint"] == OpenClipEncoder({"model": str(SHIPPED / "encoder")}).fingerprint
    recipe = json.loads((SHIPPED / "recipe.json").read_text())
    assert recipe["made_by"].startswith("mmr demo --train --export")


def run_demo(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mm_retrieval", "demo", *args], capture_output=True, text=True, env=env, timeout=900,
                          check=False)


@pytest.mark.slow  # the whole demo in a subprocess: about a minute
def test_quick_demo_runs_offline_and_says_its_numbers_mean_nothing(tmp_path):
    out = run_demo("--quick", "--dir", str(tmp_path / "demo"), "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout)
    assert doc["n_queries"] > 0 and doc["gallery"] >= 240 and doc["mode"] == "image"
    assert set(doc["first_stage"]) == set(doc["reranked"]) == {"R@1", "R@5", "R@10"}
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert step in out.stderr
    assert "numbers mean nothing" in out.stderr
    # training shows per-epoch progress: loss, and the reranker's validation R@1
    assert "train-encoder: epoch 2/2 loss" in out.stderr and "val R@1" in out.stderr
    # examples: the first held-out queries, in the table's (image) mode, with their scores and ✓ explained
    assert "The first 3 held-out queries of test.csv (no picking), in image mode" in out.stderr and "✓ marks" in out.stderr
    assert out.stderr.count("first stage (cosine):") == 3 and out.stderr.count("reranked (reranker score):") == 3
    assert "--mode image" in out.stderr.split("Try your own queries")[1]
    quick = tmp_path / "demo" / "quick"  # its own models and database: never mixed with the full demo's
    assert (quick / "encoder" / "open_clip_config.json").exists()
    assert (quick / "reranker" / "reranker.json").exists()
    assert json.loads((quick / "eval.json").read_text()) == doc

    # Run again without --json, as the README does: the results go to stdout, the progress to stderr
    # (the full demo, shipped weights, runs in CI as the README's first command). What the first run
    # made is reused: nothing is trained or indexed again.
    again = run_demo("--quick", "--dir", str(tmp_path / "demo"), "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    for reused in ("[1/5] using the images in", "[2/5] using the encoder in", "[3/5] using the reranker in", "indexed 0,"):
        assert reused in again.stderr, reused
    doc = json.loads((quick / "eval.json").read_text())
    r1 = f"first stage {doc['first_stage']['R@1']:6.3f}"
    assert r1 in again.stdout and "reranked " in again.stdout and "Try your own queries" in again.stdout
    gain = doc["reranked"]["R@1"] - doc["first_stage"]["R@1"]
    assert f"gain        {gain:+6.3f}" in again.stdout  # the reranker's measured effect, signed
    assert again.stdout.count("first stage (cosine):") == 3
    assert "[4/5]" in again.stderr and "[4/5]" not in again.stdout
    assert r1 not in again.stderr


def test_older_copies_of_the_shipped_weights_are_replaced_and_a_reranker_trained_here_is_kept(tmp_path):
    """A demo folder from an older package holds copies of older shipped weights: the next run
    copies the package's again. A reranker retrained in the folder is the user's: left alone."""
    from mm_retrieval.demo import SHIPPED_MARK, Layout, _copy_shipped, _refresh_shipped_copies

    models = tmp_path / "models"
    lay = Layout(tmp_path / "data", models / "encoder", models / "reranker", tmp_path / "mmr.db", "demo")
    said: list[str] = []
    _copy_shipped(lay)
    shipped = (SHIPPED / "reranker" / "reranker.json").read_bytes()
    assert json.loads((models / SHIPPED_MARK).read_text())["reranker/reranker.json"]
    _refresh_shipped_copies(lay, said.append)
    assert said == []  # up to date: nothing to do

    (lay.reranker / "reranker.json").write_text("{}")  # changed after the copy: trained here
    _refresh_shipped_copies(lay, said.append)
    assert said == [] and (lay.reranker / "reranker.json").read_text() == "{}"

    (models / SHIPPED_MARK).unlink()  # a folder from before the mark: its copies came from a package
    _refresh_shipped_copies(lay, said.append)
    assert (lay.reranker / "reranker.json").read_bytes() == shipped and "copied them again" in said[0]


def test_a_collection_indexed_for_another_reranker_is_rebuilt(tmp_path, image_folder):
    """A reranker retrained in the demo folder finds the collection holding the old one's image
    memory: the demo rebuilds it (seconds) instead of failing at evaluation."""
    import torch

    from mm_retrieval import Pipeline
    from mm_retrieval.demo import _fresh_collection
    from mm_retrieval.stages.rerankers.cross_attention.checkpoint import save_reranker
    from mm_retrieval.stages.rerankers.cross_attention.model import CrossAttentionScorer, RerankerConfig
    from tests.helpers import TINY

    enc, db = {**TINY, "workers": 0}, str(tmp_path / "mmr.db")
    fp = Pipeline(db=db, encoder=enc).encoder.fingerprint
    for name, seed in (("old", 0), ("new", 1)):
        torch.manual_seed(seed)
        model = CrossAttentionScorer(RerankerConfig(text_dim=64, image_dim=64, width=64, heads=2, memory_dim=32))
        save_reranker(model, tmp_path / name, encoder_fingerprint=fp)
    old = Pipeline(db=db, encoder=enc, reranker=str(tmp_path / "old"))
    old.index(image_folder, progress=False)
    said: list[str] = []
    _fresh_collection(old, said.append)
    assert said == [] and old.store.count() > 0  # its own reranker's memory is there: kept

    new = Pipeline(db=db, encoder=enc, reranker=str(tmp_path / "new"))
    _fresh_collection(new, said.append)
    assert "rebuilding" in said[0] and new.store.count() == 0
    new.index(image_folder, progress=False)
    assert new.search("a purple picture", k=3).reranked  # the new reranker's memory is cached now
