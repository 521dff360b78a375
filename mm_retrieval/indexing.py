"""Index runs: bring a collection in step with a folder or table, crash-safely.

Every write (a batch of images, or one video: a :class:`Write`, landed by :meth:`Indexer.write`,
the one place a run writes rows) is ordered so that a kill at any moment leaves a consistent
collection:

1. tokens are committed to the token cache before their rows are upserted, so a stored row never
   points to missing tokens (a kill in between leaves orphan tokens, removed by the next run);
2. a changed file's new row is written before its old row is deleted, so a kill in between
   leaves the path listed twice, which the next run notices and repairs;
3. only then does the run count and remember what landed (its report says no more than that);
4. ids derive from content, so re-running after a kill re-encodes only what didn't land and
   never duplicates anything.

One index run per collection at a time: a lock file next to the collection's token caches makes a
second run fail at once with a message saying who holds it (:class:`~mm_retrieval.locks.CollectionLock`).
Nothing outlives a killed run holding that lock or the database: decoding workers are not forked
from the run but from a fork server that holds neither, and die with the run (:mod:`mm_retrieval.workers`).

Videos (by extension, :data:`~mm_retrieval.decode.VIDEO_EXTENSIONS`) are items made of several
rows, one per segment (:mod:`mm_retrieval.video`), always decoded and encoded in this process
(also when images go to a Ray cluster). A video's segments are written in one upsert (its tokens
committed before), so a kill leaves none or all of them; each row records the video's segment
count, so a video whose rows are incomplete anyway (a store writing one upsert in several
batches) is redone. A changed video's new segments are written before its old ones are deleted.
Failpoints: ``video_decoded`` (a video decoded and encoded, nothing written yet), then
``after_tokens`` and ``after_upsert`` as for an image batch.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import failpoints
from .decode import is_video
from .encoding import EncodeBatches, ImageEncoding, encode_files
from .errors import InputError
from .locks import CollectionLock
from .media_meta import file_time, merged, same_metadata
from .neardup import PHASH_KEY
from .progress import progress_bar
from .stages.base import Encoder, ImageSide, Source, Store
from .types import Failure, IndexReport, Record
from .video import VideoConfig

if TYPE_CHECKING:
    from .ocr import OcrReader
    from .tokencache import TokenWriter

ROW_FIELDS = ("id", "path", "file_size", "mtime_ns", "caption", "metadata")
MEDIA_ROW_FIELDS = ("media_id", "segments")  # schema-3 collections: which video a row is a segment of
SEGMENT_FIELDS = ("id", "vector", "content_hash", "media_id", "start", "end", "frame", "segments")


class IndexInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) while an index or sync run was encoding and writing: ``report`` says what
    landed by then. What landed stays and is consistent (see the module docstring), so running the
    same command again resumes: it skips what is stored and indexes the rest."""

    def __init__(self, report: IndexReport, collection: str, todo: int):
        super().__init__(report, collection, todo)
        self.report, self.collection, self.todo = report, collection, todo

    def __str__(self) -> str:
        r = self.report
        moved = f", {r.moved} moved" if r.moved else ""
        return (f"interrupted after {r.seconds:.0f}s: {r.indexed} new items landed in collection {self.collection!r}{moved} "
                f"(of {self.todo} new or changed files and texts to read); what landed is kept. Run the same command "
                "again to resume: it skips what is stored and indexes the rest")


@dataclass
class Write:
    """One crash-ordered write of an index run (a batch of images, or one video), landed by
    :meth:`Indexer.write`: ``rows``, new rows, whose ``tokens`` (id -> array) the token cache gets
    first; ``rewrite``, stored items' rows rewritten with their vectors kept (a moved file, a new
    caption or mtime); ``stale``, the stored rows these replace (an older version of a file, or a
    copy left by a crash), deleted once the new ones landed."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    tokens: dict[str, Any] = field(default_factory=dict)
    rewrite: list[dict[str, Any]] = field(default_factory=list)
    stale: set[str] = field(default_factory=set)


@dataclass
class Plan:
    """What a run will do, before any encoding. ``check``: listed paths whose size, mtime, caption
    or metadata differ from the stored row (re-read; replaced only if the content changed)."""

    add: list[Record] = field(default_factory=list)
    check: list[Record] = field(default_factory=list)
    texts: list[Record] = field(default_factory=list)  # new text-only items (table rows without a path)
    remove: dict[str, set[str]] = field(default_factory=dict)  # path -> ids
    unchanged: int = 0
    videos: int = 0  # video files listed

    def to_dict(self) -> dict[str, Any]:
        return {
            "add": [str(r.path) for r in self.add],
            "check": [str(r.path) for r in self.check],
            "remove": sorted(self.remove),
            "add_text": [r.embed_text for r in self.texts],
            "unchanged": self.unchanged,
        }


class Indexer:
    """One run over one source into one store (see :meth:`Pipeline.index` / :meth:`Pipeline.sync`).

    ``tokens``: makes the writer each new image's tokens go to (a reranker's memory or the
    encoder's raw tokens, see :meth:`Pipeline.token_writer`), called once the encoder is loaded and
    the run has something to write (a model that can't load leaves no cache file behind); None
    writes no tokens. ``image_side``: makes the reranker's own image encoder
    (:meth:`Reranker.image_side`, e.g. BLIP's), whose tokens then go to the writer instead of the
    encoder's, computed in the same decode batches (:class:`~mm_retrieval.encoding.ImageEncoding`).
    ``progress``: a bar on stderr (None: on a terminal); ``on_progress(n)``: called after each
    batch with its file count. ``encode_batches``: what reads, decodes and encodes the image files
    to index, with :func:`~mm_retrieval.encoding.encode_files`' signature and output (the default;
    a Ray Dataset of encoder actors with ``--ray``): everything else, all writes included, stays
    here. ``video``: how video files are sampled, bounded and segmented (default
    :class:`VideoConfig`); videos are encoded here by :func:`~mm_retrieval.encoding.encode_videos`.
    ``ocr``: read the text in each new image (and in indexed images without it: a backfill)
    with this reader (:mod:`mm_retrieval.ocr`), here in the run's process after the image is
    encoded; a file it fails on is indexed all the same and listed in ``report.ocr``.
    """

    def __init__(self, encoder: Encoder, store: Store, *, tokens: Callable[[], TokenWriter | None] | None = None,
                 image_side: Callable[[], ImageSide | None] | None = None,
                 progress: bool | None = None, on_progress: Callable[[int], None] | None = None,
                 encode_batches: EncodeBatches = encode_files, video: VideoConfig | None = None, ocr: OcrReader | None = None):
        self.encoder = encoder
        self.ocr = ocr
        self._ocr_stats: dict[str, Any] = {"read": 0, "with_text": 0, "seconds": 0.0, "failed": []}
        self.store = store
        self._make_tokens, self._make_image_side = tokens, image_side
        self.tokens: TokenWriter | None = None  # made by _open_tokens()
        self.encoding = ImageEncoding(encoder)
        self.progress = progress
        self.on_progress = on_progress
        self.encode_batches = encode_batches
        self.video = video if video is not None else VideoConfig()
        # indexed_videos: decoded and written; truncated: of those, cut at max_seconds (no duration known)
        self.video_counts = {"indexed_videos": 0, "segments": 0, "frames": 0, "truncated": 0}

    # ---- reading the collection ------------------------------------------------------------
    def _scan(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.ids_by_path: dict[str, set[str]] = defaultdict(set)
        self.media: dict[str, set[str]] = defaultdict(set)  # video id -> its segments' row ids
        media = self.store.exists() and self.store.has_media_fields()
        for row in self.store.iter_rows(ROW_FIELDS + (MEDIA_ROW_FIELDS if media else ())):
            self.rows[row["id"]] = row
            self.ids_by_path[row["path"]].add(row["id"])
            if row.get("media_id") not in (None, "", row["id"]):
                self.media[row["media_id"]].add(row["id"])

    def _complete(self, media_id: str) -> bool:
        """Whether every segment row of this video is stored (as many as each row says it has)."""
        ids = self.media.get(media_id, ())
        return bool(ids) and all(self.rows[i].get("segments") == len(ids) for i in ids)

    def plan(self, src: Source, report: IndexReport, *, remove_missing: bool, scope: Path | None) -> Plan:
        """Compare the source's records with the collection (read by :meth:`_scan`). Entries the
        source dropped and listed files that can't be read go to ``report.failed``."""
        plan = Plan()
        listed: dict[str, Record] = {}
        for rec in src.records():
            if rec.path is None:  # a text-only item: its id is its text's hash
                if not rec.embed_text:
                    continue
                tid = text_item_id(rec.embed_text)
                if tid in self.rows and _same_text_row(rec, self.rows[tid]):
                    plan.unchanged += 1
                elif tid in self.rows or tid in {text_item_id(t.embed_text) for t in plan.texts}:
                    report.add_duplicate(f"text {rec.embed_text[:80]!r}", f"text item {tid}")
                else:
                    plan.texts.append(rec)
                continue
            path = str(rec.path)
            if path in listed:  # a table may list one image twice: the first row wins
                report.add_duplicate(path, path)
                continue
            reason = _bad_path(path)
            if reason:
                # the name's real bytes, escaped (caf\xe9.png), so the user can find the file;
                # "replace" turned every such name into the same "caf?.png"
                report.failed.append(Failure(os.fsencode(path).decode("utf-8", "backslashreplace"), reason))
                continue
            listed[path] = rec
            ids = self.ids_by_path.get(path, set())
            video = is_video(path)
            plan.videos += video
            if video and ids and self._video_unchanged(rec, ids):
                plan.unchanged += len(ids)  # items: its segments
                continue
            if not video and len(ids) == 1 and _unchanged(rec, self.rows[next(iter(ids))]) and not self._lacks_ocr(ids):
                plan.unchanged += 1
                continue
            reason = _unreadable(path)
            if reason:  # found now, so that a dry run lists it too; an indexed entry stays as it is
                report.failed.append(Failure(path, reason))
            elif not ids:
                plan.add.append(rec)
            else:  # changed, or listed twice after a crash mid-replace
                plan.check.append(rec)
        # only now: a source finds its problems while its records are read
        report.failed[:0] = [Failure(p, e) for p, e in src.problems]
        if remove_missing:
            prefix = str(scope) + os.sep if scope is not None else ""
            plan.remove = {p: ids for p, ids in self.ids_by_path.items() if p not in listed and p.startswith(prefix)}
        return plan

    def _lacks_ocr(self, ids: set[str]) -> bool:
        """With OCR on: whether the item's text was never read (it goes to the run, which reads it)."""
        from .ocr import OCR_KEY

        return self.ocr is not None and OCR_KEY not in (self.rows[next(iter(ids))].get("metadata") or {})

    def _video_unchanged(self, rec: Record, ids: set[str]) -> bool:
        """All of the path's rows are the segments of one video, complete, with the file's size,
        mtime, caption and metadata."""
        rows = [self.rows[i] for i in ids]
        media = {r.get("media_id") for r in rows}
        if len(media) != 1:
            return False
        (m,) = media
        return bool(m) and self._complete(m) and self.media[m] == ids and all(_unchanged(rec, r) for r in rows)

    # ---- the run ---------------------------------------------------------------------------
    def run(self, src: Source, *, remove_missing: bool = False, scope: Path | None = None, dry_run: bool = False) -> IndexReport:
        """Index ``src``; ``remove_missing``: also remove entries under ``scope`` that it no
        longer lists (sync); ``dry_run``: change nothing, return the plan in ``report.plan``."""
        t0 = time.perf_counter()
        encoder, store = self.encoder, self.store
        exists = store.exists()
        if exists:  # before the model is loaded: a wrong --model fails without a download
            store.check_compatible(encoder.info())
        encoder.warm_up()
        if dry_run:
            self._scan()
            report = IndexReport()
            plan = self.plan(src, report, remove_missing=remove_missing, scope=scope)
            forecast = self._forecast(plan.add + plan.check, report)
            moved_from = {m["from"] for m in forecast["moved"]}  # their entries move: not removed
            report.plan = {**plan.to_dict(), **forecast, "remove": [p for p in sorted(plan.remove) if p not in moved_from]}
            self._video_report(plan, report)
            report.seconds = time.perf_counter() - t0
            return report
        report = IndexReport()
        first = None
        if not exists:  # a new collection is created only for a source that yields something
            self.rows, self.ids_by_path = {}, defaultdict(set)
            first = self.plan(src, report, remove_missing=remove_missing, scope=scope)
            if not (first.add or first.check or first.texts):
                self._video_report(first, report)
                report.seconds = time.perf_counter() - t0
                return report
        self._open_tokens()
        store.ensure_collection(encoder.info())
        with CollectionLock(store.cache_dir(), store.name):
            self._scan()  # (a new collection: rows another process wrote meanwhile are recognised by id)
            plan = first if first is not None else self.plan(src, report, remove_missing=remove_missing, scope=scope)
            if not store.has_media_fields() and any(is_video(r.path) for r in plan.add + plan.check):
                raise InputError(
                    f"collection {store.name!r} was created before videos could be indexed (it has no media fields), so the "
                    "videos in this source can't be stored in it: index them into a new --collection (images keep working "
                    "in this one; a source without videos indexes here as before)"
                )
            try:
                self._encode(plan.add + plan.check, report)
                self._encode_texts(plan.texts, report)
            except KeyboardInterrupt:
                report.seconds = time.perf_counter() - t0
                self._ocr_report(report)
                raise IndexInterrupted(report, store.name, len(plan.add) + len(plan.check) + len(plan.texts)) from None
            report.unchanged += plan.unchanged
            if plan.remove:
                # a moved file's entry left its old path's set when it moved: that path is not removed
                report.removed = sum(1 for ids in plan.remove.values() if ids)
                gone = {i for ids in plan.remove.values() for i in ids}
                self._delete(gone)
            self._drop_orphan_tokens()
            store.record_video_fact(any(self.media.values()))  # every row was read: whether a video is left is known here
            store.flush()
        self._video_report(plan, report)
        self._ocr_report(report)
        report.seconds = time.perf_counter() - t0
        return report

    def _open_tokens(self) -> None:
        """The run's token writer, and what each image is encoded into (the image side's tokens,
        or the encoder's, or none): made once, before anything is written."""
        self.tokens = self._make_tokens() if self._make_tokens is not None else None
        side = self._make_image_side() if self.tokens is not None and self._make_image_side is not None else None
        self.encoding = ImageEncoding(self.encoder, tokens=self.tokens is not None, image_side=side)

    def _forecast(self, todo: list[Record], report: IndexReport) -> dict[str, Any]:
        """What a run would make of the files it reads (``todo``: new and changed ones), for a dry
        run: each is read, hashed and decoded by the run's own datasets (decoded and preprocessed,
        never encoded), then sorted by the run's rules, so unreadable files, copies, moves and
        new content come out exactly as the run finds them. Unreadable files go to
        ``report.failed``, copies to ``report``'s duplicates; returns ``add`` (new paths),
        ``replace`` (listed paths whose content changed), ``moved`` ({path, from}) and ``update``
        (same content, new time, caption or metadata: rewritten, counted unchanged)."""
        from .decode import ImageFileDataset
        from .video import VideoFileDataset

        out: dict[str, list[Any]] = {"add": [], "replace": [], "moved": [], "update": []}
        images = [r for r in todo if not is_video(r.path)]
        videos = [r for r in todo if is_video(r.path)]
        decoded = ImageFileDataset([str(r.path) for r in images], self.encoder.image_transform, known_ids=frozenset(self.rows),
                                   max_pixels=self.encoder.max_pixels,
                                   file_metadata=False)
        stored_images = {i: row["path"] for i, row in self.rows.items()}
        self._sort_forecast(images, (decoded[i] for i in range(len(images))), stored_images, report, out)
        if videos:
            complete = frozenset(m for m in self.media if self._complete(m))
            sampled = VideoFileDataset([str(r.path) for r in videos], _no_pixels, self.video, known_ids=complete)
            stored_videos = {m: self.rows[next(iter(self.media[m]))]["path"] for m in complete}
            self._sort_forecast(videos, (sampled[i] for i in range(len(videos))), stored_videos, report, out)
        return out

    def _sort_forecast(self, todo: list[Record], items: Any, stored: dict[str, str], report: IndexReport,
                       out: dict[str, list[Any]]) -> None:
        """The run's rules (:meth:`_encode_images`, :meth:`_known`; their video twins) applied
        to decoded ``items`` of ``todo``; ``stored``: indexed id -> its path."""
        seen: dict[str, str] = {}
        for rec, it in zip(todo, items):
            path = str(rec.path)
            if it.error is not None:
                report.failed.append(Failure(it.path, it.error))
            elif it.id in seen:
                report.add_duplicate(path, seen[it.id])
            elif it.known and stored[it.id] != path and Path(stored[it.id]).exists():
                report.add_duplicate(path, stored[it.id])
            elif it.known:
                if stored[it.id] != path:
                    out["moved"].append({"path": path, "from": stored[it.id]})
                    stored[it.id] = path
                else:
                    out["update"].append(path)
            else:
                out["replace" if self.ids_by_path.get(path) else "add"].append(path)
            if it.error is None:
                seen.setdefault(it.id, path)

    def _video_report(self, plan: Plan, report: IndexReport) -> None:
        """``report.video`` when the source lists videos: the bounds used, and what was done."""
        if plan.videos:
            report.video = {"config": self.video.to_dict(), "videos": plan.videos, **self.video_counts}

    def _encode(self, todo: list[Record], report: IndexReport) -> None:
        bar = progress_bar(len(todo), self.progress)
        try:
            images = [r for r in todo if not is_video(r.path)]
            videos = [r for r in todo if is_video(r.path)]
            if images:
                self._encode_images(images, report, bar)
            if videos:
                self._encode_videos(videos, report, bar)
        finally:
            bar.close()

    def _encode_images(self, todo: list[Record], report: IndexReport, bar: Any) -> None:
        """Each batch of image files: one :class:`Write` of its new rows, the rows of files
        already indexed (moved, or new metadata), and the rows they replace."""
        seen: dict[str, str] = {}  # id -> the first path with that content in this run
        for batch in self.encode_batches(self.encoding, [str(r.path) for r in todo], known_ids=frozenset(self.rows)):
            failpoints.hit("batch_decoded")
            w, refresh = Write(), []
            for it, vector, tokens in batch:
                rec = _with_file_meta(todo[it.pos], it)
                if it.error is not None:  # an unreadable file keeps whatever entry it had
                    report.failed.append(Failure(it.path, it.error))
                    continue
                # whatever else this path held is stale now (its file changed, or a crash left it twice)
                w.stale |= {i for i in self.ids_by_path.get(it.path, ()) if i != it.id and self.rows.get(i, {}).get("path") == it.path}
                if it.id in seen:
                    report.add_duplicate(it.path, seen[it.id])  # the same content twice in this run
                elif it.known:
                    self._known(rec, it.id, refresh, report)
                else:
                    w.rows.append(_row(rec, it, vector))
                    if tokens is not None:
                        w.tokens[it.id] = tokens
                seen.setdefault(it.id, it.path)
            self._read_text(w.rows)
            self._add_text_vectors(w.rows)
            w.rewrite = self._refresh(refresh)
            self.write(w, report)
            bar.update(len(batch))
            if self.on_progress is not None:
                self.on_progress(len(batch))

    def write(self, w: Write, report: IndexReport) -> None:
        """Land ``w`` in the crash order (see the module docstring): (1) its tokens committed,
        (2) its rows upserted (new and rewritten, in one write), (3) the rows they replace deleted
        (rows, then their tokens), (4) what landed counted in ``report`` and remembered by the run.
        A failure (or kill) at a step leaves the steps before it done and none after: orphan
        tokens, or a path listed twice, both repaired by the next run."""
        if self.tokens is not None and w.tokens:
            for item_id, tokens in w.tokens.items():
                self.tokens.add(item_id, tokens)
            self.tokens.commit()  # (1) tokens before rows
        failpoints.hit("after_tokens")
        if w.rows or w.rewrite:
            self.store.upsert(w.rows + w.rewrite)  # (2) a video's segments land together
        report.indexed += len(w.rows)  # counted as soon as they land: a Ctrl-C says so
        failpoints.hit("after_upsert")
        if w.stale:  # (3) old rows after new ones
            self._delete(w.stale)
            report.replaced += len(w.stale)
        for r in w.rows:  # (4)
            self.rows[r["id"]] = r
            self.ids_by_path[r["path"]].add(r["id"])
            if r.get("media_id") not in (None, "", r["id"]):
                self.media[r["media_id"]].add(r["id"])

    def _encode_videos(self, todo: list[Record], report: IndexReport, bar: Any) -> None:
        """Each video: one :class:`Write` of its segments (or, indexed already, their rewritten
        rows) and its stale rows (an older version of the file, or an incomplete set)."""
        from .encoding import encode_videos

        seen: dict[str, str] = {}  # id -> the first path with that content in this run
        known = frozenset(m for m in self.media if self._complete(m))
        for ev in encode_videos(self.encoding, [str(r.path) for r in todo], self.video, known_ids=known):
            failpoints.hit("video_decoded")
            it = ev.item
            rec = _with_file_meta(todo[it.pos], it)
            bar.update(1)
            if self.on_progress is not None:
                self.on_progress(1)
            if it.error is not None:  # an unusable file keeps whatever entries it had
                report.failed.append(Failure(it.path, it.error))
                continue
            if it.id in seen:
                report.add_duplicate(it.path, seen[it.id])
                continue
            seen[it.id] = it.path
            if it.known:
                rewrite = self._known_video(rec, it.id, report)
                if rewrite is None:
                    continue
                w = Write(rewrite=rewrite)
            else:
                rows = self._segment_rows(rec, ev)
                w = Write(rows=rows, tokens={} if ev.tokens is None else {r["id"]: ev.tokens[k] for k, r in enumerate(rows)})
            new_ids = {r["id"] for r in w.rows + w.rewrite}
            w.stale = {i for i in self.ids_by_path.get(it.path, ()) if i not in new_ids and self.rows.get(i, {}).get("path") == it.path}
            self.write(w, report)
            if w.rows:
                self.video_counts["indexed_videos"] += 1
                self.video_counts["segments"] += len(w.rows)
                self.video_counts["frames"] += ev.frames
                self.video_counts["truncated"] += it.truncated

    def _segment_rows(self, rec: Record, ev: Any) -> list[dict[str, Any]]:
        it = ev.item
        size, mtime = _stat(rec.path)
        text = rec.embed_text
        text_vector = self.encoder.encode_text([text])[0] if text else None  # one caption, shared by every segment
        return [{
            "id": seg.id(it.digest), "vector": ev.vectors[k], "text_vector": text_vector, "path": str(rec.path),
            "content_hash": it.digest, "caption": rec.caption, "metadata": rec.metadata, "file_size": size, "mtime_ns": mtime,
            "media_id": it.id, "start": seg.start, "end": seg.end, "frame": seg.frame, "segments": len(ev.segments),
        } for k, seg in enumerate(ev.segments)]

    def _known_video(self, rec: Record, media_id: str, report: IndexReport) -> list[dict[str, Any]] | None:
        """A video whose content is indexed in full: a copy of a file still there (None), or a
        moved file, or the same file with a new mtime/caption/metadata: its segment rows to
        rewrite, vectors kept."""
        ids = set(self.media[media_id])
        path = str(rec.path)
        stored = self.rows[next(iter(ids))]["path"]
        if stored != path and Path(stored).exists():
            report.add_duplicate(path, stored)
            return None
        if stored != path:
            report.moved += 1
        else:
            report.unchanged += len(ids)
        size, mtime = _stat(rec.path)
        text = rec.embed_text
        text_vector = self.encoder.encode_text([text])[0] if text else None
        rows = [{**{k: old[k] for k in SEGMENT_FIELDS}, "text_vector": text_vector, "path": path, "caption": rec.caption,
                 "metadata": rec.metadata, "file_size": size, "mtime_ns": mtime} for old in self.store.get(sorted(ids), SEGMENT_FIELDS)]
        for r in rows:
            self.ids_by_path[stored].discard(r["id"])
            self.ids_by_path[path].add(r["id"])
            self.rows[r["id"]] = {**self.rows[r["id"]], **r}
        return rows

    def _read_text(self, rows: list[dict[str, Any]], stored: dict[str, Any] | None = None) -> None:
        """With OCR on, each image row gets its text under ``metadata["ocr"]``, and where it has
        no caption or text of its own, that text becomes what its text vector embeds (searched
        by meaning like a caption). ``stored``: id -> the text already read (a rewritten row
        keeps it, whether OCR is on or not: it is not read again)."""
        from .ocr import OCR_KEY

        stats = self._ocr_stats
        for r in rows:
            found = (stored or {}).get(r["id"])
            if found is None and self.ocr is not None and r.get("has_image", True):
                t = time.perf_counter()
                result, why = self.ocr.read_file(r["path"], self.encoder.max_pixels)
                stats["seconds"] += time.perf_counter() - t
                if why is not None:
                    stats["failed"].append(Failure(r["path"], why))
                    continue
                found = result.to_metadata()
                stats["read"] += 1
                stats["with_text"] += bool(found["text"])
            if found is not None:
                r["metadata"] = {**(r.get("metadata") or {}), OCR_KEY: found}
                if not r.get("_text") and found["text"]:
                    r["_text"] = found["text"]

    def _ocr_report(self, report: IndexReport) -> None:
        """``report.ocr`` of a run with OCR on (files it failed on are listed there, and indexed)."""
        if self.ocr is not None:
            s = self._ocr_stats
            report.ocr = {"read": s["read"], "with_text": s["with_text"], "seconds": round(s["seconds"], 3),
                          "failed": [{"path": f.path, "error": f.error} for f in s["failed"]]}

    def _add_text_vectors(self, rows: list[dict[str, Any]]) -> None:
        """Rows whose record has text get that text's embedding from the same encoder."""
        pending = [(r, t) for r in rows if (t := r.pop("_text", None))]
        if pending:
            vectors = self.encoder.encode_text([t for _, t in pending])
            for (r, _), vec in zip(pending, vectors):
                r["text_vector"] = vec

    def _encode_texts(self, records: list[Record], report: IndexReport) -> None:
        """Text-only items: a text vector, a zero image vector (never searched: has_image false)."""
        import hashlib

        import numpy as np

        encoder = self.encoder
        for start in range(0, len(records), 256):
            chunk = records[start : start + 256]
            vectors = encoder.encode_text([r.embed_text for r in chunk])
            rows = [{
                "id": text_item_id(r.embed_text), "vector": np.zeros(encoder.dim, np.float32), "text_vector": v, "has_image": False,
                "path": "", "content_hash": hashlib.sha256(r.embed_text.encode()).hexdigest(), "caption": r.caption or r.embed_text,
                "metadata": r.metadata, "file_size": 0, "mtime_ns": 0,
            } for r, v in zip(chunk, vectors)]
            self.store.upsert(rows)
            for row in rows:
                self.rows[row["id"]] = row
            report.indexed += len(rows)

    def _known(self, rec: Record, item_id: str, refresh: list, report: IndexReport) -> None:
        """Content already indexed: a copy of a file that is still there, a moved file, or the
        same file with a new mtime/caption/metadata (row rewritten, vector kept)."""
        path, stored = str(rec.path), self.rows[item_id]["path"]
        if stored != path and Path(stored).exists():
            report.add_duplicate(path, stored)
            return
        if stored != path:
            report.moved += 1
            self.ids_by_path[stored].discard(item_id)
            self.ids_by_path[path].add(item_id)
        else:
            report.unchanged += 1
        self.rows[item_id] = {**self.rows[item_id], "path": path}
        refresh.append((item_id, rec))

    def _refresh(self, refresh: list[tuple[str, Record]]) -> list[dict[str, Any]]:
        """The rows of items indexed already (see :meth:`_known`), rewritten with their stored vectors."""
        if not refresh:
            return []
        store = self.store
        stored = {r["id"]: r for r in store.get([i for i, _ in refresh], fields=["id", "vector", "content_hash", "metadata"])}
        rows = []
        for item_id, rec in refresh:
            old = stored.get(item_id)
            if old is not None:
                size, mtime = _stat(rec.path)
                rows.append({"id": item_id, "vector": old["vector"], "path": str(rec.path), "content_hash": old["content_hash"],
                             "caption": rec.caption, "metadata": _kept_phash(rec.metadata, old.get("metadata")),
                             "file_size": size, "mtime_ns": mtime,
                             "_text": rec.embed_text})
        from .ocr import OCR_KEY

        read = {i: m[OCR_KEY] for i, r in stored.items() if OCR_KEY in (m := r.get("metadata") or {})}
        self._read_text(rows, read)  # the text read before is kept (with OCR on, read now if never read)
        self._add_text_vectors(rows)  # the text may have changed: embed it again (cheap)
        return rows

    def _delete(self, ids: set[str]) -> None:
        """Rows first, then their tokens: a row never points to missing tokens."""
        from .tokencache import purge

        self.store.delete(ids)
        purge(self.store.cache_dir(), ids)
        for i in ids:
            row = self.rows.pop(i, None)
            if row is not None:
                self.ids_by_path[row["path"]].discard(i)
                if row.get("media_id") in self.media:
                    self.media[row["media_id"]].discard(i)

    def _drop_orphan_tokens(self) -> None:
        """Tokens whose row never landed (a kill between the two writes) are removed."""
        from .tokencache import caches_in, open_existing

        for path in caches_in(self.store.cache_dir()):
            cache = open_existing(path)
            cache.keep_only(self.rows)
            cache.close()


def _no_pixels(image: Any) -> Any:
    """A dry run's video frame transform: frames are decoded and sampled, nothing is kept."""
    import torch

    return torch.zeros(1)


def _bad_path(path: str) -> str | None:
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8; rename the file"
    if len(encoded) > 4096:
        return "path longer than 4096 bytes"
    return None


def _unreadable(path: str) -> str | None:
    """Why a listed file can't be read (worded as decoding words it), or None."""
    try:
        os.stat(path)
    except OSError as e:
        return f"cannot read file: {e.strerror or e}"
    if not os.access(path, os.R_OK):
        return "cannot read file: Permission denied"
    return None


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return 0, 0


def _unchanged(rec: Record, row: dict[str, Any]) -> bool:
    """Same size, mtime, caption and metadata as stored (the source's own fields, the rest read
    from the file: a row without ``taken`` predates file metadata and is read once more, so an
    older collection gets it on its next sync): nothing to read or write."""
    size, mtime = _stat(rec.path)
    stored = row.get("metadata") or {}
    return (
        size > 0 and size == row.get("file_size") and mtime == row.get("mtime_ns")
        and (rec.caption or "") == (row.get("caption") or "")
        and "taken" in stored and same_metadata(rec.metadata, stored)
    )


def _with_file_meta(rec: Record, item: Any) -> Record:
    """``rec`` with what its file says about itself (read by the decoding worker, ``item.meta``)
    under its own metadata, which wins; ``taken`` from the file's time when the file has none."""
    if not item.id:  # unreadable: nothing to store
        return rec
    found = dict(getattr(item, "meta", None) or {})
    if "taken" not in found:
        found.update(file_time(_stat(rec.path)[1]))
    return replace(rec, metadata=merged(found, rec.metadata))


def _kept_phash(meta: dict[str, Any], stored: dict[str, Any] | None) -> dict[str, Any]:
    """A rewritten row's metadata keeps its stored perceptual hash (same content, same hash: an
    already indexed file is not decoded again, so its header alone can't give it)."""
    if stored and PHASH_KEY in stored and PHASH_KEY not in (meta or {}):
        return {**(meta or {}), PHASH_KEY: stored[PHASH_KEY]}
    return meta


def _row(rec: Record, it: Any, vector: Any) -> dict[str, Any]:
    size, mtime = _stat(rec.path)
    return {
        "id": it.id, "vector": vector, "path": str(rec.path), "content_hash": it.digest,
        "caption": rec.caption, "metadata": rec.metadata, "file_size": size, "mtime_ns": mtime,
        "_text": rec.embed_text,  # replaced by its text vector before the row is stored
    }


def text_item_id(text: str) -> str:
    """A text-only item's id: hex like image ids (content-derived, so re-indexing is idempotent)."""
    import hashlib

    return hashlib.sha256(b"text\0" + text.encode("utf-8")).hexdigest()[:32]


def _same_text_row(rec: Record, row: dict[str, Any]) -> bool:
    return (rec.caption or rec.text or "") == (row.get("caption") or "") and (rec.metadata or {}) == (row.get("metadata") or {})
