"""Searches while an index run writes (two processes, through a Milvus server): they never
fail and never return a hit whose file or tokens are missing."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mm_retrieval import Pipeline
from mm_retrieval.stages.rerankers.cross_attention.checkpoint import save_reranker
from mm_retrieval.stages.rerankers.cross_attention.model import CrossAttentionScorer, RerankerConfig
from tests.helpers import make_image

pytestmark = pytest.mark.slow  # processes against a milvus-lite server

N = 48


def test_search_during_index(tmp_path, milvus_server):
    folder = tmp_path / "imgs"
    for i in range(N):
        make_image(folder / f"{i:03d}.png", ((i * 41) % 256, (i * 13) % 256, (i * 7) % 256), seed=i)
    coll = "concurrency"
    seed = Pipeline(db=milvus_server, collection=coll, encoder={"model": "mmr-tiny", "pretrained": "none", "workers": 0})
    make_image(tmp_path / "first" / "a.png", (5, 5, 5), seed=999)
    seed.index(tmp_path / "first", progress=False)  # the collection exists before the writer starts
    torch.manual_seed(0)
    ck = tmp_path / "rr"
    save_reranker(CrossAttentionScorer(RerankerConfig(text_dim=64, image_dim=64, width=64, heads=2, memory_dim=32)), ck,
                  encoder_fingerprint=seed.encoder.fingerprint)

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    writer = subprocess.Popen(
        [sys.executable, "-m", "mm_retrieval", "index", str(folder), "--db", milvus_server, "--collection", coll,
         "--batch-size", "4", "--workers", "1", "--no-progress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    searcher = Pipeline(db=milvus_server, collection=coll, reranker=str(ck))
    searches, sizes = 0, set()
    deadline = time.monotonic() + 240
    while writer.poll() is None and time.monotonic() < deadline:
        res = searcher.search("a bright picture", k=60, candidates=60)  # reranking needs every hit's tokens
        for h in res.hits:
            assert Path(h.path).exists()
        sizes.add(len(res.hits))
        searches += 1
    out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err[-2000:]
    final = searcher.search("a bright picture", k=60, candidates=60)
    assert len(final.hits) == N + 1
    assert searches >= 3 and len(sizes) >= 2, (searches, sizes)  # we really searched while it grew


def test_second_process_on_a_lite_database_gets_a_clear_message(tmp_path, image_folder):
    db = tmp_path / "mmr.db"
    holder = Pipeline(db=str(db), encoder={"model": "mmr-tiny", "pretrained": "none", "workers": 0})
    holder.index(image_folder, progress=False)
    out = subprocess.run([sys.executable, "-m", "mm_retrieval", "search", "red", "--db", str(db)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1
    assert "open in another process" in out.stderr and "Traceback" not in out.stderr
    holder.close()
