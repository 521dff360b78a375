"""Contract tests for stages: what every source, encoder, store and reranker must do.

Each mixin is a set of pytest tests written against one role's abstract base class
(:mod:`mm_retrieval.stages.base`). A plugin author subclasses the mixin in a test module and
provides the fixture it names; every test of the mixin then runs against that stage::

    import pytest
    from mm_retrieval.testing.contracts import StoreContract

    class TestMyStore(StoreContract):
        @pytest.fixture
        def store(self, tmp_path):
            store = MyStore({"path": str(tmp_path / "db")})
            yield store
            store.close()

A test that does not apply to a stage is switched off in the subclass by setting its name to
None (``test_text_mode = None``), with a comment saying why. The built-in stages run these
tests in ``tests/contract/``.

This module needs pytest (it defines fixtures); ``import mm_retrieval.testing`` does not.
"""

from __future__ import annotations

import json
import pickle
from typing import Any

import numpy as np
import pytest

from ..errors import IncompatibleError, InputError
from ..query import Query
from ..types import Hit, Record

__all__ = ["EncoderContract", "RerankerContract", "SourceContract", "StoreContract"]


def _rebuilt(stage: Any) -> Any:
    """A new instance of ``stage``'s class from its JSON form (``to_dict``), not warmed up."""
    params = json.loads(json.dumps(stage.to_dict()))
    params.pop("name", None)
    return type(stage)(params)


def _sorted_desc(scores: list[float]) -> bool:
    return all(a >= b for a, b in zip(scores, scores[1:]))


# ---- sources -----------------------------------------------------------------------------------
class SourceContract:
    """Tests every :class:`~mm_retrieval.stages.base.Source` must pass.

    Fixture to provide: ``source``, a source over some input that yields at least one record.
    """

    def test_yields_records_with_absolute_paths_or_text(self, source):
        records = list(source.records())
        assert records, "the fixture's source should yield at least one record"
        for r in records:
            assert isinstance(r, Record)
            if r.path is None:
                assert r.embed_text, f"a text-only record needs text: {r}"
            else:
                assert r.path.is_absolute(), f"record paths are absolute: {r.path}"
            assert isinstance(r.metadata, dict)
            json.dumps(r.metadata)  # stored as JSON

    def test_runs_are_repeatable_and_problems_do_not_pile_up(self, source):
        first = list(source.records())
        problems = source.problems
        second = list(source.records())
        assert second == first
        assert source.problems == problems

    def test_problems_are_path_reason_pairs(self, source):
        list(source.records())
        for entry in source.problems:
            path, reason = entry
            assert isinstance(path, str) and isinstance(reason, str) and reason

    def test_config_round_trips(self, source):
        assert list(_rebuilt(source).records()) == list(source.records())


# ---- encoders ----------------------------------------------------------------------------------
class EncoderContract:
    """Tests every :class:`~mm_retrieval.stages.base.Encoder` must pass.

    Fixture to provide: ``encoder``, an encoder (warm or not) that runs without a network.
    """

    texts = ["a red square", "a photo of a dog on a beach", "two"]

    @staticmethod
    def images() -> list[Any]:
        """Three distinct PIL images of different sizes."""
        from PIL import Image

        rng = np.random.default_rng(0)
        out = []
        for size, colour in (((64, 48), (220, 30, 30)), ((40, 90), (30, 60, 220)), ((128, 128), (30, 180, 40))):
            px = np.full((size[1], size[0], 3), colour, np.uint8)
            px[rng.integers(0, size[1], 20), rng.integers(0, size[0], 20)] = rng.integers(0, 256, (20, 3))
            out.append(Image.fromarray(px))
        return out

    def pixels(self, encoder) -> Any:
        import torch

        return torch.stack([encoder.image_transform(im) for im in self.images()])

    def test_fingerprint_is_stable_and_needs_no_model(self, encoder):
        fresh = _rebuilt(encoder)
        assert isinstance(fresh.fingerprint, str) and fresh.fingerprint
        assert fresh.fingerprint == encoder.fingerprint
        assert not fresh._warm, "reading the fingerprint must not load the model"

    def test_info_names_fingerprint_and_dim(self, encoder):
        info = encoder.info()
        assert json.loads(json.dumps(info)) == info
        assert info["fingerprint"] == encoder.fingerprint
        assert info["dim"] == encoder.dim and isinstance(encoder.dim, int) and encoder.dim > 0
        assert isinstance(encoder.device, str)

    def test_run_time_settings_are_declared(self, encoder):
        # what index runs read (Encoder.batch_size, workers, index_threads, max_pixels)
        assert isinstance(encoder.batch_size, int) and encoder.batch_size >= 1
        assert isinstance(encoder.workers, int) and encoder.workers >= 0
        assert isinstance(encoder.index_threads, int) and encoder.index_threads >= 0
        assert isinstance(encoder.max_pixels, int) and encoder.max_pixels > 0
        size = encoder.image_size  # the transform's square side, when fixed
        assert size is None or tuple(encoder.image_transform(self.images()[0]).shape[-2:]) == (size, size)
        scale = encoder.logit_scale  # reranker training's starting temperature, when the model has one
        assert scale is None or (isinstance(scale, float) and scale > 0)
        with encoder.autocast():  # the precision its forwards run in (a context manager)
            pass

    def test_text_vectors_are_normalised_and_deterministic(self, encoder):
        a = encoder.encode_text(self.texts)
        assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (len(self.texts), encoder.dim)
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-4)
        np.testing.assert_allclose(encoder.encode_text(self.texts), a, atol=1e-5)
        np.testing.assert_allclose(encoder.encode_text(self.texts[1:2])[0], a[1], atol=1e-4)  # batch-independent
        assert not np.allclose(a[0], a[1], atol=1e-3), "different texts should get different vectors"

    def test_text_tokens_agree_with_text_vectors(self, encoder):
        import torch

        emb, tokens, mask = encoder.encode_text_tokens(self.texts)
        n = len(self.texts)
        assert isinstance(emb, torch.Tensor) and tuple(emb.shape) == (n, encoder.dim)
        np.testing.assert_allclose(emb.float().cpu().numpy(), encoder.encode_text(self.texts), atol=1e-4)
        assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 2 and mask.shape[0] == n
        assert bool(mask.any(1).all()), "every text has at least one real token"
        assert isinstance(tokens, torch.Tensor) and tokens.dim() == 3 and tuple(tokens.shape[:2]) == tuple(mask.shape)
        assert encoder.encode_text_tokens(self.texts, with_tokens=False)[1] is None

    def test_image_transform_is_picklable(self, encoder):
        import torch

        transform = pickle.loads(pickle.dumps(encoder.image_transform))  # it runs in worker processes
        image = self.images()[0]
        assert torch.equal(transform(image), encoder.image_transform(image))

    def test_image_vectors_are_normalised_and_deterministic(self, encoder):
        pixels = self.pixels(encoder)
        emb, tokens = encoder.encode_pixels(pixels)
        assert tokens is None
        assert isinstance(emb, np.ndarray) and emb.dtype == np.float32 and emb.shape == (len(pixels), encoder.dim)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
        np.testing.assert_allclose(encoder.encode_pixels(pixels)[0], emb, atol=1e-5)
        np.testing.assert_allclose(encoder.encode_pixels(pixels[1:2])[0][0], emb[1], atol=1e-4)

    def test_image_tokens(self, encoder):
        pixels = self.pixels(encoder)
        emb, tokens = encoder.encode_pixels(pixels, with_tokens=True)
        np.testing.assert_allclose(emb, encoder.encode_pixels(pixels)[0], atol=1e-3)
        assert tokens.ndim == 3 and tokens.shape[0] == len(pixels) and tokens.dtype == np.float16


# ---- stores ------------------------------------------------------------------------------------
class StoreContract:
    """Tests every :class:`~mm_retrieval.stages.base.Store` must pass.

    Fixture to provide: ``store``, a store over a fresh, empty location (the fixture closes it).
    Rows here have 32-hex ids like indexed items; vectors are random unit vectors of :attr:`dim`.
    """

    dim = 16
    n = 12  # rows from :meth:`rows`: images with text, images without, text-only items

    # ---- data --------------------------------------------------------------------------------
    def encoder_info(self, fingerprint: str = "contract-encoder-a", dim: int | None = None) -> dict[str, Any]:
        return {"stage": "contract", "fingerprint": fingerprint, "dim": self.dim if dim is None else dim}

    def group_filter(self, group: str) -> str:
        """A filter keeping rows whose metadata ``group`` is ``group`` (the store's filter language)."""
        return f'metadata["group"] == "{group}"'

    def filter_cases(self) -> list[tuple[str, Any]]:
        """(filter, which rows of :meth:`rows` it keeps) pairs in the store's filter language: by
        default the ``--filter`` language (Milvus' expressions) that the Store docstring names. A
        store that speaks another returns its own, or [] to skip the test."""
        return [
            ('metadata["i"] >= 3 and metadata["i"] < 6', lambda r: 3 <= r["metadata"]["i"] < 6),
            ('caption like "caption 1%"', lambda r: r["caption"].startswith("caption 1")),
            ('path in ["/contract/img1.png", "/contract/img2.png"] or metadata["group"] == "b"',
             lambda r: r["metadata"]["group"] == "b" or r["i"] in (1, 2)),
            ('not (metadata["i"] < 9)', lambda r: r["metadata"]["i"] >= 9),
        ]

    def rows(self) -> list[dict[str, Any]]:
        """Rows 0-3: image + text; 4-8: image only; 9-11: text only (zero image vector)."""
        rng = np.random.default_rng(7)
        vecs = rng.standard_normal((2 * self.n, self.dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        out = []
        for i in range(self.n):
            text_only = i >= 9
            row = {
                "id": f"{i:02x}" + "c0ffee" * 5, "vector": np.zeros(self.dim, np.float32) if text_only else vecs[i],
                "path": "" if text_only else f"/contract/img{i}.png", "content_hash": f"{i:064x}",
                "caption": f"caption {i}", "metadata": {"group": "ab"[i % 2], "i": i}, "file_size": 100 + i,
                "mtime_ns": 1000 + i, "has_image": not text_only,
            }
            if i < 4 or text_only:
                row["text_vector"] = vecs[self.n + i]
            out.append(row)
        return out

    def filled(self, store) -> list[dict[str, Any]]:
        rows = self.rows()
        store.ensure_collection(self.encoder_info())
        store.upsert(rows)
        store.flush()
        return rows

    # ---- the collection ----------------------------------------------------------------------
    def test_describes_itself(self, store):
        assert isinstance(store.name, str) and store.name
        assert store.metric in ("IP", "COSINE", "L2")
        assert store.cache_dir().name  # a Path
        assert store.local_path is None or store.local_path.is_absolute()  # one process at a time: that file
        assert store.location is None or (isinstance(store.location, str) and store.location)
        assert store.search_options <= {"group_by_media", "min_score"}

    def test_missing_collection_reads_as_empty(self, store):
        assert not store.exists()
        assert store.count() == 0
        assert store.encoder_info() is None
        assert list(store.iter_rows()) == []
        store.check_compatible(self.encoder_info())  # nothing to disagree with
        with pytest.raises(InputError):
            store.require()
        store.drop()  # nothing to drop: no error

    def test_ensure_collection_records_the_encoder(self, store):
        info = self.encoder_info()
        store.ensure_collection(info)
        store.ensure_collection(info)  # idempotent
        assert store.exists() and store.count() == 0
        store.require()
        stored = store.encoder_info()
        assert stored["fingerprint"] == info["fingerprint"] and stored["dim"] == info["dim"]
        assert store.has_text_vectors()

    def test_another_encoder_is_refused(self, store):
        store.ensure_collection(self.encoder_info())
        store.check_compatible(self.encoder_info())
        for other in (self.encoder_info("contract-encoder-b"), self.encoder_info(dim=self.dim * 2)):
            with pytest.raises(IncompatibleError):
                store.check_compatible(other)
            with pytest.raises(IncompatibleError):
                store.ensure_collection(other)

    def test_drop_removes_rows_and_side_data(self, store):
        self.filled(store)
        store.cache_dir().mkdir(parents=True, exist_ok=True)
        (store.cache_dir() / "side.bin").write_bytes(b"x")
        store.drop()
        assert not store.exists() and store.count() == 0
        assert not (store.cache_dir() / "side.bin").exists()

    # ---- writes and reads --------------------------------------------------------------------
    def test_upsert_get_count(self, store):
        rows = self.filled(store)
        assert store.count() == len(rows)
        assert store.count_with_text() == sum("text_vector" in r for r in rows)
        ids = [r["id"] for r in rows]
        got = {r["id"]: r for r in store.get(ids[:5] + ["f" * 32], ["path", "caption", "metadata", "has_image", "file_size"])}
        assert set(got) == set(ids[:5])
        for r in rows[:5]:
            g = got[r["id"]]
            assert (g["path"], g["caption"], g["metadata"], g["has_image"], g["file_size"]) == (
                r["path"], r["caption"], r["metadata"], r["has_image"], r["file_size"])
        assert store.get([], ["path"]) == []

    def test_vectors_round_trip(self, store):
        rows = self.filled(store)
        got = {r["id"]: r for r in store.get([r["id"] for r in rows], ["vector", "has_image"])}
        for r in rows:
            np.testing.assert_allclose(np.asarray(got[r["id"]]["vector"], np.float32), r["vector"], atol=1e-6)

    def test_upsert_replaces_a_row_with_the_same_id(self, store):
        rows = self.filled(store)
        store.upsert([{**rows[0], "path": "/contract/moved.png", "metadata": {"group": "z"}}])
        assert store.count() == len(rows)
        (row,) = store.get([rows[0]["id"]], ["path", "metadata"])
        assert row["path"] == "/contract/moved.png" and row["metadata"] == {"group": "z"}

    def test_delete(self, store):
        rows = self.filled(store)
        gone = [rows[0]["id"], rows[5]["id"]]
        store.delete(gone + ["e" * 32])  # an unknown id is ignored
        assert store.count() == len(rows) - 2
        assert store.get(gone, ["path"]) == []
        hits = store.search(np.stack([rows[0]["vector"], rows[5]["vector"]]), len(rows))
        assert not {h.id for hs in hits for h in hs} & set(gone)

    def test_iter_rows_yields_each_row_once(self, store):
        rows = self.filled(store)
        seen = list(store.iter_rows(("path", "metadata")))
        assert sorted(r["id"] for r in seen) == sorted(r["id"] for r in rows)
        assert all("path" in r and "metadata" in r for r in seen)
        group_a = [r["id"] for r in store.iter_rows(("id",), filter=self.group_filter("a"))]
        assert sorted(group_a) == sorted(r["id"] for r in rows if r["metadata"]["group"] == "a")

    def test_filter_language(self, store):
        rows = self.filled(store)
        for expr, keep in self.filter_cases():
            got = sorted(r["id"] for r in store.iter_rows(("id",), filter=expr))
            assert got == sorted(r["id"] for i, r in enumerate(rows) if keep({**r, "i": i})), expr

    def test_query(self, store):
        rows = self.filled(store)
        got = store.query(self.group_filter("b"), ["id", "path"], 3)
        assert len(got) == 3
        wanted = {r["id"]: r["path"] for r in rows if r["metadata"]["group"] == "b"}
        assert all(g["id"] in wanted and g["path"] == wanted[g["id"]] for g in got)

    def test_close_then_use_again(self, store):
        rows = self.filled(store)
        store.close()
        assert store.count() == len(rows)  # reopens on use
        assert store.search(rows[0]["vector"][None], 1)[0][0].id == rows[0]["id"]

    # ---- search ------------------------------------------------------------------------------
    def test_search_finds_each_item_first_best_first(self, store):
        rows = self.filled(store)
        images = [r for r in rows if r["has_image"]]
        results = store.search(np.stack([r["vector"] for r in images]), 5)
        assert len(results) == len(images)
        for r, hits in zip(images, results):
            assert 1 <= len(hits) <= 5 and all(isinstance(h, Hit) for h in hits)
            assert hits[0].id == r["id"] and hits[0].path == r["path"] and hits[0].metadata == r["metadata"]
            assert _sorted_desc([h.score for h in hits])
            assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
            assert all(h.score == h.retrieval_score and h.has_image for h in hits)

    def test_neighbour_ids_are_the_searchs(self, store):
        rows = self.filled(store)
        q = np.stack([rows[0]["vector"], rows[5]["vector"]])
        for ids, hits in zip(store.neighbour_ids(q, 4), store.search(q, 4)):
            assert [i for i, _ in ids] == [h.id for h in hits]
            assert [s for _, s in ids] == pytest.approx([h.score for h in hits], abs=1e-5)

    def test_min_score_keeps_every_hit_above_it(self, store):
        if "min_score" not in store.search_options:  # the search flow cuts the top hits itself
            return
        rows = self.filled(store)
        q = rows[0]["vector"][None]
        (every,) = store.search(q, len(rows))
        cut = (every[1].score + every[2].score) / 2  # the best two score above it
        (above,) = store.search(q, len(rows), min_score=cut)
        assert [h.id for h in above] == [h.id for h in every[:2]]
        fused = store.hybrid_search(q[0], len(rows), min_score=0.99)
        assert [h.id for h in fused] == [rows[0]["id"]]  # only the item itself is that close (to its image vector)

    def test_image_search_leaves_text_only_items_out(self, store):
        rows = self.filled(store)
        (hits,) = store.search(rows[0]["vector"][None], len(rows))
        assert sorted(h.id for h in hits) == sorted(r["id"] for r in rows if r["has_image"])

    def test_search_filter(self, store):
        rows = self.filled(store)
        (hits,) = store.search(rows[0]["vector"][None], len(rows), self.group_filter("b"))
        assert hits and all(h.metadata["group"] == "b" for h in hits)
        assert sorted(h.id for h in hits) == sorted(r["id"] for r in rows if r["has_image"] and r["metadata"]["group"] == "b")

    def test_a_bad_filter_is_an_input_error(self, store):
        rows = self.filled(store)
        bad = 'metadata["group"] == '  # no right-hand side
        with pytest.raises(InputError):
            store.check_filter(bad)  # the cheap check may pass it on to the search ...
            store.search(rows[0]["vector"][None], 3, bad)  # ... which must not
        store.check_filter(self.group_filter("a"))

    def test_text_mode(self, store):
        rows = self.filled(store)
        texts = [r for r in rows if "text_vector" in r]
        results = store.search(np.stack([r["text_vector"] for r in texts]), len(rows), mode="text")
        for r, hits in zip(texts, results):  # text-only items included, images without text not
            assert hits[0].id == r["id"] and _sorted_desc([h.score for h in hits])
            assert {h.id: h.has_image for h in hits} == {t["id"]: t["has_image"] for t in texts}

    def test_unknown_mode_is_an_input_error(self, store):
        rows = self.filled(store)
        with pytest.raises(InputError):
            store.search(rows[0]["vector"][None], 3, mode="sideways")

    def test_hybrid_search(self, store):
        rows = self.filled(store)
        by_id = {r["id"]: r for r in rows}
        q = rows[0]["vector"]
        hits = store.hybrid_search(q, len(rows))
        assert hits and _sorted_desc([h.score for h in hits])
        assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
        assert {h.id for h in hits} == set(by_id)
        for h in hits:
            r = by_id[h.id]
            assert (h.image_score is not None) == r["has_image"]
            assert (h.text_score is not None) == ("text_vector" in r)
            if h.image_score is not None:
                assert h.image_score == pytest.approx(float(r["vector"] @ q), abs=1e-4)
        images_only = store.hybrid_search(q, len(rows), images_only=True)
        assert {h.id for h in images_only} == {r["id"] for r in rows if r["has_image"]}
        weighted = store.hybrid_search(q, len(rows), ranker="weighted", weights=(1.0, 0.0))
        assert weighted[0].id == rows[0]["id"] and _sorted_desc([h.score for h in weighted])
        filtered = store.hybrid_search(q, len(rows), self.group_filter("a"))
        assert filtered and all(h.metadata["group"] == "a" for h in filtered)
        with pytest.raises(InputError):
            store.hybrid_search(q, 3, ranker="borda")

    # ---- media items (video segments) --------------------------------------------------------
    def segment_rows(self, video: str = "5e" * 16, n: int = 4) -> list[dict[str, Any]]:
        """``n`` segments of one video (one caption, shared), each 5 s, vectors near each other."""
        rng = np.random.default_rng(11)
        base = rng.standard_normal(self.dim).astype(np.float32)
        text = rng.standard_normal(self.dim).astype(np.float32)
        out = []
        for k in range(n):
            v = base + 0.3 * rng.standard_normal(self.dim).astype(np.float32)
            out.append({
                "id": f"{k:02x}" + "5e9" * 10, "vector": v / np.linalg.norm(v), "text_vector": text / np.linalg.norm(text),
                "path": "/contract/clip.mp4", "content_hash": "ab" * 32, "caption": "a clip", "metadata": {"group": "v"},
                "file_size": 5000, "mtime_ns": 7, "media_id": video, "start": 5.0 * k, "end": 5.0 * (k + 1),
                "frame": 5.0 * k + 2.5, "segments": n,
            })
        return out

    def test_segments_carry_their_video_and_times(self, store):
        if not store.has_media_fields():  # a store without media fields must refuse segments clearly
            store.ensure_collection(self.encoder_info())
            with pytest.raises(InputError):
                store.upsert(self.segment_rows())
            return
        self.filled(store)
        segs = self.segment_rows()
        store.upsert(segs)
        store.flush()
        (hits,) = store.search(segs[2]["vector"][None], 30)
        by_id = {h.id: h for h in hits}
        for s in segs:
            h = by_id[s["id"]]
            assert (h.video_id, h.start, h.end, h.frame, h.path) == (s["media_id"], s["start"], s["end"], s["frame"], s["path"])
            doc = h.to_dict()
            assert doc["video"] == {"id": s["media_id"], "path": s["path"]} and doc["start"] == s["start"]
        images = [h for h in hits if h.id not in {s["id"] for s in segs}]
        assert images and all(h.video_id is None and "video" not in h.to_dict() for h in images)
        got = {r["id"]: r for r in store.get([s["id"] for s in segs], ["media_id", "segments"])}
        assert all(got[s["id"]]["media_id"] == s["media_id"] and got[s["id"]]["segments"] == len(segs) for s in segs)

    def test_group_by_media_keeps_each_videos_best_segment(self, store):
        if not store.has_media_fields():
            return
        rows = self.filled(store)
        segs = self.segment_rows()
        store.upsert(segs)
        store.flush()
        q = segs[2]["vector"]
        (flat,) = store.search(q[None], 30)
        (grouped,) = store.search(q[None], 30, group_by_media=True)
        assert sum(h.video_id is not None for h in flat) == len(segs)
        assert [h.id for h in grouped if h.video_id is not None] == [segs[2]["id"]]  # the best one
        assert {h.id for h in grouped if h.video_id is None} == {r["id"] for r in rows if r["has_image"]}
        assert [h.rank for h in grouped] == list(range(1, len(grouped) + 1)) and _sorted_desc([h.score for h in grouped])
        (top,) = store.search(q[None], 2, group_by_media=True)
        assert len(top) == 2 and len({h.video_id or h.id for h in top}) == 2
        fused = store.hybrid_search(q, 30, group_by_media=True)
        assert sum(h.video_id is not None for h in fused) == 1
        text_only = store.search(segs[0]["text_vector"][None], 30, mode="text", group_by_media=True)[0]
        assert sum(h.video_id is not None for h in text_only) == 1  # all segments share the caption


# ---- rerankers ---------------------------------------------------------------------------------
class RerankerContract:
    """Tests every :class:`~mm_retrieval.stages.base.Reranker` must pass.

    Fixtures to provide: ``reranker`` (bound with :meth:`~mm_retrieval.stages.base.Reranker.bind`
    and ready to score), ``hits`` (at least three first-stage hits it can score, best first). The
    ``query`` fixture here builds a :class:`~mm_retrieval.query.Query` on the bound encoder;
    override it to ask something else. Besides scoring, the tests cover what index runs use
    (:meth:`~mm_retrieval.stages.base.Reranker.image_side` and ``token_writer``: the token writer
    takes what an index run feeds it, and may write a few ids of no indexed item to the
    collection's token cache) and ``attention_maps`` (or its ConfigError without ``can_explain``).
    """

    @pytest.fixture
    def query(self, reranker) -> Query:
        q = Query("a purple picture", reranker.encoder)
        if reranker.needs_text_features:
            q.text_features()  # as the search flow does: one forward for both
        return q

    def test_one_finite_score_per_hit(self, reranker, query, hits):
        scores = np.asarray(reranker.score(query, hits))
        assert scores.shape == (len(hits),) and np.isfinite(scores).all()

    def test_scores_are_deterministic_and_per_hit(self, reranker, query, hits):
        scores = np.asarray(reranker.score(query, hits), np.float64)
        np.testing.assert_allclose(reranker.score(query, hits), scores, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(reranker.score(query, list(hits[1:])), scores[1:], rtol=1e-4, atol=1e-4)

    def test_score_batch_matches_score(self, reranker, query, hits):
        out = reranker.score_batch([(query, hits), (query, list(hits[:2])), (query, [])])
        assert len(out) == 3 and len(out[2]) == 0
        np.testing.assert_allclose(out[0], reranker.score(query, hits), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out[1], reranker.score(query, list(hits[:2])), rtol=1e-4, atol=1e-4)

    def test_rerank_sorts_stably_keeps_k_and_renumbers(self, reranker, query, hits):
        scores = np.asarray(reranker.score(query, hits), np.float64)
        k = len(hits) - 1
        out = reranker.rerank(query, hits, k)
        order = np.argsort(-scores, kind="stable")[:k]
        assert [h.id for h in out] == [hits[int(i)].id for i in order]
        assert [h.rank for h in out] == list(range(1, k + 1))
        assert [h.score for h in out] == pytest.approx([float(scores[i]) for i in order], rel=1e-4, abs=1e-4)
        assert [h.rerank_score for h in out] == [h.score for h in out]  # every hit it scored says so
        by_id = {h.id: h for h in hits}
        assert all(h.retrieval_score == by_id[h.id].retrieval_score for h in out)

    def test_rerank_leaves_its_input_alone(self, reranker, query, hits):
        before = [(h.id, h.score, h.rank) for h in hits]
        reranker.rerank(query, hits, len(hits))
        assert [(h.id, h.score, h.rank) for h in hits] == before

    def test_no_hits(self, reranker, query):
        assert reranker.rerank(query, [], 5) == []

    def test_the_query_is_encoded_at_most_once(self, reranker, query, hits):
        reranker.rerank(query, hits, len(hits))
        reranker.score(query, hits)
        assert query.encodes <= 1

    # ---- index time: what it caches per image ----------------------------------------------
    @staticmethod
    def images() -> list[Any]:
        """Two PIL images unlike any indexed one."""
        return EncoderContract.images()[:2]

    def test_image_side(self, reranker):
        side = reranker.image_side()
        if side is None:  # what it caches (if anything) derives from the encoder's patch tokens
            return
        import torch

        p, w = side.shape
        assert isinstance(p, int) and isinstance(w, int) and p > 0 and w > 0
        transform = pickle.loads(pickle.dumps(side.transform))  # it runs in the decoding workers
        image = self.images()[0]
        assert torch.equal(transform(image), side.transform(image))
        tokens = np.asarray(side.encode(torch.stack([side.transform(im) for im in self.images()])), np.float32)
        assert tokens.shape == (2, p, w) and np.isfinite(tokens).all()

    def test_token_writer_takes_what_index_runs_feed_it(self, reranker):
        from ..tokencache import TokenWriter

        writer = reranker.token_writer()
        if writer is None:  # reads nothing from the token cache: index runs keep the encoder's raw patch tokens
            return
        assert isinstance(writer, TokenWriter)
        import torch

        side = reranker.image_side()
        if side is None:  # the encoder's patch tokens, as index runs give them
            pixels = torch.stack([reranker.encoder.image_transform(im) for im in self.images()])
            tokens = reranker.encoder.encode_pixels(pixels, with_tokens=True)[1]
        else:  # its own image side's output
            tokens = np.asarray(side.encode(torch.stack([side.transform(im) for im in self.images()])))
        ids = [f"{i:02x}{'7e57' * 7}00" for i in range(len(tokens))]  # ids of no indexed item
        for item_id, t in zip(ids, tokens):
            writer.add(item_id, t)
        writer.commit()
        assert set(writer.cache.get(ids)) == set(ids)

    def test_attention_maps(self, reranker, query, hits):
        from ..errors import ConfigError
        from ..types import AttentionMaps

        if not reranker.can_explain:
            with pytest.raises(ConfigError):
                reranker.attention_maps(query, hits[0])
            return
        maps = reranker.attention_maps(query, hits[0])
        assert isinstance(maps, AttentionMaps) and np.isfinite(maps.score) and np.isfinite(maps.retrieval_score)
        assert maps.words and all(isinstance(w, str) and w for w in maps.words)
        m = np.asarray(maps.maps)
        assert m.ndim == 5 and m.shape[2] == len(maps.words) and np.isfinite(m).all()  # [layers, heads, words, gh, gw]
        inline = reranker.attention_maps(query, hits[0], image=self.images()[1])  # an image not in the collection
        assert np.asarray(inline.maps).shape[:3] == m.shape[:3] and np.isfinite(inline.score)
