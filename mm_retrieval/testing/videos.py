"""Small real video files for tests and examples, written with PyAV: no data set, no download.

A video is a list of scenes, each shown for a number of seconds; :func:`make_video` returns each
scene's true ``(start, end)`` interval so a test can check that a search for a scene answers a
time range overlapping it. A scene is a compositional :class:`~mm_retrieval.datasets.compositional.Scene`
(shapes on a light background, the same renderer as the compositional image set), a colour name
from :data:`mm_retrieval.testing.images.COLORS`, an ``(r, g, b)`` tuple, or an ``(H, W, 3)`` uint8 array.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

# Codec per container: what headless Chromium plays in <video> (.webm -> VP8) and the common
# choice elsewhere (H.264 in the PyAV wheels via libx264; MPEG-4 part 2 for .avi).
_CODECS = {".webm": "libvpx", ".mp4": "libx264", ".m4v": "libx264", ".mov": "libx264",
           ".mkv": "libx264", ".avi": "mpeg4"}  # fmt: skip


def _codec_for(path: Path, codec: str | None) -> str:
    if codec is not None:
        return codec
    import av

    name = _CODECS.get(path.suffix.lower(), "mpeg4")
    try:
        av.codec.Codec(name, "w")
    except Exception:  # a PyAV build without this encoder: MPEG-4 part 2 is always there
        return "mpeg4"
    return name


def scene_pixels(spec: Any, size: int, seed: int = 0) -> np.ndarray:
    """The ``(size, size, 3)`` uint8 picture of one scene spec (see the module docstring)."""
    if isinstance(spec, np.ndarray):
        if spec.ndim != 3 or spec.shape[2] != 3:
            raise ValueError(f"a pixel scene must be (H, W, 3), got shape {spec.shape}")
        from PIL import Image

        return np.asarray(Image.fromarray(spec.astype(np.uint8)).resize((size, size)), dtype=np.uint8)
    if isinstance(spec, str):
        from mm_retrieval.testing.images import COLORS

        if spec not in COLORS:
            raise ValueError(f"unknown colour {spec!r}; known: {', '.join(COLORS)}")
        spec = COLORS[spec]
    if isinstance(spec, tuple) and len(spec) == 3 and all(isinstance(v, int) for v in spec):
        return np.tile(np.asarray(spec, dtype=np.uint8), (size, size, 1))
    from mm_retrieval.datasets import compositional as comp

    if isinstance(spec, comp.Scene):
        rng = np.random.default_rng(seed)
        return comp.render(comp.layout(spec, size, rng), size, rng)
    raise TypeError(f"a scene is a Scene, a colour name, an (r, g, b) tuple or an array, got {type(spec).__name__}")


def make_video(
    path: str | Path,
    scenes: Sequence[tuple[Any, float]],
    *,
    fps: int = 4,
    size: int = 64,
    codec: str | None = None,
    seed: int = 0,
    metadata: dict[str, str] | None = None,
) -> list[tuple[float, float]]:
    """Write a video of ``scenes`` (``(spec, seconds)`` pairs, shown in order) to ``path``,
    creating its folder. Each frame carries a little seeded noise (like a camera), so frames of
    one scene are near-identical but not equal. The container follows the suffix; the codec is
    VP8 for .webm, H.264 for .mp4/.mov/.mkv/.m4v, MPEG-4 for .avi unless ``codec`` names one.

    ``metadata``: container tags, as a phone writes them (``creation_time``
    ``2024-06-01T12:00:00Z``, ``location`` ``+37.7749-122.4194/``).

    Returns each scene's true ``(start, end)`` in seconds (a scene lasts ``round(seconds * fps)``
    frames, at least one)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size += size % 2  # 4:2:0 chroma needs even sides
    rng = np.random.default_rng(seed)
    intervals: list[tuple[float, float]] = []
    with av.open(str(path), mode="w") as out:
        out.metadata.update(metadata or {})
        stream = out.add_stream(_codec_for(path, codec), rate=Fraction(fps))
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        if stream.codec_context.name == "libx264":
            stream.options = {"preset": "ultrafast", "threads": "1"}  # small, fast, reproducible
        elif stream.codec_context.name in ("libvpx", "libvpx-vp9"):
            stream.options = {"deadline": "realtime", "cpu-used": "8", "threads": "1"}
            stream.bit_rate = 200_000
        n = 0
        for k, (spec, seconds) in enumerate(scenes):
            base = scene_pixels(spec, size, seed=seed * 1000 + k).astype(np.int16)
            frames = max(1, round(seconds * fps))
            intervals.append((n / fps, (n + frames) / fps))
            for _ in range(frames):
                noisy = np.clip(base + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8)
                frame = av.VideoFrame.from_ndarray(noisy, format="rgb24")
                frame.pts = n
                frame.time_base = Fraction(1, fps)
                out.mux(stream.encode(frame))
                n += 1
        out.mux(stream.encode(None))
    return intervals


def make_audio_only(path: str | Path, seconds: float = 1.0, *, rate: int = 8000) -> Path:
    """Write a file with one audio stream (a quiet sine) and no video stream, e.g. ``clip.mp4``
    with AAC, or ``.webm`` with Opus. Returns ``path``."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "libopus" if path.suffix.lower() in (".webm", ".mkv") else "aac"
    if codec == "libopus":
        rate = 48000
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame_size = stream.codec_context.frame_size or 1024
        t = 0
        total = int(seconds * rate)
        while t < total:
            x = (0.1 * np.sin(2 * np.pi * 440 * (np.arange(t, t + frame_size) / rate))).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(x[None, :], format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = t
            out.mux(stream.encode(frame))
            t += frame_size
        out.mux(stream.encode(None))
    return path
