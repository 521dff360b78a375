"""Videos as items: real files written by PyAV here (scenes of the compositional generator's shapes
changing at known times), indexed beside images with the shipped demo encoder into Milvus Lite,
searched, re-indexed, changed, synced, killed mid-video and fed unusable files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mm_retrieval import Pipeline, registry
from mm_retrieval.datasets.compositional import Scene, SceneObject
from mm_retrieval.demo import SHIPPED
from mm_retrieval.errors import InputError
from mm_retrieval.testing.videos import make_audio_only, make_video
from mm_retrieval.tokencache import caches_in, open_existing
from tests.helpers import make_image

O = SceneObject
SCENES = [
    Scene((O("large", "red", "circle"), O("small", "blue", "square")), relation="left of"),
    Scene((O("large", "green", "triangle"), O("small", "yellow", "circle")), relation="above"),
    Scene((O("small", "purple", "square"), O("large", "orange", "triangle")), relation="right of"),
    Scene((O("large", "blue", "circle"), O("small", "red", "triangle")), relation="below"),
]
FIELDS = ("id", "path", "media_id", "segments", "start", "end", "frame")


@pytest.fixture(scope="module")
def encoder():
    """The shipped demo encoder (trained on the compositional shapes), loaded once."""
    enc = registry.create("encoder", "open_clip", {"model": str(SHIPPED / "encoder"), "workers": 0, "batch_size": 16})
    enc.warm_up()
    return enc


def media(root: Path) -> dict[str, list[tuple[float, float]]]:
    """clip.mp4 (20 s, four scenes), other.webm (13 s, two scenes) and two images."""
    truth = {
        "clip.mp4": make_video(root / "clip.mp4", [(SCENES[0], 5), (SCENES[1], 6), (SCENES[2], 4), (SCENES[3], 5)]),
        "other.webm": make_video(root / "sub" / "other.webm", [(SCENES[2], 7), (SCENES[0], 6)], seed=3),
    }
    make_image(root / "red.png", (220, 30, 30))
    make_image(root / "sub" / "blue.png", (30, 60, 220), seed=1)
    return truth


def rows(pipe: Pipeline) -> list[dict]:
    return list(pipe.store.iter_rows(FIELDS))


def token_ids(pipe: Pipeline) -> list[set[str]]:
    return [set(open_existing(p).ids()) for p in caches_in(pipe.store.cache_dir())]


def videos_complete(stored: list[dict]) -> dict[str, int]:
    """video id -> segments stored, checking that each video has all of its segments."""
    by_video: dict[str, list[dict]] = {}
    for r in stored:
        if r["media_id"] != r["id"]:
            by_video.setdefault(r["media_id"], []).append(r)
    for segs in by_video.values():
        assert all(r["segments"] == len(segs) for r in segs), "a video with some of its segments only"
        spans = sorted((r["start"], r["end"]) for r in segs)
        assert spans[0][0] == 0.0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous from 0
    return {v: len(s) for v, s in by_video.items()}


def overlaps(hit, interval) -> bool:
    return hit.start < interval[1] and interval[0] < hit.end


def test_a_scene_query_finds_its_moment_beside_images_and_reindexing_adds_nothing(tmp_path, encoder):
    root = tmp_path / "media"
    truth = media(root)
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder=encoder)
    report = pipe.index(root, progress=False)
    doc = report.to_dict()
    assert doc["failed"] == [] and doc["video"]["videos"] == 2 and doc["video"]["indexed_videos"] == 2
    assert doc["video"]["config"]["max_segments"] == 48 and doc["video"]["config"]["fps"] == 1.0
    stored = rows(pipe)
    counts = videos_complete(stored)
    assert sorted(counts.values()) == [2, 4]  # one segment per scene
    assert doc["indexed"] == len(stored) == 6 + 2 and doc["video"]["segments"] == 6
    assert all(t == {r["id"] for r in stored} for t in token_ids(pipe))  # tokens of every segment

    clip = str(root / "clip.mp4")
    for scene, interval in zip(SCENES, truth["clip.mp4"]):
        hits = pipe.search(scene.caption(), k=4).hits
        best = next(h for h in hits if h.path == clip)
        assert best.video_id is not None and overlaps(best, interval), (scene.caption(), best, interval)
        assert best.start <= best.frame < best.end
    top = pipe.search(SCENES[1].caption(), k=1).hits[0]
    assert top.path == clip and overlaps(top, truth["clip.mp4"][1])  # the only video with this scene, first

    grouped = pipe.search(SCENES[0].caption(), k=10).hits
    flat = pipe.search(SCENES[0].caption(), k=10, group_by_video=False).hits
    assert len({h.video_id for h in grouped if h.video_id}) == sum(h.video_id is not None for h in grouped) == 2
    assert sum(h.video_id is not None for h in flat) == 6 and len(grouped) == 4 and len(flat) == 8

    again = pipe.index(root, progress=False)
    assert (again.indexed, again.unchanged, again.replaced) == (0, 8, 0)
    assert again.video["indexed_videos"] == 0 and rows(pipe) and len(rows(pipe)) == 8


def test_search_json_has_video_fields_and_images_keep_theirs(tmp_path, encoder, capsys):
    from mm_retrieval.cli import main

    root = tmp_path / "media"
    media(root)
    db = str(tmp_path / "mmr.db")
    demo = ["--db", db, "--model", str(SHIPPED / "encoder"), "--json"]
    assert main(["index", str(root), *demo, "--workers", "0", "--no-progress", "--video-max-segments", "3", "--video-fps", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["video"]["config"]["max_segments"] == 3 and report["video"]["config"]["fps"] == 2.0
    assert report["video"]["segments"] == 3 + 2 and report["video"]["frames"] == 2 * (20 + 13)  # the 4-scene clip: 3 at most
    assert main(["search", SCENES[2].caption(), "--k", "10", *demo]) == 0
    doc = json.loads(capsys.readouterr().out)
    videos = [h for h in doc["hits"] if "video" in h]
    images = [h for h in doc["hits"] if "video" not in h]
    assert len(videos) == 2 and len(images) == 2
    for h in videos:
        assert h["video"]["path"] == h["path"] and len(h["video"]["id"]) == 32
        assert 0 <= h["start"] <= h["frame"] < h["end"]
    assert all(set(h) == {"rank", "id", "path", "score", "retrieval_score", "caption", "metadata"} for h in images)
    assert main(["search", SCENES[2].caption(), "--k", "10", "--no-group-by-video", *demo]) == 0
    flat = json.loads(capsys.readouterr().out)["hits"]
    assert sum("video" in h for h in flat) == 5


def test_a_changed_video_replaces_all_its_segments_and_sync_removes_a_deleted_one(tmp_path, encoder):
    root = tmp_path / "media"
    media(root)
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder=encoder)
    pipe.index(root, progress=False)
    before = {r["id"]: r for r in rows(pipe)}
    clip = str(root / "clip.mp4")
    old = {i for i, r in before.items() if r["path"] == clip}

    make_video(root / "clip.mp4", [(SCENES[3], 8), (SCENES[1], 8)], seed=9)  # new content, 2 scenes
    report = pipe.index(root, progress=False)
    assert (report.indexed, report.replaced) == (2, len(old))
    after = rows(pipe)
    new = {r["id"] for r in after if r["path"] == clip}
    assert len(new) == 2 and not new & old and videos_complete(after)
    assert all(t == {r["id"] for r in after} for t in token_ids(pipe))

    (root / "sub" / "other.webm").unlink()
    report = pipe.sync(root, progress=False)
    assert report.removed == 1
    left = rows(pipe)
    assert not any(r["path"].endswith("other.webm") for r in left) and len(left) == len(after) - 2
    assert all(t == {r["id"] for r in left} for t in token_ids(pipe))  # its tokens went too


def test_a_moved_video_keeps_its_segments(tmp_path, encoder):
    root = tmp_path / "media"
    media(root)
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder=encoder)
    pipe.index(root, progress=False)
    ids = {r["id"] for r in rows(pipe) if r["path"].endswith("clip.mp4")}
    (root / "clip.mp4").rename(root / "moved.mp4")
    report = pipe.sync(root, progress=False)
    assert report.moved == 1 and report.indexed == 0
    assert {r["id"] for r in rows(pipe) if r["path"] == str(root / "moved.mp4")} == ids


def test_a_table_row_may_be_a_video_with_caption_and_metadata(tmp_path, encoder):
    root = tmp_path / "media"
    media(root)
    table = root / "items.csv"
    table.write_text("path,caption,year\nclip.mp4,a clip of shapes,2021\nred.png,a red picture,2020\n")
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder=encoder)
    report = pipe.index(table, progress=False)
    assert report.indexed == 4 + 1 and report.video["videos"] == 1
    hits = pipe.search("a clip of shapes", mode="text", k=5).hits
    assert hits[0].video_id is not None and hits[0].caption == "a clip of shapes" and hits[0].metadata["year"] in (2021, "2021")
    assert sum(h.video_id is not None for h in hits) == 1  # its segments share the caption: grouped to one
    hits = pipe.search(SCENES[1].caption(), k=3, filter='metadata["year"] == 2021').hits
    assert [h.path for h in hits] == [str(root / "clip.mp4")] and overlaps(hits[0], (5.0, 11.0))


def test_unusable_videos_are_skipped_with_their_reason_and_nothing_changes(tmp_path, encoder):
    root = tmp_path / "media"
    media(root)
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder=encoder, video={"max_seconds": 60})
    pipe.index(root, progress=False)
    before = sorted(r["id"] for r in rows(pipe))
    bad = root / "bad"
    bad.mkdir()
    mp4 = (root / "clip.mp4").read_bytes()
    webm = (root / "sub" / "other.webm").read_bytes()
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "notes.mkv").write_text("not a video at all\n" * 20)
    (bad / "corrupt.mov").write_bytes(b"\x13\x37" * 200 + mp4[400:])
    (bad / "truncated.mp4").write_bytes(mp4[: len(mp4) // 2])
    (bad / "truncated.webm").write_bytes(webm[: len(webm) // 2])
    make_audio_only(bad / "song.m4v", 1.0)
    make_video(bad / "long.avi", [("red", 61)], fps=1, size=16)
    report = pipe.index(root, progress=False)
    reasons = {Path(f.path).name: f.error for f in report.failed}
    assert reasons.keys() == {"empty.mp4", "notes.mkv", "corrupt.mov", "truncated.mp4", "truncated.webm", "song.m4v", "long.avi"}
    assert "empty file" in reasons["empty.mp4"] and "not a video" in reasons["notes.mkv"]
    assert "not a video" in reasons["corrupt.mov"] and "truncated" in reasons["truncated.mp4"]
    assert "truncated video" in reasons["truncated.webm"] and "no video stream (only audio)" in reasons["song.m4v"]
    assert "video too long: 61 s (limit 60 s" in reasons["long.avi"]
    assert report.indexed == 0 and sorted(r["id"] for r in rows(pipe)) == before


def test_a_collection_from_before_videos_keeps_its_images_and_refuses_videos_clearly(tmp_path, encoder):
    from pymilvus import DataType, MilvusClient

    db = tmp_path / "mmr.db"
    pipe = Pipeline(db=str(db), encoder=encoder, collection="old")
    store = pipe.store
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)  # schema 2, as released
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
    for name in ("vector", "text_vector"):
        schema.add_field(name, DataType.FLOAT_VECTOR, dim=encoder.dim)
    for name in ("has_image", "has_text"):
        schema.add_field(name, DataType.BOOL)
    for name, length in (("path", 4096), ("content_hash", 64), ("caption", 65535)):
        schema.add_field(name, DataType.VARCHAR, max_length=length)
    schema.add_field("metadata", DataType.JSON)
    for name in ("file_size", "mtime_ns"):
        schema.add_field(name, DataType.INT64)
    index = store._milvus.prepare_index_params()
    for name in ("vector", "text_vector"):
        index.add_index(field_name=name, index_type="AUTOINDEX", metric_type="IP")
    props = {"mmr.encoder": json.dumps(encoder.info(), sort_keys=True), "mmr.schema": "2"}
    store._milvus.create_collection("old", schema=schema, index_params=index, consistency_level="Strong", properties=props)
    store._forget()
    assert not store.has_media_fields()

    images = tmp_path / "images"
    make_image(images / "a.png", (200, 10, 10))
    assert pipe.index(images, progress=False).indexed == 1
    assert pipe.search("a large red circle", k=3).hits[0].video_id is None  # grouping asked for: nothing to group

    root = tmp_path / "media"
    media(root)
    with pytest.raises(InputError, match="'old' was created before videos could be indexed.*new --collection"):
        pipe.index(root, progress=False)
    assert pipe.store.count() == 1


# ---- crashes ------------------------------------------------------------------------------------
def _index(folder: Path, db: Path, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MMR_FAILPOINTS", None)
    if failpoint:
        env["MMR_FAILPOINTS"] = failpoint
    return subprocess.run([sys.executable, "-m", "mm_retrieval", "index", str(folder), "--db", str(db), "--model", str(SHIPPED / "encoder"),
                           "--workers", "0", "--json", "--no-progress"], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
# Each run is a fresh `mmr index` process (importing torch dominates its time): CI kills at one
# point (the 2nd video's tokens committed, its rows not yet written); the others are `extended`.
@pytest.mark.parametrize("failpoint", ["after_tokens=2", pytest.param("video_decoded=3", marks=pytest.mark.extended),
                                       pytest.param("after_upsert=2", marks=pytest.mark.extended)])
def test_a_run_killed_mid_video_leaves_none_or_all_of_its_segments_and_a_rerun_completes_it(tmp_path, failpoint):
    root = tmp_path / "media"
    for k in range(3):  # three videos, each with 2-4 scenes
        make_video(root / f"v{k}.mp4", [(SCENES[(k + j) % 4], 3) for j in range(2 + k)], seed=k)
    db = tmp_path / "mmr.db"
    killed = _index(root, db, failpoint)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    with Pipeline(db=str(db)) as pipe:
        stored = rows(pipe) if pipe.store.exists() else []
    done = videos_complete(stored)  # each video: none or all
    assert len(done) < 3
    again = _index(root, db)
    assert again.returncode == 0, again.stderr[-2000:]
    report = json.loads(again.stdout)
    assert report["video"]["indexed_videos"] == 3 - len(done)
    with Pipeline(db=str(db)) as pipe:
        stored = rows(pipe)
        assert sorted(videos_complete(stored).values()) == [2, 3, 4]
        assert all(t == {r["id"] for r in stored} for t in token_ids(pipe))  # tokens of every row, no orphans


@pytest.mark.slow  # loads transformers' BLIP (tiny weights, but the import is seconds)
def test_a_rerankers_own_image_side_caches_each_segments_frame_and_reranks_moments(tmp_path, encoder):
    """With BLIP's vision model as the reranker's image side (a tiny random checkpoint), the workers
    apply both preprocessings to the frames, and each segment's representative frame gets BLIP
    tokens: the reranker then scores video moments as it scores images."""
    from mm_retrieval.testing.blip import make_tiny_blip

    root = tmp_path / "media"
    media(root)
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder=encoder, reranker=str(make_tiny_blip(tmp_path / "blip")))
    report = pipe.index(root, progress=False)
    assert report.indexed == 8 and report.failed == []
    stored = rows(pipe)
    caches = token_ids(pipe)
    assert len(caches) == 1 and caches[0] == {r["id"] for r in stored}
    result = pipe.search(SCENES[1].caption(), k=4, rerank=True)
    assert result.reranked and sum(h.video_id is not None for h in result.hits) == 2
    assert all(h.start < h.end for h in result.hits if h.video_id is not None)


def test_segment_tokens_can_be_rebuilt_from_the_representative_frames(tmp_path, encoder):
    """What `mmr cache build` needs for segments indexed without tokens: the same tokens as the
    index run cached, from the frame at each segment's ``frame`` time."""
    import numpy as np

    from mm_retrieval.encoding import ImageEncoding, segment_tokens

    root = tmp_path / "media"
    media(root)
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder=encoder)
    pipe.index(root, progress=False)
    segs = [r for r in pipe.store.iter_rows(("id", "path", "frame", "content_hash", "media_id")) if r["media_id"] != r["id"]]
    (cache,) = [open_existing(p) for p in caches_in(pipe.store.cache_dir())]
    cached = cache.get([r["id"] for r in segs])
    rebuilt = list(segment_tokens(ImageEncoding(encoder, tokens=True), segs))
    assert len(rebuilt) == len(segs) == 6 and all(err is None for _, _, err in rebuilt)
    for row, tok, _ in rebuilt:
        np.testing.assert_allclose(np.asarray(tok, np.float32), np.asarray(cached[row["id"]], np.float32), atol=2e-2)
    make_video(root / "clip.mp4", [(SCENES[3], 4)], seed=5)  # changed since indexed: refused, not mixed up
    assert {err for row, _, err in segment_tokens(ImageEncoding(encoder, tokens=True), segs) if row["path"].endswith("clip.mp4")} == {
        "file changed since it was indexed; run `mmr index` on its folder first"}


def test_cache_build_and_explain_use_a_segments_representative_frame(tmp_path, encoder):
    """Indexed without tokens, `mmr cache build` (build_token_cache) gives each segment its
    frame's tokens, and `mmr explain` on a segment id draws over that frame, not the video file."""
    from mm_retrieval.backfill import build_token_cache
    from mm_retrieval.explain import attention_maps

    root = tmp_path / "media"
    media(root)
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder=encoder, reranker=str(SHIPPED / "reranker"), cache_tokens=False)
    pipe.index(root, progress=False)
    assert token_ids(pipe) == []
    pipe.cache_tokens = True
    doc = build_token_cache(pipe.encoder, pipe.store, pipe.token_writer(), image_side=pipe.image_side(), progress=False)
    stored = rows(pipe)
    assert doc["failed"] == [] and doc["encoded"] == len(stored) == 8
    assert token_ids(pipe) == [{r["id"] for r in stored}]
    seg = next(r for r in stored if r["media_id"] != r["id"])
    exp = attention_maps(pipe, SCENES[0].caption(), seg["id"])
    assert exp.image_id == seg["id"] and exp.image.size[0] > 0 and exp.maps.size > 0
    hit = next(h for h in pipe.search(SCENES[0].caption(), k=10, group_by_video=False).hits if h.id == seg["id"])
    assert abs(exp.score - hit.score) < 1e-4  # what search scored, from the frame's cached tokens


def test_grouped_search_returns_k_videos_when_a_few_fill_the_top_rows(tmp_path, monkeypatch):
    """Milvus groups a bounded pool of top rows, so with many similar segments per video it can
    return fewer groups than asked; the store then asks again with a larger limit. Checked against
    an exact best-segment-per-video ranking computed here."""
    import numpy as np

    from mm_retrieval.stages.stores.milvus import MilvusStore

    rng = np.random.default_rng(0)
    dim, videos, per, k = 16, 120, 24, 10
    store = MilvusStore({"uri": str(tmp_path / "g.db"), "collection": "g"})
    store.ensure_collection({"stage": "test", "fingerprint": "g", "dim": dim})
    centres = rng.standard_normal((videos, dim)).astype(np.float32)
    vecs = centres[:, None, :] + 0.15 * rng.standard_normal((videos, per, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=2, keepdims=True)
    store.upsert([{"id": format((v + 1) << 40 | s, "032x"), "vector": vecs[v, s], "path": f"/v/{v}.mp4", "media_id": format(v, "032x"),
                   "start": float(s), "end": float(s + 1), "frame": float(s)} for v in range(videos) for s in range(per)])
    store.flush()
    queries = rng.standard_normal((20, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = [[format(int(v), "032x") for v in np.argsort(-(vecs @ q).max(1), kind="stable")[:k]] for q in queries]

    def grouped() -> list[list[str]]:
        return [[h.video_id for h in hits] for hits in store.search(queries, k, group_by_media=True)]

    monkeypatch.setattr(MilvusStore, "GROUP_LIMIT", k)  # no second try: what Milvus alone returns
    alone = grouped()
    monkeypatch.undo()
    found = grouped()
    assert any(len(g) < k for g in alone), "fixture: Milvus' own grouping should fall short here"
    assert found == exact
