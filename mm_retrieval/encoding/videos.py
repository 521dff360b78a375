"""Encoding video files: the video counterpart of :func:`~mm_retrieval.encoding.encode_files`.

Each video is decoded in a DataLoader worker (:class:`~mm_retrieval.video.VideoFileDataset`, one
video per batch, so a worker holds at most one video's sampled frames), its frames are encoded
here in chunks of the encoder's batch size, cut into segments (:func:`~mm_retrieval.video.segment`),
and only the representative frames' tokens are kept. Runs in the indexing process, also when
images go to a Ray cluster: a video's segments must land together, in one write.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..video import Segment, VideoConfig, VideoItem
from .side import ImageEncoding
from .threads import cpu_threads


@dataclass
class EncodedVideo:
    """One video: the worker's item, and when it was decoded, its segments with the
    representative frames' embeddings ``vectors`` [S, D] and ``tokens`` [S, ...] (or None)."""

    item: VideoItem
    segments: list[Segment]
    vectors: np.ndarray | None = None
    tokens: np.ndarray | None = None
    frames: int = 0  # frames sampled


def encode_videos(
    encoding: ImageEncoding,
    paths: list[str],
    cfg: VideoConfig,
    *,
    known_ids: frozenset[str] = frozenset(),
) -> Iterator[EncodedVideo]:
    """Hash, decode, encode and segment each video of ``paths`` (in order of completion is not
    guaranteed; ``item.pos`` says which). ``known_ids``: videos already indexed in full, hashed
    only. The tokens of each representative frame are ``encoding``'s (the encoder's patch tokens,
    or a reranker's image side's, whose transform runs in the workers too), or none."""
    from torch.utils.data import DataLoader

    from ..video import VideoFileDataset, collate_video, segment
    from ..workers import worker_context

    encoder = encoding.encoder
    encoder.warm_up()
    batch_size = encoder.batch_size
    # spawning workers costs seconds: worth it only when there is a next video to decode meanwhile
    workers = min(encoder.workers, len(paths)) if len(paths) > 1 else 0
    dataset = VideoFileDataset(paths, encoding.transform, cfg, known_ids=known_ids)
    loader = DataLoader(dataset, batch_size=1, num_workers=workers, collate_fn=collate_video,
                        prefetch_factor=1 if workers else None,  # a video's frames are large: one ahead per worker
                        multiprocessing_context=worker_context() if workers else None)
    with cpu_threads(encoder, workers):
        for item in loader:
            if item.pixels is None:
                yield EncodedVideo(item, [])
                continue
            first, side = encoding.split(item.pixels)
            item.pixels = None
            embs, toks = [], []
            for start in range(0, len(first), batch_size):
                chunk = first[start : start + batch_size].float()
                emb, tok = encoder.encode_pixels(chunk, with_tokens=encoding.encoder_tokens)
                embs.append(np.asarray(emb, dtype=np.float32))
                if tok is not None:
                    toks.append(np.asarray(tok))
            emb = np.concatenate(embs)
            segs = segment(item.times, emb, cfg, item.duration, item.interval)
            reps = [s.index for s in segs]
            tokens = None
            if side is not None:  # the image side encodes the representative frames only
                tokens = np.concatenate([encoding.encode_tokens(side[reps[i : i + batch_size]].float())
                                         for i in range(0, len(reps), batch_size)])
            elif toks:
                tokens = np.concatenate(toks)[reps]
            yield EncodedVideo(item, segs, vectors=emb[reps], tokens=tokens, frames=len(emb))


def segment_tokens(encoding: ImageEncoding, rows: list[dict[str, Any]], *,
                   max_bytes: int | None = None) -> Iterator[tuple[dict[str, Any], np.ndarray | None, str | None]]:
    """Tokens of indexed video segments, for backfilling a token cache (``mmr cache build``):
    each row (``id``, ``path``, ``frame``, ``content_hash``) gets its representative frame decoded
    again (:func:`~mm_retrieval.video.frame_at`) and encoded: ``encoding``'s tokens (the
    encoder's patch tokens, or its image side's). Yields ``(row, tokens, None)`` or ``(row, None, reason)``; a video whose
    content changed since it was indexed is a reason, not tokens of another picture. Each file is
    hashed once."""
    import torch

    from ..decode import DecodeError
    from ..video import DEFAULT_MAX_VIDEO_BYTES, frame_at, hash_file

    encoding.encoder.warm_up()
    limit = DEFAULT_MAX_VIDEO_BYTES if max_bytes is None else max_bytes
    transform = encoding.token_transform
    batch_size = encoding.encoder.batch_size
    digests: dict[str, str | None] = {}
    pending: list[tuple[dict[str, Any], Any]] = []

    def flush() -> Iterator[tuple[dict[str, Any], np.ndarray | None, str | None]]:
        if not pending:
            return
        toks = encoding.encode_tokens(torch.stack([p for _, p in pending]))
        for (row, _), tok in zip(pending, toks):
            yield row, tok, None
        pending.clear()

    for row in rows:
        path = row["path"]
        try:
            if path not in digests:
                digests[path] = hash_file(path, limit)
            if digests[path] != row.get("content_hash"):
                yield row, None, "file changed since it was indexed; run `mmr index` on its folder first"
                continue
            pending.append((row, transform(frame_at(path, float(row.get("frame") or 0.0)).convert("RGB"))))
        except (DecodeError, OSError) as e:
            yield row, None, str(e) if isinstance(e, DecodeError) else f"cannot read file: {e.strerror or e}"
            continue
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()
