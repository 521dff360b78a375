"""An index run's crash order (mm_retrieval.indexing): a changed file's tokens are committed, then
its new row upserted, then its old row deleted, then the run counts what landed; a failure at any
step leaves the steps before it done and none after, and the next run repairs what it left. One
write serves images and videos, so both are checked, on the fakes (hash encoder, in-memory store)
with the real token cache."""

from __future__ import annotations

import pytest

from mm_retrieval import Pipeline
from mm_retrieval.indexing import IndexInterrupted
from mm_retrieval.testing.fakes import HashEncoder, InMemoryStore
from mm_retrieval.testing.images import make_image
from mm_retrieval.tokencache import caches_in, open_existing

STEPS = ("tokens", "upsert", "delete")


class Failure(KeyboardInterrupt):
    """What a step raises when it is told to fail: a Ctrl-C, so the run reports what landed."""


class RecordingStore(InMemoryStore):
    """The in-memory store, logging each write; the step named by ``fail`` raises instead."""

    def __init__(self, log: list, cache_dir: str):
        super().__init__({"cache_dir": cache_dir})
        self.log, self.fail = log, None

    def upsert(self, rows):
        if rows and self.fail == "upsert":
            raise Failure
        super().upsert(rows)
        if rows:
            self.log.append(("upsert", {r["id"] for r in rows}))

    def delete(self, ids):
        ids = set(ids)
        if self.fail == "delete":
            raise Failure
        super().delete(ids)
        self.log.append(("delete", ids))


class RecordingWriter:
    """The run's real token writer, logging each commit (``fail == "tokens"``: raises before it)."""

    def __init__(self, inner, store: RecordingStore):
        self.inner, self.store, self.pending = inner, store, set()

    @property
    def cache(self):
        return self.inner.cache

    def add(self, item_id, tokens):
        self.pending.add(item_id)
        self.inner.add(item_id, tokens)

    def commit(self):
        if self.store.fail == "tokens":
            raise Failure
        self.inner.commit()
        self.store.log.append(("tokens", set(self.pending)))
        self.pending = set()


@pytest.fixture
def pipe(tmp_path):
    log: list = []
    store = RecordingStore(log, str(tmp_path / "caches"))
    p = Pipeline(encoder=HashEncoder(), store=store)
    p.token_writer = lambda: RecordingWriter(Pipeline.token_writer(p), store)  # the run's writer, watched
    return p


def stored(pipe) -> dict[str, str]:
    return {r["id"]: r["path"] for r in pipe.store.iter_rows(("id", "path"))}


def cached(pipe) -> set[str]:
    (path,) = caches_in(pipe.store.cache_dir())
    cache = open_existing(path)
    try:
        return set(cache.ids())
    finally:
        cache.close()


def change_and_index(pipe, folder, changed, make_changed, fail):
    """Index ``folder``, change the file ``changed`` (``make_changed`` rewrites it), index again
    with step ``fail`` failing: (old ids of the changed file, the failed run's report, its log)."""
    pipe.index(folder, progress=False)
    before = stored(pipe)
    old = {i for i, p in before.items() if p == str(changed)}
    make_changed()
    pipe.store.log.clear()
    pipe.store.fail = fail
    if fail is None:
        report = pipe.index(folder, progress=False)
    else:
        with pytest.raises(IndexInterrupted) as e:
            pipe.index(folder, progress=False)
        report = e.value.report
    pipe.store.fail = None
    return before, old, report, list(pipe.store.log)


@pytest.mark.parametrize("fail", [None, *STEPS])
def test_a_changed_image_lands_in_crash_order_and_a_failed_step_leaves_what_the_order_promises(tmp_path, pipe, fail):
    folder = tmp_path / "photos"
    a = make_image(folder / "a.png", (200, 30, 30), seed=1)
    make_image(folder / "b.png", (30, 30, 200), seed=2)
    before, old, report, log = change_and_index(pipe, folder, a, lambda: make_image(a, (30, 200, 30), seed=3), fail)
    now = stored(pipe)
    new = set(now) - set(before)
    others = set(before) - old

    if fail is None:
        assert [step for step, _ in log] == ["tokens", "upsert", "delete"]
        assert log == [("tokens", new), ("upsert", new), ("delete", old)] and len(new) == len(old) == 1
        assert (report.indexed, report.replaced) == (1, 1)
        assert set(now) == others | new and cached(pipe) == set(now)
        return
    # the steps before the failed one happened, none after; the report counts only what landed
    assert [step for step, _ in log] == list(STEPS[: STEPS.index(fail)])
    assert report.indexed == (1 if fail == "delete" else 0) and report.replaced == 0
    if fail == "delete":  # the new row landed, the old one stays: the path is listed twice
        assert set(now) == set(before) | new and {now[i] for i in new | old} == {str(a)}
    else:
        assert now == before
    new_tokens = cached(pipe) - set(before)
    assert len(new_tokens) == (0 if fail == "tokens" else 1)  # after "upsert" failed: orphan tokens
    assert cached(pipe) >= set(before)  # no row lost its tokens

    # the next run repairs it: one row for the path, tokens of exactly the stored rows
    again = pipe.index(folder, progress=False)
    now = stored(pipe)
    assert len(now) == 2 and set(now) >= others and not (set(now) & old)
    assert cached(pipe) == set(now)
    assert again.replaced == 1 and again.indexed == (0 if fail == "delete" else 1)


@pytest.mark.parametrize("fail", [None, "upsert", "delete"])
def test_a_changed_video_lands_its_segments_in_one_crash_ordered_write(tmp_path, pipe, fail):
    pytest.importorskip("av")
    from mm_retrieval.testing.videos import make_video

    folder = tmp_path / "media"
    clip = folder / "clip.mp4"
    make_video(clip, [("red", 3), ("blue", 3)])
    make_image(folder / "b.png", (30, 30, 200), seed=2)
    before, old, report, log = change_and_index(
        pipe, folder, clip, lambda: make_video(clip, [("green", 3), ("yellow", 3), ("white", 3)], seed=4), fail)
    now = stored(pipe)
    new = set(now) - set(before)

    if fail is None:
        assert [step for step, _ in log] == ["tokens", "upsert", "delete"]
        assert log[0][1] == log[1][1] == new and log[2][1] == old and len(new) >= 2  # every segment in one write
        assert (report.indexed, report.replaced) == (len(new), len(old))
        assert cached(pipe) == set(now)
        return
    assert [step for step, _ in log] == list(STEPS[: STEPS.index(fail)])
    assert report.indexed == (len(new) if fail == "delete" else 0) and report.replaced == 0
    assert set(now) >= set(before) and (bool(new) == (fail == "delete"))
    again = pipe.index(folder, progress=False)
    now = stored(pipe)
    assert not (set(now) & old) and cached(pipe) == set(now)
    assert again.video["indexed_videos"] == (0 if fail == "delete" else 1)
