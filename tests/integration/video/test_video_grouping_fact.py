"""Searches group by video (Milvus' grouping search, 2.4x a plain one) only while the collection
holds video segments: a collection fact that index and sync runs keep true, also when sync
removes the last video, and that another process (a fresh store) reads."""

from __future__ import annotations

import pytest

from mm_retrieval import Pipeline
from mm_retrieval.testing.videos import make_video
from tests.helpers import TINY, make_image


@pytest.fixture
def grouped_calls(monkeypatch):
    """Each Milvus search and hybrid search made: whether it asked Milvus to group (a spy: the
    real call still runs)."""
    from pymilvus import MilvusClient

    calls: list[bool] = []
    for name in ("search", "hybrid_search"):
        real = getattr(MilvusClient, name)

        def spy(self, *args, _real=real, **kwargs):
            calls.append("group_by_field" in kwargs)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(MilvusClient, name, spy)
    return calls


def fresh(db: str) -> Pipeline:
    return Pipeline(db=db, encoder={**TINY, "workers": 0})


def test_grouping_only_while_the_collection_holds_videos(tmp_path, grouped_calls):
    root = tmp_path / "media"
    make_image(root / "red.png", (220, 30, 30))
    make_image(root / "blue.png", (30, 60, 220), seed=1)
    db = str(tmp_path / "mmr.db")
    pipe = fresh(db)
    pipe.index(root, progress=False)
    assert pipe.store.holds_video() is False
    pipe.search("a red picture", k=5)
    pipe.search("a red picture", k=5, mode="image")
    assert grouped_calls and not any(grouped_calls)  # images only: never grouped

    make_video(root / "clip.mp4", [("red", 2), ("green", 2), ("blue", 2)])
    pipe.sync(root, progress=False)
    grouped_calls.clear()
    hits = pipe.search("a red picture", k=5, mode="image").hits
    assert grouped_calls and all(grouped_calls)
    assert sum(h.video_id is not None for h in hits) == 1  # the video's best moment only
    pipe.close()
    other = fresh(db)  # another process opening the collection reads the same fact
    grouped_calls.clear()
    other.search("a red picture", k=5, mode="image")
    assert grouped_calls == [True]
    other.close()

    (root / "clip.mp4").unlink()
    pipe = fresh(db)
    report = pipe.sync(root, progress=False)
    assert report.removed == 1
    grouped_calls.clear()
    pipe.search("a red picture", k=5, mode="image")
    assert grouped_calls == [False]  # the last video is gone: plain searches again
    pipe.close()
    other = fresh(db)
    assert other.store.holds_video() is False
    other.close()
