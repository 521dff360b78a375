"""Kill `mmr index` with SIGKILL at chosen points, run it again: every image exactly once,
tokens for every row, no orphan tokens, and work already done is not redone."""

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import make_image
from mm_retrieval import Pipeline
from mm_retrieval.tokencache import caches_in, open_existing

N = 24  # 6 batches of 4
ARGS = ["--model", "mmr-tiny", "--pretrained", "none", "--batch-size", "4", "--workers", "1", "--json", "--no-progress"]


def _index(folder, db, failpoint=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MMR_FAILPOINTS", None)
    if failpoint:
        env["MMR_FAILPOINTS"] = failpoint
    return subprocess.run([sys.executable, "-m", "mm_retrieval", "index", str(folder), "--db", str(db), *ARGS],
                          capture_output=True, text=True, env=env, timeout=300)


def _state(db):
    with Pipeline(db=str(db)) as pipe:  # closed after: Milvus Lite admits one process at a time
        rows = list(pipe.store.iter_rows(("id", "path")))
        caches = [open_existing(p) for p in caches_in(pipe.store.cache_dir())]
    token_ids = [set(c.ids()) for c in caches]
    return rows, token_ids


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    for i in range(N):
        make_image(root / f"{i:03d}.png", (i * 10 % 256, 255 - i * 7, (i * 37) % 256), seed=i)
    return root


@pytest.mark.parametrize("failpoint", ["batch_decoded=3", "mid_tokens=3", "after_tokens=3", "after_upsert=4"])
def test_killed_index_resumes_without_duplicates_or_losses(tmp_path, folder, failpoint):
    db = tmp_path / "mmr.db"
    killed = _index(folder, db, failpoint)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    again = _index(folder, db)
    assert again.returncode == 0, again.stderr[-2000:]
    report = json.loads(again.stdout)
    # only what had not landed is encoded again (2-3 of 6 batches landed before the kill)
    assert 0 < report["indexed"] < N
    assert report["indexed"] + report["unchanged"] == N

    rows, token_ids = _state(db)
    paths = [r["path"] for r in rows]
    assert len(rows) == N and len(set(paths)) == N  # every image exactly once
    assert len(token_ids) == 1 and token_ids[0] == {r["id"] for r in rows}  # tokens for every row, no orphans


def test_killed_while_replacing_changed_files(tmp_path, folder):
    db = tmp_path / "mmr.db"
    assert _index(folder, db).returncode == 0
    for i in range(0, 12, 2):  # change 6 files: two batches of new content
        make_image(folder / f"{i:03d}.png", (1, 2, 3 + i), seed=1000 + i)
    killed = _index(folder, db, "after_upsert=1")  # new rows stored, old ones not yet deleted
    assert killed.returncode == -signal.SIGKILL
    rows, _ = _state(db)
    assert len(rows) > N  # the kill left some paths listed twice...

    again = _index(folder, db)
    assert again.returncode == 0, again.stderr[-2000:]
    rows, token_ids = _state(db)
    assert len(rows) == N and len({r["path"] for r in rows}) == N  # ...which the next run repairs
    assert token_ids[0] == {r["id"] for r in rows}


def test_second_concurrent_writer_is_refused_clearly(tmp_path, folder):
    from mm_retrieval.errors import InputError
    from mm_retrieval.indexing import CollectionLock

    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder={"model": "mmr-tiny", "pretrained": "none", "workers": 0})
    pipe.index(folder, progress=False)
    with CollectionLock(pipe.store.cache_dir(), "images"):
        # another process holds the write lock (flock is per open file, so this models it)
        with pytest.raises(InputError, match="being written by mmr pid"):
            pipe.index(folder, progress=False)
