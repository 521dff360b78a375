"""Video files as items: sampled frames, grouped into moments (segments), with PyAV.

A video is indexed as its *moments*, not its frames. :func:`sample_frames` decodes a file by path
(never all of it in memory: frames are decoded one at a time and only the sampled ones kept,
downscaled) at ``fps`` frames per second; a longer video is sampled sparser so that at most
``max_frames`` frames are kept. The frames' embeddings are then cut into segments where the
picture changes (:func:`segment`: the cosine of consecutive frames' embeddings below
``threshold``), and each segment is one item: its representative frame's vector and tokens, its
``start`` / ``end`` seconds, the video's caption and metadata.

Bounds (:class:`VideoConfig`): file bytes, declared duration (``max_seconds``; a stream whose
duration is unknown is decoded up to that many seconds and no further), frames kept, segments
per video, frame pixels. Anything that goes wrong becomes a :class:`~mm_retrieval.decode.DecodeError`
whose message is the reason shown next to the path.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .decode import DecodeError, identify, item_id, portable_transform, read_or_reason
from .errors import ConfigError
from .media_meta import video_meta

DEFAULT_MAX_VIDEO_BYTES = 8 * 1024**3
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class VideoConfig:
    """How videos are sampled, bounded and cut into segments (``mmr index --json`` states it)."""

    fps: float = 1.0  # frames sampled per second of video (before the max_frames budget)
    max_seconds: float = 3 * 3600.0  # longer declared durations are skipped; unknown ones decoded this far only
    max_frames: int = 240  # frames kept per video: a longer video is sampled sparser (1 h at 240 -> one per 15 s)
    max_segments: int = 48  # segments per video: the least distinct neighbours merge beyond this
    threshold: float = 0.9  # cosine of consecutive frames' embeddings below which a new segment starts (measured: notes)
    min_segment_seconds: float = 1.0  # a shorter segment merges into its more similar neighbour
    max_file_bytes: int = DEFAULT_MAX_VIDEO_BYTES
    max_pixels: int = 8192 * 4320  # per frame (8K); larger streams are refused as likely hostile
    frame_side: int = 448  # frames are downscaled to this shorter side before preprocessing (models use <= 384)

    def __post_init__(self) -> None:
        if not (self.fps > 0 and self.max_seconds > 0 and self.max_frames >= 1 and self.max_segments >= 1):
            raise ConfigError(f"video config: fps, max_seconds, max_frames and max_segments must be positive (got {self}); "
                              "e.g. --video-fps 1 --video-max-seconds 10800 --video-max-segments 48")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Segment:
    """One moment of a video: ``[start, end)`` seconds, and the frame that stands for it."""

    start: float
    end: float
    frame: float  # the representative frame's time (s)
    index: int  # the representative frame's position in the sampled frames

    def id(self, video_digest: str) -> str:
        """The segment's item id: from the video's content hash and the time range (contract)."""
        return segment_id(video_digest, self.start, self.end)


def segment_id(video_digest: str, start: float, end: float) -> str:
    return item_id(hashlib.sha256(f"{video_digest}:{start:.3f}-{end:.3f}".encode()).hexdigest())


@dataclass
class SampledVideo:
    """What :func:`sample_frames` kept: the frames' times (s), the preprocessed frames (one
    ``transform`` output each), the duration (declared, else up to the last frame) and the
    interval between samples actually used."""

    times: list[float]
    frames: list[Any]
    duration: float
    interval: float
    truncated: bool = False  # an unknown-length stream was cut at max_seconds
    meta: dict[str, Any] = field(default_factory=dict)  # what the container says (media_meta.video_meta)


def open_regular(path: str | Path, max_bytes: int) -> int:
    """An O_RDONLY descriptor of a regular file of at most ``max_bytes`` (see
    :func:`~mm_retrieval.decode.read_regular_file` for why FIFOs and devices are refused this way)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DecodeError("not a regular file; only video files can be indexed")
        if st.st_size == 0:
            raise DecodeError("empty file (0 bytes)")
        if st.st_size > max_bytes:
            raise DecodeError(f"video file too large: {st.st_size:,} bytes (limit {max_bytes:,}; raise the video max_file_bytes)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def hash_file(path: str | Path, max_bytes: int = DEFAULT_MAX_VIDEO_BYTES) -> str:
    """sha256 hex digest of a file, streamed in 1 MiB chunks (a video never sits in memory)."""
    fd = open_regular(path, max_bytes)
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        read = 0
        while chunk := f.read(_READ_CHUNK):
            read += len(chunk)
            if read > max_bytes:
                raise DecodeError(f"video file too large: more than {max_bytes:,} bytes (limit {max_bytes:,})")
            h.update(chunk)
    return h.hexdigest()


def sample_frames(path: str | Path, transform: Callable[[Any], Any], cfg: VideoConfig) -> SampledVideo:
    """Decode ``path`` and keep one frame per ``1 / fps`` seconds (sparser when the declared
    duration holds more than ``max_frames``; for an unknown duration, every second kept frame is
    dropped whenever the budget fills), each downscaled and passed through ``transform`` (PIL
    image -> tensor). Raises DecodeError for anything that is not a usable video."""
    container = _open_video(path)
    import av  # (present: _open_video checked)

    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        w, h = stream.codec_context.width, stream.codec_context.height
        if w and h and w * h > cfg.max_pixels:
            raise DecodeError(f"video frames too large: {w}x{h} (limit {cfg.max_pixels:,} pixels)")
        declared = _declared_duration(container, stream)
        meta = video_meta(container, stream, declared)
        if declared is not None and declared > cfg.max_seconds:
            raise DecodeError(f"video too long: {declared:.0f} s (limit {cfg.max_seconds:.0f} s; raise the video max_seconds)")
        interval = 1.0 / cfg.fps
        if declared is not None and declared * cfg.fps > cfg.max_frames:
            interval = declared / cfg.max_frames  # sparser, so the budget holds
        origin = None
        times: list[float] = []
        frames: list[Any] = []
        next_t, last_t, truncated, decoded = 0.0, None, False, 0
        # A stream's frame rate bounds how many frames decoding may take; a hostile one that
        # claims 1 fps but packs thousands of frames per second is cut here.
        max_decoded = int(cfg.max_seconds * 240) + 1
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        try:
            for frame in container.decode(stream):
                decoded += 1
                if decoded > max_decoded:
                    truncated = True
                    break
                # no timestamps (a raw elementary stream): the frame's position at the nominal rate
                ft = frame.time if frame.time is not None else (decoded - 1) / rate
                if origin is None:
                    origin = ft  # streams may start at a non-zero timestamp
                t = ft - origin
                if t < 0:
                    continue
                if t > cfg.max_seconds:
                    truncated = True
                    break
                last_t = t
                if t + 1e-6 < next_t:
                    continue
                frames.append(transform(_to_image(frame, cfg.frame_side)))
                times.append(round(t, 3))
                next_t = (math.floor(t / interval + 1e-6) + 1) * interval  # on a grid: no drift
                if len(frames) > cfg.max_frames:  # unknown length: halve the rate, keep the budget
                    frames, times = frames[::2], times[::2]
                    interval *= 2
                    next_t = (math.floor(times[-1] / interval + 1e-6) + 1) * interval
        except av.FFmpegError as e:
            if not frames:
                raise DecodeError(f"corrupt video: {_reason(e)}") from None
            raise DecodeError(f"corrupt or truncated video: decoding failed after {last_t or 0:.1f} s: {_reason(e)}") from None
        if not frames:
            raise DecodeError("no decodable video frames")
        end = (last_t or 0.0) + interval if declared is None else declared
        if declared is not None and last_t is not None and declared > 2.0 and last_t + max(2.0, 0.1 * declared) < declared:
            raise DecodeError(f"truncated video: frames end at {last_t:.1f} s of the {declared:.1f} s it declares")
        return SampledVideo(times=times, frames=frames, duration=float(end), interval=interval, truncated=truncated, meta=meta)


def _open_video(path: str | Path) -> Any:
    """The PyAV container of ``path``, which holds a video stream; DecodeError otherwise."""
    try:
        import av
    except ImportError as e:  # pragma: no cover - av is a core dependency
        raise DecodeError("cannot decode video: PyAV is not installed (pip install av)") from e
    av.logging.set_level(None)  # FFmpeg's own complaints go to our reasons, not stderr
    try:
        container = av.open(str(path), mode="r", metadata_errors="ignore")
    except av.FFmpegError as e:
        raise DecodeError(f"not a video, or corrupt/truncated: {_reason(e)}") from None
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        container.close()
        raise DecodeError(f"no video stream ({'only ' + ', '.join(kinds) if kinds else 'no streams'})")
    return container


def container_meta(path: str | Path) -> dict[str, Any]:
    """What a video's container says (:func:`~mm_retrieval.media_meta.video_meta`), its header
    read without decoding frames; {} when it can't be opened."""
    try:
        container = _open_video(path)
    except Exception:
        return {}
    with container:
        stream = container.streams.video[0]
        return video_meta(container, stream, _declared_duration(container, stream))


def frame_at(path: str | Path, seconds: float, *, side: int | None = None, max_bytes: int = DEFAULT_MAX_VIDEO_BYTES) -> Any:
    """The RGB PIL image of the frame shown at ``seconds`` into the video at ``path`` (a segment's
    ``frame``: what its vector was computed from), shorter side at most ``side`` pixels. Seeks
    to the keyframe before it and decodes forward, so only that stretch is decoded. Raises
    DecodeError for an unusable file or a time past the last frame."""
    import av

    os.close(open_regular(path, max_bytes))  # a regular file of bounded size, as when indexed
    container = _open_video(path)
    with container:
        stream = container.streams.video[0]
        origin = float(stream.start_time * stream.time_base) if stream.start_time is not None and stream.time_base else 0.0
        try:
            if stream.time_base and seconds > 0:
                container.seek(int((origin + seconds) / stream.time_base), stream=stream, backward=True)
            best = None
            for frame in container.decode(stream):
                t = (frame.time - origin) if frame.time is not None else None
                if t is not None and t > seconds + 1e-3 and best is not None:
                    break
                best = frame
                if t is None or abs(t - seconds) <= 1e-3:
                    break
        except av.FFmpegError as e:
            raise DecodeError(f"corrupt video: {_reason(e)}") from None
        if best is None:
            raise DecodeError(f"no frame at {seconds:.2f} s")
        return _to_image(best, side) if side else best.to_image()


def _declared_duration(container: Any, stream: Any) -> float | None:
    """The stream's (else the container's) duration in seconds, or None when unknown/garbage."""
    if stream.duration is not None and stream.time_base is not None:
        d = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        d = container.duration / 1_000_000
    else:
        return None
    return d if np.isfinite(d) and d > 0 else None


def _to_image(frame: Any, side: int) -> Any:
    """A decoded frame as an RGB PIL image, its shorter side at most ``side`` pixels."""
    w, h = frame.width, frame.height
    short = min(w, h)
    if short > side:
        w, h = max(2, round(w * side / short)), max(2, round(h * side / short))
        return frame.reformat(width=w, height=h, format="rgb24").to_image()
    return frame.to_image()


def _reason(e: Exception) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return " ".join(str(text).split())[:200]


def segment(times: list[float], emb: np.ndarray, cfg: VideoConfig, duration: float, interval: float) -> list[Segment]:
    """Cut sampled frames into moments. ``emb`` [N, D] L2-normalised embeddings of the frames at
    ``times``. A new segment starts where consecutive frames' cosine falls below
    ``cfg.threshold``; segments shorter than ``min_segment_seconds`` merge into the more similar
    neighbour; beyond ``max_segments``, the most similar neighbours merge first. Each segment's
    representative frame is the one nearest its mean embedding. The first starts at 0, each ends
    where the next starts, the last at the end of the video (``duration``)."""
    n = len(times)
    if n == 0:
        return []
    emb = np.asarray(emb, dtype=np.float32)
    cos = np.sum(emb[1:] * emb[:-1], axis=1) if n > 1 else np.zeros(0, np.float32)
    starts = [0] + [i + 1 for i in range(n - 1) if cos[i] < cfg.threshold]  # first frame of each segment

    def bounds(k: int) -> tuple[int, int]:
        return starts[k], (starts[k + 1] if k + 1 < len(starts) else n)

    def mean(k: int) -> np.ndarray:
        a, b = bounds(k)
        m = emb[a:b].mean(axis=0)
        return m / (np.linalg.norm(m) or 1.0)

    def seconds(k: int) -> float:
        a, b = bounds(k)
        return (times[b] if b < n else duration) - (times[a] if a else 0.0)

    def merge_weakest(candidates: list[int]) -> None:
        """Remove the boundary (index into starts, >= 1) whose two sides are most alike."""
        best = max(candidates, key=lambda k: float(mean(k - 1) @ mean(k)))
        del starts[best]

    while len(starts) > 1:  # short segments first
        short = [k for k in range(len(starts)) if seconds(k) < cfg.min_segment_seconds]
        if not short:
            break
        k = short[0]
        options = [b for b in (k, k + 1) if 1 <= b < len(starts)]  # the boundary before or after it
        merge_weakest(options)
    while len(starts) > cfg.max_segments:
        merge_weakest(list(range(1, len(starts))))
    out = []
    for k in range(len(starts)):
        a, b = bounds(k)
        m = mean(k)
        rep = a + int(np.argmax(emb[a:b] @ m))
        start = times[a] if k else 0.0
        end = times[b] if b < n else max(duration, times[-1] + min(interval, 1e-3))
        out.append(Segment(start=float(start), end=float(end), frame=float(times[rep]), index=rep))
    return out


# ---- decoding workers -------------------------------------------------------------------------
@dataclass
class VideoItem:
    """One video after a decoding worker looked at it. Exactly one of: ``pixels`` set (the sampled
    frames, stacked [N, ...] float16, or a tuple of such for several transforms), ``known``
    (content already indexed, not decoded), or ``error``."""

    pos: int
    path: str
    id: str = ""  # the video's item id (every segment row's media_id)
    digest: str = ""
    times: list[float] | None = None
    duration: float = 0.0
    interval: float = 0.0
    truncated: bool = False
    pixels: Any = None
    known: bool = False
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # what the container says (media_meta.video_meta)


class _Half:
    """A transform whose tensors are stored as float16: half the memory of the frames a worker
    holds and ships (the encoder gets float32 back)."""

    def __init__(self, transform: Callable[[Any], Any]):
        self.transform = transform

    def __call__(self, image: Any) -> Any:
        out = self.transform(image)
        return tuple(t.half() for t in out) if isinstance(out, tuple) else out.half()


class VideoFileDataset:
    """A map-style dataset over video paths for ``torch.utils.data.DataLoader`` (batch size 1):
    each item is one whole video's sampled frames. ``known_ids``: video ids (content hashes)
    already indexed completely; their files are hashed but not decoded."""

    def __init__(self, paths: list[str], transform: Callable[[Any], Any], cfg: VideoConfig, *,
                 known_ids: frozenset[str] = frozenset()):
        self.paths = paths
        self.transform = _Half(portable_transform(transform))  # workers unpickle no open_clip class (decode.ClipPreprocess)
        self.cfg = cfg
        self.known_ids = known_ids
        self.run_pid = os.getpid()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, pos: int) -> VideoItem:
        from . import failpoints

        path = self.paths[pos]
        item = VideoItem(pos, path)
        digest, item.error = read_or_reason(lambda: hash_file(path, self.cfg.max_file_bytes))
        if item.error is not None:
            return item
        if not identify(item, digest, self.known_ids):
            item.meta = container_meta(path)  # its rows may be rewritten (moved, touched)
            return item
        failpoints.hit("decoding", pid=self.run_pid)
        try:
            sampled = sample_frames(path, self.transform, self.cfg)
        except DecodeError as e:
            item.error = str(e)
            return item
        except Exception as e:  # a transform or FFmpeg oddity must not stop the run
            item.error = f"cannot decode video: {type(e).__name__}: {e}"
            return item
        import torch

        first = sampled.frames[0]
        if isinstance(first, tuple):
            item.pixels = tuple(torch.stack(part) for part in zip(*sampled.frames))
        else:
            item.pixels = torch.stack(sampled.frames)
        item.times, item.duration, item.interval, item.truncated = sampled.times, sampled.duration, sampled.interval, sampled.truncated
        item.meta = sampled.meta
        return item


def collate_video(items: list[VideoItem]) -> VideoItem:
    """The loader's batch is one video (batch size 1)."""
    assert len(items) == 1, "videos are loaded one per batch"
    return items[0]
