"""Video decoding, sampling and segmenting on real files written by PyAV here (no model, no store)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from mm_retrieval.decode import VIDEO_EXTENSIONS, is_video
from mm_retrieval.errors import ConfigError
from mm_retrieval.testing.videos import make_audio_only, make_video
from mm_retrieval.video import (DecodeError, Segment, VideoConfig, VideoFileDataset, hash_file, sample_frames, segment,
                                segment_id)


def pixels(image):
    """A transform that keeps the frame's pixels (what a model's preprocessing would get)."""
    return np.asarray(image)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """One 20 s clip per container (4 fps), scenes red 0-5 s, blue 5-12 s, green 12-20 s."""
    root = tmp_path_factory.mktemp("clips")
    out = {}
    for ext in (".webm", ".mp4", ".avi", ".mkv", ".mov"):
        path = root / f"clip{ext}"
        out[ext] = (path, make_video(path, [("red", 5), ("blue", 7), ("green", 8)], fps=4, size=32))
    return out


def test_make_video_writes_every_container_with_the_true_intervals(clips):
    import av

    for ext, (path, intervals) in clips.items():
        assert intervals == [(0.0, 5.0), (5.0, 12.0), (12.0, 20.0)]
        with av.open(str(path)) as c:
            assert c.streams.video[0].codec_context.name == {".webm": "vp8", ".avi": "mpeg4"}.get(ext, "h264")
            assert sum(1 for _ in c.decode(video=0)) == 80
    assert all(is_video(p) for p, _ in clips.values()) and not is_video("x.png") and ".m4v" in VIDEO_EXTENSIONS


@pytest.mark.parametrize("ext", [".webm", ".mp4", ".avi"])
def test_frames_are_sampled_at_fps_and_show_the_scene_of_their_time(clips, ext):
    path, _ = clips[ext]
    v = sample_frames(path, pixels, VideoConfig(fps=1.0))
    assert v.times == [float(t) for t in range(20)] and v.duration == pytest.approx(20.0) and v.interval == 1.0
    centre = [f[16, 16].astype(int) for f in v.frames]
    red, blue, green = (np.argmax(c) for c in (centre[2], centre[8], centre[15]))
    assert (red, blue, green) == (0, 2, 1)  # dominant channel: the scene at that time
    assert all(np.argmax(c) == 0 for c in centre[:5]) and all(np.argmax(c) == 2 for c in centre[5:12])


def test_a_long_video_is_sampled_sparser_within_the_frame_budget(clips):
    path, _ = clips[".mp4"]
    v = sample_frames(path, pixels, VideoConfig(fps=4.0, max_frames=8))
    assert len(v.frames) <= 8 and v.interval == pytest.approx(2.5) and v.times[0] == 0.0 and v.times[-1] >= 17.0


def test_unknown_duration_is_bounded_by_max_seconds(tmp_path):
    """A raw H.264 stream has no duration and no timestamps: decoded up to max_seconds, no further."""
    import av
    from fractions import Fraction

    path = tmp_path / "raw.mp4"
    with av.open(str(path), "w", format="h264") as out:
        s = out.add_stream("libx264", rate=25)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        for i in range(250):  # 10 s at the stream's nominal 25 fps
            f = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i % 255, np.uint8), format="rgb24")
            f.pts, f.time_base = i, Fraction(1, 25)
            out.mux(s.encode(f))
        out.mux(s.encode(None))
    v = sample_frames(path, pixels, VideoConfig(fps=1.0, max_seconds=3.0))
    assert v.truncated and v.times == [0.0, 1.0, 2.0, 3.0] and v.duration == pytest.approx(4.0)
    v = sample_frames(path, pixels, VideoConfig(fps=25.0, max_frames=10))  # unknown length: the budget still holds
    assert not v.truncated and len(v.frames) <= 10 and v.times[-1] > 8.0


def _bad(tmp_path, clips) -> dict[str, tuple[os.PathLike, str]]:
    """(file, words its reason must contain) for each kind of unusable video."""
    webm, mp4 = clips[".webm"][0].read_bytes(), clips[".mp4"][0].read_bytes()
    files = {
        "empty": (b"", "empty file"),
        "not_a_video": (b"hello, this is text\n" * 50, "not a video"),
        "corrupt": (b"\x00\x11\x22\x33" * 64 + mp4[256:], "not a video"),
        "truncated_mp4": (mp4[: len(mp4) // 2], "corrupt/truncated"),
        "truncated_webm": (webm[: len(webm) // 2], "truncated video"),
    }
    out = {}
    for name, (data, words) in files.items():
        p = tmp_path / f"{name}{'.webm' if 'webm' in name else '.mp4'}"
        p.write_bytes(data)
        out[name] = (p, words)
    out["audio_only"] = (make_audio_only(tmp_path / "audio.mp4", 1.0), "no video stream (only audio)")
    return out


def test_unusable_videos_are_refused_with_their_reason(tmp_path, clips):
    for name, (path, words) in _bad(tmp_path, clips).items():
        with pytest.raises(DecodeError) as e:
            hash_file(path)
            sample_frames(path, pixels, VideoConfig())
        assert words in str(e.value), (name, str(e.value))


def test_enormous_videos_are_refused_before_decoding(clips):
    path, _ = clips[".mp4"]
    with pytest.raises(DecodeError, match=r"video too long: 20 s \(limit 10 s"):
        sample_frames(path, pixels, VideoConfig(max_seconds=10))
    with pytest.raises(DecodeError, match="video file too large"):
        hash_file(path, max_bytes=1000)
    with pytest.raises(DecodeError, match="video frames too large: 32x32"):
        sample_frames(path, pixels, VideoConfig(max_pixels=1000))


def test_a_fifo_named_like_a_video_is_not_read(tmp_path):
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    with pytest.raises(DecodeError, match="not a regular file"):
        hash_file(fifo)


def test_dataset_hashes_streamed_and_skips_decoding_known_videos(tmp_path, clips):
    path, _ = clips[".webm"]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert hash_file(path) == digest
    ds = VideoFileDataset([str(path), str(tmp_path / "missing.mp4")], pixels_tensor, VideoConfig(fps=0.5))
    item = ds[0]
    assert item.id == digest[:32] and item.error is None and tuple(item.pixels.shape) == (10, 3, 8, 8)
    assert str(item.pixels.dtype) == "torch.float16" and item.times[:2] == [0.0, 2.0]
    assert "cannot read file" in ds[1].error
    known = VideoFileDataset([str(path)], pixels_tensor, VideoConfig(), known_ids=frozenset({digest[:32]}))[0]
    assert known.known and known.pixels is None


def pixels_tensor(image):
    import torch

    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)


# ---- segmenting --------------------------------------------------------------------------------
def _emb(labels: list[int], dim: int = 8, noise: float = 0.01, seed: int = 0) -> np.ndarray:
    """Unit vectors: one direction per label, a little noise per frame."""
    rng = np.random.default_rng(seed)
    basis = np.eye(dim, dtype=np.float32)
    e = basis[labels] + noise * rng.standard_normal((len(labels), dim)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_segments_start_where_the_picture_changes():
    labels = [0] * 5 + [1] * 7 + [2] * 8
    times = [float(t) for t in range(20)]
    segs = segment(times, _emb(labels), VideoConfig(), 20.0, 1.0)
    assert [(s.start, s.end) for s in segs] == [(0.0, 5.0), (5.0, 12.0), (12.0, 20.0)]
    assert all(s.start <= s.frame < s.end and labels[s.index] == k for k, s in enumerate(segs))


def test_short_segments_merge_and_max_segments_holds():
    labels = [0] * 5 + [3] + [1] * 6 + [2] * 8  # a one-frame flash at 5 s
    times = [float(t) for t in range(20)]
    segs = segment(times, _emb(labels), VideoConfig(min_segment_seconds=2.0), 20.0, 1.0)
    assert [(s.start, s.end) for s in segs] in ([(0.0, 6.0), (6.0, 12.0), (12.0, 20.0)], [(0.0, 5.0), (5.0, 12.0), (12.0, 20.0)])
    many = [k for k in range(8) for _ in range(3)]  # 8 scenes of 3 s
    segs = segment([float(t) for t in range(24)], _emb(many), VideoConfig(max_segments=3), 24.0, 1.0)
    assert len(segs) == 3 and segs[0].start == 0.0 and segs[-1].end == 24.0
    assert all(a.end == b.start for a, b in zip(segs, segs[1:]))


def test_threshold_is_a_config_value():
    labels = [0] * 10
    e = _emb(labels, noise=0.3, seed=1)  # a moving picture: consecutive cosines well below 1
    times = [float(t) for t in range(10)]
    assert len(segment(times, e, VideoConfig(threshold=-1.0, min_segment_seconds=0), 10.0, 1.0)) == 1
    assert len(segment(times, e, VideoConfig(threshold=0.9999, min_segment_seconds=0), 10.0, 1.0)) == 10


def test_segment_ids_derive_from_content_and_time_range():
    a = Segment(0.0, 5.0, 2.0, 2).id("ab" * 32)
    assert a == segment_id("ab" * 32, 0.0, 5.0) and len(a) == 32
    assert a != Segment(0.0, 5.5, 2.0, 2).id("ab" * 32) != Segment(0.0, 5.0, 2.0, 2).id("cd" * 32)
    assert a == Segment(0.0, 5.0, 3.0, 3).id("ab" * 32)  # the representative frame is not part of the identity


def test_config_rejects_nonsense():
    with pytest.raises(ConfigError, match="must be positive"):
        VideoConfig(fps=0)


@pytest.mark.parametrize("ext", [".webm", ".mp4", ".avi"])
def test_frame_at_shows_the_scene_of_that_time(clips, ext):
    from mm_retrieval.video import frame_at

    path, _ = clips[ext]
    channels = [int(np.argmax(np.asarray(frame_at(path, t))[16, 16])) for t in (0.0, 4.75, 5.0, 8.0, 15.0, 19.75)]
    assert channels == [0, 0, 2, 2, 1, 1]  # red 0-5 s, blue 5-12 s, green 12-20 s
    with pytest.raises(DecodeError):
        frame_at(Path(os.devnull), 1.0)  # a device, not a video file
