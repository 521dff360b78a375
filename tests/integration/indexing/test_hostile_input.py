"""Hostile input through the real pipeline (Milvus Lite, the tiny seeded open_clip model).

Every case gives a clear error or a skip report, and leaves the existing collection intact: each
test compares the rows (ids and paths), the count and the ranked ids and scores of a fixed query
before and after.

Files are checked twice: added next to an indexed good folder and indexed again (one shared
collection per module; each test removes what it added), and all together in a fresh run.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import shutil
import signal
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mm_retrieval import Pipeline
from mm_retrieval.config import MAX_CONFIG_BYTES, PipelineConfig
from mm_retrieval.decode import IMAGE_EXTENSIONS
from mm_retrieval.errors import ConfigError, InputError
from mm_retrieval.query import MAX_QUERY_CHARS
from tests.helpers import COLORS, TINY, make_image

QUERY = "a red square"
K = 200  # more than the collection ever holds: every row is ranked
HYPO = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

# ---- the shared collection ------------------------------------------------------------------


@dataclass
class Snapshot:
    rows: dict[str, str]  # id -> path
    hits: list[tuple[str, float]]  # the fixed query's ranking


def snapshot(pipe: Pipeline) -> Snapshot:
    rows = {r["id"]: r["path"] for r in pipe.store.iter_rows(("id", "path"))}
    hits = [(h.id, h.score) for h in pipe.search(QUERY, k=K).hits]
    return Snapshot(rows, hits)


def assert_intact(pipe: Pipeline, before: Snapshot, added: set[str] = frozenset()) -> Snapshot:
    """The rows of ``before`` are all there, unchanged, plus exactly ``added``; the fixed query
    ranks the old rows in the same order with the same scores."""
    after = snapshot(pipe)
    assert pipe.store.count() == len(before.rows) + len(added)
    assert {i: p for i, p in after.rows.items() if i in before.rows} == before.rows
    assert set(after.rows) - set(before.rows) == set(added)
    kept = [(i, s) for i, s in after.hits if i in before.rows]
    assert [i for i, _ in kept] == [i for i, _ in before.hits]
    assert [s for _, s in kept] == pytest.approx([s for _, s in before.hits], abs=1e-5)
    return after


@dataclass
class Library:
    pipe: Pipeline
    root: Path  # the indexed folder: good/ plus whatever a test adds
    good: Path
    base: Snapshot
    counter: itertools.count


@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> Library:
    base = tmp_path_factory.mktemp("hostile").resolve()
    root = base / "library"
    for i, (name, rgb) in enumerate(COLORS.items()):
        make_image(root / "good" / f"{name}.png", rgb, seed=i)
    pipe = Pipeline(db=str(base / "mmr.db"), encoder={**TINY, "workers": 0, "batch_size": 8})
    report = pipe.index(root, progress=False)
    assert (report.indexed, report.skipped) == (len(COLORS), 0)
    snap = snapshot(pipe)
    assert len(snap.rows) == len(COLORS) and len(snap.hits) == len(COLORS)
    yield Library(pipe, root, root / "good", snap, itertools.count())
    pipe.close()


def _reset(lib: Library, case: Path) -> None:
    """Remove a case's files and any rows it added: the next test starts from the good folder."""
    shutil.rmtree(case, ignore_errors=True)
    extra = {r["id"] for r in lib.pipe.store.iter_rows(("id",))} - set(lib.base.rows)
    if extra:
        lib.pipe.store.delete(extra)
    assert_intact(lib.pipe, lib.base)


@pytest.fixture
def case_dir(lib: Library):
    d = lib.root / f"case{next(lib.counter)}"
    d.mkdir()
    yield d
    _reset(lib, d)


class Hung(BaseException):
    """Not an OSError (TimeoutError is one, and a read error is caught and reported as a skip)."""


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a FIFO read blocks forever); index runs in this thread (workers=0)."""

    def on_alarm(signum, frame):
        raise Hung(f"still going after {seconds}s: it hangs on a file")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---- hostile files: builders ----------------------------------------------------------------
# A builder writes files into a folder and returns what each must give:
#   name -> ("indexed", None) | ("skipped", regex the reason must match) | ("absent", None)
# ("absent": neither a row nor a failure, e.g. a directory named x.jpg). Names are bytes paths
# relative to the folder, so that non-UTF-8 names can be expected too.

UNDECODABLE = r"truncated|corrupt|not an image|cannot decode|empty"
Expect = dict[bytes, tuple[str, str | None]]


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _pattern(size=(64, 48), seed=0) -> Image.Image:
    """A busy, asymmetric RGB image (orientation and frames make a difference to it)."""
    rng = np.random.default_rng(seed)
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :]
    a[: size[1] // 3, :, 2] = 255  # a blue band at the top
    a[..., 1] = rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8) // 4
    return Image.fromarray(a, "RGB")


def _write(d: Path, name: str | bytes, data: bytes) -> bytes:
    raw = name if isinstance(name, bytes) else name.encode()
    with open(os.path.join(os.fsencode(d), raw), "wb") as f:
        f.write(data)
    return raw


def build_truncated(d: Path) -> Expect:
    out: Expect = {}
    im = _pattern()
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("GIF", "gif")):
        data = _encoded(im, fmt)
        for cut in (1, 8, len(data) // 4, len(data) // 2, 3 * len(data) // 4, 9 * len(data) // 10):
            out[_write(d, f"{ext}-cut{cut}.{ext}", data[:cut])] = ("skipped", UNDECODABLE)
    return out


def _png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header (valid CRCs) claiming width x height, with almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


_BIG_PNG: list[bytes] = []


def _big_png() -> bytes:
    if not _BIG_PNG:  # 120 MP, compresses to ~115 KB; made once
        _BIG_PNG.append(_encoded(Image.new("L", (12000, 10000)), "PNG"))
    return _BIG_PNG[0]


def build_bombs(d: Path) -> Expect:
    gif = b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00" + b",\x00\x00\x00\x00" + struct.pack("<HH", 65535, 65535) + b"\x00\x02\x02D\x01\x00;"
    return {
        _write(d, "claims-100k.png", _png_claiming(100_000, 100_000)): ("skipped", r"too large"),
        _write(d, "real-12000x10000.png", _big_png()): ("skipped", r"too large"),
        _write(d, "claims-65535.gif", gif): ("skipped", r"too large|corrupt|truncated|not an image"),
    }


# exif_transpose applies, for each orientation, this transform to the stored pixels; a file for
# orientation o therefore stores the inverse of it applied to the upright picture.
_INVERSE = {
    1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270,
}


def _with_orientation(upright: Image.Image, o: int, fmt: str) -> bytes:
    stored = upright if _INVERSE[o] is None else upright.transpose(_INVERSE[o])
    exif = Image.Exif()
    exif[0x0112] = o
    return _encoded(stored, fmt, exif=exif)


def build_exif(d: Path) -> Expect:
    out: Expect = {}
    upright = _pattern((48, 32), seed=3)
    for o in range(1, 9):
        out[_write(d, f"orient{o}.jpg", _with_orientation(upright, o, "JPEG"))] = ("indexed", None)
        out[_write(d, f"orient{o}.png", _with_orientation(upright, o, "PNG"))] = ("indexed", None)
    return out


def _frames(fmt: str) -> bytes:
    frames = [Image.new("RGB", (40, 30), c) for c in ((230, 20, 20), (20, 230, 20), (20, 20, 230))]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    return _encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)


def build_modes(d: Path) -> Expect:
    im = _pattern(seed=5)
    grey = np.asarray(im.convert("L"))
    palette = im.convert("P")
    files = {
        "cmyk.jpg": _encoded(im.convert("CMYK"), "JPEG"),
        "grey16.png": _encoded(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"),  # mode I;16
        "palette.png": _encoded(palette, "PNG"),
        "palette-transparent.png": _encoded(palette, "PNG", transparency=0),
        "palette-transparent.gif": _encoded(palette, "GIF", transparency=0),
        "rgba.png": _encoded(im.convert("RGBA"), "PNG"),
        "rgba.webp": _encoded(im.convert("RGBA"), "WEBP", lossless=True),
        "la.png": _encoded(im.convert("LA"), "PNG"),
        "bilevel.png": _encoded(im.convert("1"), "PNG"),
        "grey.bmp": _encoded(im.convert("L"), "BMP"),
        "float.tif": _encoded(Image.fromarray(grey.astype(np.float32) * 10), "TIFF"),  # mode F
        "animated.gif": _frames("GIF"),
        "animated.webp": _frames("WEBP"),
    }
    return {_write(d, n, data): ("indexed", None) for n, data in files.items()}


def build_junk(d: Path) -> Expect:
    return {
        _write(d, "zero.png", b""): ("skipped", r"empty"),
        _write(d, "text.jpg", b"hello, I am not a jpeg\n" * 10): ("skipped", r"not an image"),
        _write(d, "html.webp", b"<html><body>404</body></html>"): ("skipped", r"not an image"),
        _write(d, "png-magic-only.png", b"\x89PNG\r\n\x1a\n"): ("skipped", UNDECODABLE),
        _write(d, "jpeg-soi-only.jpeg", b"\xff\xd8\xff"): ("skipped", UNDECODABLE),
    }


def build_special(d: Path) -> Expect:
    """Directories, symlinks and a FIFO that look like images."""
    (d / "x.jpg").mkdir()  # a directory named like an image: walked into, nothing to index
    (d / "sub").mkdir()
    os.symlink("..", d / "sub" / "up")  # a loop: sub/up -> its parent; the walk must end
    os.symlink("self.png", d / "self.png")  # a file symlink to itself
    os.symlink("nowhere.png", d / "dangling.png")
    os.mkfifo(d / "pipe.png")  # reading it would block until a writer comes: must not hang
    make_image(d / "sub" / "inner.png", (12, 200, 120), seed=77)  # reachable once, not through the loop
    out: Expect = {
        b"x.jpg": ("absent", None),
        b"sub/up": ("absent", None),
        b"sub/inner.png": ("indexed", None),
        b"self.png": ("skipped", r"cannot read.*(symbolic links|loop)"),
        b"dangling.png": ("skipped", r"cannot read.*No such file"),
        b"pipe.png": ("skipped", r"not a regular file \(FIFO\)"),
    }
    if os.path.exists("/dev/null"):  # a device (/dev/zero, which never ends, is checked in a subprocess)
        os.symlink("/dev/null", d / "null-device.png")
        out[b"null-device.png"] = ("skipped", r"not a regular file \(device\)")
    return out


def build_names(d: Path) -> Expect:
    """Odd file names: non-UTF-8 bytes are refused with a reason; long and unicode names index."""
    long_ascii = "a" * 251 + ".png"  # 255 bytes: the usual file name limit
    long_utf8 = "é" * 125 + ".png"  # 254 bytes, 129 characters
    spaced = "with space/日本語 é ü 🐶 ‏rtl‏ name.png"
    make_image(d / long_ascii, (200, 100, 10), seed=61)
    make_image(d / long_utf8, (10, 100, 200), seed=62)
    make_image(d / spaced, (150, 150, 30), seed=63)
    assert len(long_ascii.encode()) == 255 and len(long_utf8.encode()) == 254
    latin1 = _write(d, b"caf\xe9.png", _encoded(_pattern(seed=64), "PNG"))
    invalid = _write(d, b"bad-\xff\xfe-bytes.jpg", _encoded(_pattern(seed=65), "JPEG"))
    return {
        long_ascii.encode(): ("indexed", None),
        long_utf8.encode(): ("indexed", None),
        spaced.encode(): ("indexed", None),
        latin1: ("skipped", r"not valid UTF-8"),
        invalid: ("skipped", r"not valid UTF-8"),
    }


BUILDERS: dict[str, Callable[[Path], Expect]] = {
    "truncated": build_truncated, "bombs": build_bombs, "exif": build_exif, "modes": build_modes,
    "junk": build_junk, "special": build_special, "names": build_names,
}


def _report_path(d: Path, name: bytes) -> str:
    """How a report names a file: its path, non-UTF-8 bytes escaped (caf\\xe9.png)."""
    return os.path.join(os.fsencode(d), name).decode("utf-8", "backslashreplace")


def check_outcomes(pipe: Pipeline, report, d: Path, expect: Expect) -> set[str]:
    """Every expected outcome holds; returns the ids of the rows the case added."""
    failed = {f.path: f.error for f in report.failed}
    rows = {r["path"]: r["id"] for r in pipe.store.iter_rows(("id", "path"))}
    for name, (outcome, reason) in expect.items():
        path = _report_path(d, name)
        if outcome == "skipped":
            assert path in failed, f"{path} should be skipped; failed: {sorted(failed)}"
            assert re.search(reason, failed[path]), f"{path}: reason {failed[path]!r} !~ {reason!r}"
            assert path not in rows
        elif outcome == "indexed":
            assert path not in failed, f"{path} was skipped: {failed.get(path)}"
            assert path in rows, f"{path} was not indexed"
        else:
            assert path not in failed and path not in rows and not any(p.startswith(path + os.sep) for p in rows)
    case_failures = {p for p in failed if p.startswith(str(d) + os.sep)}
    assert case_failures == {_report_path(d, n) for n, (o, _) in expect.items() if o == "skipped"}
    return {i for p, i in rows.items() if p.startswith(str(d) + os.sep)}


# ---- files: next to an indexed collection ---------------------------------------------------


@pytest.mark.parametrize("case", sorted(BUILDERS))
def test_hostile_files_next_to_indexed_collection(lib, case_dir, case):
    expect = BUILDERS[case](case_dir)
    with deadline(60):
        report = lib.pipe.index(lib.root, progress=False)
    added = check_outcomes(lib.pipe, report, case_dir, expect)
    n_indexed = sum(o == "indexed" for o, _ in expect.values())
    assert len(added) == report.indexed == n_indexed
    assert report.unchanged == len(COLORS)  # the good files were not touched
    assert report.duplicates == 0  # nothing was reached twice (the symlink loop is not followed)
    assert report.skipped == sum(o == "skipped" for o, _ in expect.values())
    assert_intact(lib.pipe, lib.base, added)

    # a second run changes nothing and reports the same failures
    with deadline(60):
        again = lib.pipe.index(lib.root, progress=False)
    assert again.indexed == 0 and again.unchanged == len(COLORS) + n_indexed
    assert sorted((f.path, f.error) for f in again.failed) == sorted((f.path, f.error) for f in report.failed)
    assert_intact(lib.pipe, lib.base, added)


def test_hostile_files_in_a_fresh_run(tmp_path):
    root = tmp_path / "fresh"
    for i, (name, rgb) in enumerate(COLORS.items()):
        make_image(root / "good" / f"{name}.png", rgb, seed=i)
    expected: dict[Path, Expect] = {}
    for case, build in BUILDERS.items():
        (root / case).mkdir()
        expected[root / case] = build(root / case)
    with Pipeline(db=str(tmp_path / "fresh.db"), encoder={**TINY, "workers": 0, "batch_size": 8}) as pipe:
        with deadline(120):
            report = pipe.index(root, progress=False)
        n_indexed = sum(o == "indexed" for e in expected.values() for o, _ in e.values())
        n_skipped = sum(o == "skipped" for e in expected.values() for o, _ in e.values())
        assert (report.indexed, report.skipped) == (len(COLORS) + n_indexed, n_skipped)
        for d, expect in expected.items():
            check_outcomes(pipe, report, d, expect)
        assert pipe.store.count() == len(COLORS) + n_indexed
        before = snapshot(pipe)
        # a re-run (and a sync: nothing is removed for files that can't be read) leaves it intact
        with deadline(120):
            again = pipe.index(root, progress=False)
            synced = pipe.sync(root)
        assert (again.indexed, again.skipped, again.unchanged) == (0, n_skipped, len(COLORS) + n_indexed)
        assert (synced.indexed, synced.removed) == (0, 0)
        assert_intact(pipe, before)


_READ_SPECIAL = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # a regression fails here, not the machine
from mm_retrieval.decode import ImageFileDataset
item = ImageFileDataset([sys.argv[1]], transform=lambda im: im)[0]
print(item.error)
"""


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_special_files_neither_block_nor_flood(tmp_path, kind):
    """A FIFO named like an image would block the read forever; a symlink to /dev/zero reports
    size 0 and never ends (read whole, it fills memory). Checked in a bounded subprocess."""
    import subprocess
    import sys

    p = tmp_path / "special.png"
    if kind == "fifo":
        os.mkfifo(p)
    else:
        if not os.path.exists("/dev/zero"):
            pytest.skip("no /dev/zero")
        os.symlink("/dev/zero", p)
    out = subprocess.run([sys.executable, "-c", _READ_SPECIAL, str(p)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"not a regular file \((FIFO|device)\)", out.stdout), out.stdout


def test_exif_orientation_is_applied(lib, case_dir):
    """All 8 orientations are indexed as the upright picture (lossless PNG: exactly its vector)."""
    expect = build_exif(case_dir)
    lib.pipe.index(lib.root, progress=False)
    rows = {r["path"]: r["vector"] for r in lib.pipe.store.iter_rows(("id", "path", "vector"))}
    enc = lib.pipe.encoder
    upright = _pattern((48, 32), seed=3)
    want = enc.encode_pixels(enc.image_transform(upright)[None])[0][0]
    for o in range(1, 9):
        got = np.asarray(rows[str(case_dir / f"orient{o}.png")], dtype=np.float32)
        assert got == pytest.approx(want, abs=1e-4), f"orientation {o} not applied"
        jpeg = np.asarray(rows[str(case_dir / f"orient{o}.jpg")], dtype=np.float32)
        assert float(jpeg @ want) > 0.98, f"JPEG orientation {o}: cosine {float(jpeg @ want):.3f}"
    # the check means something: the stored (sideways) pixels embed differently
    sideways = enc.encode_pixels(enc.image_transform(upright.transpose(_INVERSE[6]))[None])[0][0]
    assert float(sideways @ want) < float(np.asarray(rows[str(case_dir / "orient6.png")]) @ want) - 1e-3
    assert len(expect) == 16


def test_image_modes_embed_their_content(lib, case_dir):
    """16-bit grey is scaled, not clipped to white; animations use their first frame."""
    build_modes(case_dir)
    lib.pipe.index(lib.root, progress=False)
    rows = {r["path"]: np.asarray(r["vector"], np.float32) for r in lib.pipe.store.iter_rows(("id", "path", "vector"))}
    enc = lib.pipe.encoder

    def emb(im):
        return enc.encode_pixels(enc.image_transform(im)[None])[0][0]

    grey = Image.fromarray(np.asarray(_pattern(seed=5).convert("L")), "L")
    assert rows[str(case_dir / "grey16.png")] == pytest.approx(emb(grey), abs=1e-4)
    first, second = (Image.new("RGB", (40, 30), c) for c in ((230, 20, 20), (20, 230, 20)))
    for name in ("animated.gif", "animated.webp"):
        v = rows[str(case_dir / name)]
        assert float(v @ emb(first)) > float(v @ emb(second)), f"{name}: not its first frame"
        assert float(v @ emb(first)) > 0.99


def test_unicode_paths_search_back(lib, case_dir):
    build_names(case_dir)
    lib.pipe.index(lib.root, progress=False)
    spaced = str(case_dir / "with space/日本語 é ü 🐶 ‏rtl‏ name.png")
    hits = lib.pipe.search(QUERY, k=K).hits
    assert spaced in {h.path for h in hits}
    escaped = spaced.replace("\\", "\\\\").replace('"', '\\"')
    found = lib.pipe.search(QUERY, k=5, filter=f'path == "{escaped}"').hits
    assert [h.path for h in found] == [spaced]
    found = lib.pipe.search(QUERY, k=5, filter='path like "%日本語%🐶%"').hits
    assert [h.path for h in found] == [spaced]


def test_unreadable_file_is_skipped(lib, case_dir):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading; "
                    "dangling symlinks and FIFOs cover unreadable files (build_special)")
    p = make_image(case_dir / "locked.png", (1, 2, 3), seed=90)
    p.chmod(0)
    try:
        report = lib.pipe.index(lib.root, progress=False)
    finally:
        p.chmod(0o644)
    assert {f.path: f.error for f in report.failed}[str(p)].startswith("cannot read")
    assert_intact(lib.pipe, lib.base)


def test_file_that_became_unreadable_keeps_its_entry(lib, case_dir):
    """An indexed file replaced by a dangling symlink is reported, and its row stays."""
    p = make_image(case_dir / "soon-gone.png", (90, 90, 9), seed=91)
    lib.pipe.index(lib.root, progress=False)
    mid = snapshot(lib.pipe)
    p.unlink()
    os.symlink("gone-for-good.png", p)
    report = lib.pipe.index(lib.root, progress=False)
    assert re.search(r"cannot read", {f.path: f.error for f in report.failed}[str(p)])
    assert_intact(lib.pipe, mid)


_MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"BM",
          b"II*\x00", b"MM\x00*", b"P6\n4 4\n255\n", b"P5\n"]


@HYPO
@given(files=st.lists(st.tuples(st.sampled_from(sorted(IMAGE_EXTENSIONS)), st.sampled_from(_MAGIC), st.binary(max_size=600)),
                      min_size=1, max_size=6))
def test_random_bytes_with_image_extensions(lib, files):
    d = lib.root / f"fuzz{next(lib.counter)}"
    d.mkdir()
    try:
        for j, (ext, magic, body) in enumerate(files):
            (d / f"f{j}{ext}").write_bytes(magic + body)
        report = lib.pipe.index(lib.root, progress=False)
        failed = {f.path: f.error for f in report.failed}
        rows = {r["path"]: r["id"] for r in lib.pipe.store.iter_rows(("id", "path"))}
        for j, (ext, _, _) in enumerate(files):
            p = str(d / f"f{j}{ext}")
            # skipped with a reason, indexed (random bytes after a PPM header are a real image),
            # or the same bytes as another file of this example (stored once)
            assert (p in failed and failed[p]) or p in rows or report.duplicates, p
        assert all(re.search(UNDECODABLE + r"|too large|zero width|cannot preprocess", e) for e in failed.values()), failed
        added = {i for p, i in rows.items() if p.startswith(str(d) + os.sep)}
        assert_intact(lib.pipe, lib.base, added)
    finally:
        _reset(lib, d)


@HYPO
@given(data=st.data())
def test_bit_flipped_images(lib, data):
    """Real PNG/JPEG/GIF/WebP files with a few random bytes changed: decoded or skipped, never a crash."""
    d = lib.root / f"flip{next(lib.counter)}"
    d.mkdir()
    try:
        for fmt, ext in (("PNG", ".png"), ("JPEG", ".jpg"), ("GIF", ".gif"), ("WEBP", ".webp")):
            raw = bytearray(_encoded(_pattern((32, 24), seed=9), fmt))
            flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), min_size=1, max_size=8), label=fmt)
            for pos, val in flips:
                raw[pos] = val
            (d / f"flipped{ext}").write_bytes(bytes(raw))
        report = lib.pipe.index(lib.root, progress=False)
        rows = {r["path"]: r["id"] for r in lib.pipe.store.iter_rows(("id", "path"))}
        added = {i for p, i in rows.items() if p.startswith(str(d) + os.sep)}
        assert len(added) + report.skipped + report.duplicates == 4
        assert_intact(lib.pipe, lib.base, added)
    finally:
        _reset(lib, d)


# ---- queries --------------------------------------------------------------------------------

SCRIPTS = [
    "红色的正方形", "赤い四角", "빨간 사각형", "مربع أحمر", "\u200fמרבע אדום\u200f", "लाल वर्ग", "красный квадрат",
    "🟥🐶🏖️👨‍👩‍👧‍👦", "e\u0301\u0302\u0303\u0304 combining", "Z̴̡̢̛͓̈́a̸̧͇͐l̵̨͔̍g̴̛͓o̷̭̾", "\u202eevil rtl override",
    "\ufeffbom", "\u00a0nbsp\u2003em", "𝔣𝔯𝔞𝔨𝔱𝔲𝔯", "ﷺ ﷽",
]


@pytest.mark.parametrize("query", ["", " ", "\n\t\r ", "\u3000\u2003\u00a0\u2028", "x" * (MAX_QUERY_CHARS + 1),
                                   "日" * (MAX_QUERY_CHARS + 1), "a\x00b", "\x00", None, b"red", 42, ["red"]])
def test_unusable_queries_are_input_errors(lib, query):
    with pytest.raises(InputError):
        lib.pipe.search(query)
    assert_intact(lib.pipe, lib.base)


@pytest.mark.parametrize("query", [
    "x" * MAX_QUERY_CHARS, "日" * MAX_QUERY_CHARS, "a red square " * (MAX_QUERY_CHARS // 13),
    " " * 5000 + "red" + " " * 5000,  # whitespace around does not count
    "".join(map(chr, range(1, 32))) + "red", "\x7f\x80\x9f binary-ish", "\ufffd\ufffe\uffff", "\ud800 lone surrogate",
    *SCRIPTS,
])
def test_odd_but_usable_queries(lib, query):
    try:
        res = lib.pipe.search(query, k=3)
    except InputError as e:  # a clear refusal is fine; a crash is not
        assert str(e)
    else:
        assert 1 <= len(res.hits) <= 3 and all(h.id in lib.base.rows for h in res.hits)
        assert all(np.isfinite(h.score) for h in res.hits)
    assert_intact(lib.pipe, lib.base)


def test_query_length_limit_is_exact(lib):
    assert len(lib.pipe.search("q" * MAX_QUERY_CHARS, k=1).hits) == 1
    with pytest.raises(InputError, match="limit"):
        lib.pipe.search("q" * (MAX_QUERY_CHARS + 1), k=1)


_ANY_CHAR = st.characters(codec=None, exclude_categories=[])  # surrogates and controls included


@settings(max_examples=40, deadline=None, database=None)
@given(query=st.one_of(st.text(max_size=80), st.text(_ANY_CHAR, max_size=80),
                       st.text(_ANY_CHAR, min_size=MAX_QUERY_CHARS - 5, max_size=MAX_QUERY_CHARS + 5)))
def test_generated_queries_only_raise_input_errors(lib, query):
    try:
        res = lib.pipe.search(query, k=2)
    except InputError:
        return
    assert len(res.hits) <= 2 and all(h.id in lib.base.rows for h in res.hits)


def test_collection_intact_after_query_fuzzing(lib):
    assert_intact(lib.pipe, lib.base)


# ---- filter expressions ---------------------------------------------------------------------

FILTERS = [
    'metadata["a" ==', ")))", "(((", "and", "not", "==", '"', "'", "\\", "\x00", "\ud800", "\x01\x02\x03",
    'id != "" or 1==1', 'id != "" or true', '1 == 1', "true", "false", '"; drop collection images; --',
    "'; DROP TABLE images; --", 'path == "x"; delete from images', 'id in ["a"] or id not in ["a"]',
    "x" * 100_000, "(" * 5000 + 'id != ""' + ")" * 5000, "not " * 3000 + "true",
    " or ".join(['id == "a"'] * 3000), "id in [" + ",".join(['"a"'] * 20_000) + "]", 'id == "' + "a" * 70_000 + '"',
    'path like "%' + "_%" * 500 + '"', 'path == "日本語 🐶"', 'caption like "%\u202e%"', 'metadata["ключ"] == "значение"',
    'metadata["a"]["b"][0] > 1', "json_contains(metadata, 1)", 'text_match(caption, "x")', "random_sample(0.5)",
    "id", "1", "metadata", "id == 1", "path > 5", 'zzz == "a"', "vector == 1", 'id == "a" and', "exists metadata",
    "${jndi:ldap://x}", "{{7*7}}", "__import__('os').system('true')",
]


def _filter_ok(pipe: Pipeline, expr: str, base: Snapshot, k: int = 5) -> None:
    try:
        res = pipe.search(QUERY, k=k, filter=expr)
    except InputError as e:
        assert "filter" in str(e)
        return
    assert len(res.hits) <= k and all(h.id in base.rows and base.rows[h.id] == h.path for h in res.hits)


@pytest.mark.parametrize("expr", FILTERS, ids=lambda e: ascii(e[:30]))
def test_hostile_filters(lib, expr):
    _filter_ok(lib.pipe, expr, lib.base)
    assert_intact(lib.pipe, lib.base)


def test_always_true_injection_returns_ordinary_results(lib):
    res = lib.pipe.search(QUERY, k=K, filter='id != "" or 1==1')
    assert [(h.id, h.score) for h in res.hits] == [(i, pytest.approx(s, abs=1e-5)) for i, s in lib.base.hits]
    with pytest.raises(InputError, match="invalid filter expression"):
        lib.pipe.search(QUERY, filter='"; drop collection images; --')
    with pytest.raises(InputError, match="invalid filter expression"):
        lib.pipe.search(QUERY, filter="(" * 5000 + "true" + ")" * 5000)
    assert_intact(lib.pipe, lib.base)


_TOKENS = ['id', 'path', 'caption', 'metadata', 'metadata["year"]', 'metadata["a"]["b"]', '==', '!=', '>', '<=', 'and', 'or',
           'not', 'in', 'like', '(', ')', '[', ']', ',', '"x"', "'y'", '"%"', '1', '-1.5e308', '1e999', 'true', 'null',
           'json_contains', 'array_contains', 'exists', '+', '*', '%', '\\', '"', ';', '--', '日本', '\x00', '\ud800']


@settings(max_examples=60, deadline=None, database=None)
@given(expr=st.one_of(st.text(max_size=60), st.text(_ANY_CHAR, max_size=40),
                      st.lists(st.sampled_from(_TOKENS), min_size=1, max_size=12).map(" ".join)))
def test_generated_filters_only_raise_input_errors(lib, expr):
    _filter_ok(lib.pipe, expr, lib.base)


def test_collection_intact_after_filter_fuzzing(lib):
    assert_intact(lib.pipe, lib.base)


# ---- pipeline config files ------------------------------------------------------------------


def _config(tmp_path: Path, data: str | bytes, name: str = "pipeline.toml") -> Path:
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    return p


BAD_CONFIGS = {
    "invalid-toml": "[encoder\nmodel = ",
    "unclosed-string": '[encoder]\nmodel = "ViT-B-32\n',
    "duplicate-key": '[encoder]\nmodel = "a"\nmodel = "b"\n',
    "binary": bytes(range(256)) * 4,
    "utf16": "[encoder]\nmodel = 'x'\n".encode("utf-16"),
    "nul": "[encoder]\nmodel = 'a\x00b'\n",
    "section-not-table": "encoder = 5\n",
    "section-array": "[[encoder]]\nmodel = 'x'\n",
    "name-not-string": "[encoder]\nname = 3\n",
    "unknown-stage": '[encoder]\nname = "no_such_encoder"\n',
    "wrong-type": '[encoder]\nbatch_size = "big"\n',
    "wrong-type-bool": "[encoder]\nworkers = true\n",
    "wrong-type-store": "[store]\nuri = 5\n",
    "wrong-type-search": '[search]\nk = "ten"\n',
    "wrong-type-reranker": "[reranker]\ncheckpoint = [1, 2]\n",
    "unknown-section": "[bogus]\nx = 1\n",
    "unknown-key": "[encoder]\nmodle = 'ViT-B-32'\n",
    "unknown-search-key": "[search]\ntop_k = 3\n",
    "deep-nesting": "a = " + "[" * 50_000 + "]" * 50_000 + "\n",
    "deep-inline-tables": "a = " + "{b = " * 5_000 + "1" + "}" * 5_000 + "\n",
    "huge": "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1) + "[search]\nk = 3\n",
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_malformed_config_files(tmp_path, name):
    p = _config(tmp_path, BAD_CONFIGS[name])
    with pytest.raises(ConfigError) as e:
        PipelineConfig.load(p)
    assert str(p) in str(e.value), e.value


def test_config_paths_that_are_not_files(tmp_path):
    os.mkfifo(tmp_path / "fifo.toml")
    (tmp_path / "dir.toml").mkdir()
    os.symlink("loop.toml", tmp_path / "loop.toml")
    for name in ("fifo.toml", "dir.toml", "loop.toml", "missing.toml"):
        with deadline(10), pytest.raises(ConfigError) as e:
            PipelineConfig.load(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)


def test_good_config_still_loads(tmp_path):
    p = _config(tmp_path, '[encoder]\nmodel = "mmr-tiny"\npretrained = "none"\nbatch_size = 4\n[store]\ncollection = "c"\n[search]\nk = 3\n')
    cfg = PipelineConfig.load(p)
    assert cfg.encoder.params["batch_size"] == 4 and cfg.store.params["collection"] == "c" and cfg.search.k == 3


_SECTIONS = ["encoder", "store", "reranker", "search", "bogus", "encoder.inner"]
_KEYS = ["name", "model", "pretrained", "batch_size", "workers", "uri", "collection", "k", "candidates", "checkpoint", "x"]
_VALUES = ['1', '-1', '"x"', "'ViT-B-32'", 'true', '1.5', 'nan', 'inf', '[1, "a"]', '{a = 1}', '1979-05-27', '""', '"""\n"""']


@settings(max_examples=60, deadline=None, database=None)
@given(text=st.one_of(
    st.text(_ANY_CHAR, max_size=200),
    st.lists(st.one_of(st.sampled_from(_SECTIONS).map(lambda s: f"[{s}]"),
                       st.tuples(st.sampled_from(_KEYS), st.sampled_from(_VALUES)).map(lambda kv: f"{kv[0]} = {kv[1]}")),
             max_size=8).map("\n".join),
))
def test_generated_config_files_only_raise_config_errors(tmp_path_factory, text):
    p = _config(tmp_path_factory.mktemp("cfg"), text)
    try:
        cfg = PipelineConfig.load(p)
    except ConfigError as e:
        assert str(p) in str(e)
    else:
        assert isinstance(cfg, PipelineConfig)
