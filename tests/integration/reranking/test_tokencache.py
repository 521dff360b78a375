"""The token store (mm_retrieval.tokencache): memory-mapped slots behind an id -> slot map.

Real files in tmp_path and real processes: slots freed and reused, compaction under a reading
thread, the one-time migration of an old-format cache, kills in the middle of a slot write, and
the faults of issue 24 item 5 (truncated or foreign files, a map that disagrees with its files,
a full disk, two writers), each a clear error or a recovery and never another id's tokens.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import mm_retrieval.tokencache as tc
from mm_retrieval.errors import IncompatibleError, InputError
from mm_retrieval.tokencache import TokenCache, open_existing
from mm_retrieval.tokencache import slots as slotfile

SHAPE = (4, 6)
ROOT = Path(__file__).resolve().parents[3]


def tok(value: float) -> np.ndarray:
    """An item's tokens: every element the same value, so a torn or misplaced read shows."""
    return np.full(SHAPE, value, np.float32)


def write(cache: TokenCache, items: dict[str, float]) -> None:
    for item_id, value in items.items():
        cache.add(item_id, tok(value))
    cache.commit()


def values(cache: TokenCache, ids) -> dict[str, float]:
    """id -> the one value of its tokens (asserting the slot is not torn)."""
    out = {}
    for item_id, arr in cache.get(list(ids)).items():
        assert arr.dtype == np.float16 and arr.shape == SHAPE
        assert (arr == arr.flat[0]).all(), f"{item_id}: a torn slot"
        out[item_id] = float(arr.flat[0])
    return out


@pytest.fixture
def cache(tmp_path):
    c = TokenCache(tmp_path / "tokens-fp.sqlite", "fp")
    yield c
    c.close()


def test_gather_returns_one_contiguous_array_and_marks_the_absent(cache):
    write(cache, {f"i{k}": k for k in range(10)})
    arr, present = cache.gather(["i3", "nope", "i7", "i3"])
    assert arr.shape == (4, *SHAPE) and arr.dtype == np.float16 and arr.flags.c_contiguous
    assert present.tolist() == [True, False, True, True]
    assert arr[0, 0, 0] == 3 and arr[2, 0, 0] == 7 and arr[3, 0, 0] == 3
    out = np.zeros((2, *SHAPE), np.float16)  # a caller's (e.g. page-locked) buffer, filled in place
    got, present = cache.gather(["i9", "i1"], out=out)
    assert got is out and present.all() and out[0, 0, 0] == 9 and out[1, 0, 0] == 1
    with pytest.raises(ValueError, match="C-contiguous float16"):
        cache.gather(["i1"], out=np.zeros((1, 3, 3), np.float16))
    assert sorted(cache.ids()) == sorted(f"i{k}" for k in range(10)) and len(cache) == 10


def test_deletes_and_overwrites_free_slots_that_later_writes_reuse(cache):
    write(cache, {f"i{k}": k for k in range(10)})
    data = tc.data_files(cache._base(1))[0]
    size = data.stat().st_size
    cache.delete(["i1", "i2", "i3", "missing"])
    s = cache.stats()
    assert (s["live_slots"], s["free_slots"]) == (7, 3)
    assert s["free_bytes"] == 3 * s["slot_bytes"] == 3 * cache.bytes_per_item
    write(cache, {"i5": 55})  # overwritten: it takes a free slot, and the commit frees its old one
    assert (cache.stats()["live_slots"], cache.stats()["free_slots"]) == (7, 3)
    write(cache, {"a": 100, "b": 101, "c": 102})
    assert cache.stats()["free_slots"] == 0 and data.stat().st_size == size  # reused, the file did not grow
    assert values(cache, ["i0", "i4", "i5", "i9", "a", "c", "i1"]) == {"i0": 0, "i4": 4, "i5": 55, "i9": 9, "a": 100, "c": 102}


def test_compaction_shrinks_the_file_while_a_reader_keeps_reading(cache, tmp_path):
    write(cache, {f"i{k}": k for k in range(200)})
    cache.delete([f"i{k}" for k in range(0, 200, 2)])
    reader = open_existing(cache.path)  # another process's view: its own connection and mapping
    assert values(reader, ["i1", "i199"]) == {"i1": 1, "i199": 199}
    errors, stop = [], threading.Event()

    def read_all():
        try:
            while not stop.is_set():
                got = values(reader, [f"i{k}" for k in range(2, 200)])  # i1 is the main thread's
                assert got == {f"i{k}": k for k in range(3, 200, 2)}
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)

    t = threading.Thread(target=read_all)
    t.start()
    before = cache.file_bytes()
    for _ in range(3):
        done = cache.compact()
        write(cache, {"i1": 1})  # a write between compactions: the writer follows the new generation
        cache.delete(["i1"])
        write(cache, {"i1": 1})
    stop.set()
    t.join()
    assert not errors, errors[0]
    assert done["compacted"] and cache.file_bytes() < before
    assert cache.stats()["generation"] == 4
    assert sorted(p.name for p in tmp_path.iterdir() if ".g" in p.name) == ["tokens-fp.g4.slots", "tokens-fp.g4.stamps"]
    assert values(reader, ["i1", "i3"]) == {"i1": 1, "i3": 3}
    reader.close()


def test_a_reader_sees_another_writers_commits_at_once(cache):
    """A reader keeps the rows it looked up between queries; a commit by any other connection
    (another instance, another process) makes it look again."""
    write(cache, {"a": 1, "b": 2})
    reader = open_existing(cache.path)
    assert values(reader, ["a", "b"]) == {"a": 1, "b": 2}
    cache.delete(["a"])  # nothing rewritten: only the map says "a" is gone
    assert values(reader, ["a", "b"]) == {"b": 2}
    write(cache, {"a": 3, "b": 4})
    assert values(reader, ["a", "b"]) == {"a": 3, "b": 4}
    reader.close()


def test_deleting_most_items_compacts_automatically(cache, monkeypatch):
    monkeypatch.setattr(tc, "COMPACT_MIN_BYTES", 0)
    write(cache, {f"i{k}": k for k in range(10)})
    cache.delete(["i0", "i1", "i2", "i3"])
    assert cache.stats()["generation"] == 1  # 4 of 10 free: kept for reuse
    cache.delete(["i4", "i5"])
    s = cache.stats()
    assert (s["generation"], s["live_slots"], s["free_slots"]) == (2, 4, 0)
    assert values(cache, [f"i{k}" for k in range(10)]) == {"i6": 6, "i7": 7, "i8": 8, "i9": 9}


# ---- the one-time migration of today's SQLite-blob caches ---------------------------------------


def write_old_format(path: Path, fingerprint: str, items: dict[str, np.ndarray]) -> None:
    """A cache as the SQLite-blob TokenCache (format mm_retrieval.tokens/1) wrote it: same schema,
    same statements, WAL left behind as a killed writer leaves it."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    with db:
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("CREATE TABLE IF NOT EXISTS tokens (id TEXT PRIMARY KEY, data BLOB NOT NULL)")
        db.executemany("INSERT INTO meta VALUES (?, ?)", [("format", "mm_retrieval.tokens/1"), ("fingerprint", fingerprint)])
        shape = next(iter(items.values())).shape
        db.execute("INSERT OR REPLACE INTO meta VALUES ('shape', ?)", (json.dumps(list(shape)),))
        db.execute("INSERT OR REPLACE INTO meta VALUES ('info', ?)", (json.dumps({"storage": "fp16"}),))
        db.executemany("INSERT OR REPLACE INTO tokens VALUES (?, ?)",
                       [(k, np.ascontiguousarray(v, dtype=np.float16).tobytes()) for k, v in items.items()])


def test_an_old_format_cache_is_migrated_once_with_nothing_lost(tmp_path, caplog, capsys):
    rng = np.random.default_rng(0)
    items = {f"{k:032x}": rng.standard_normal(SHAPE).astype(np.float16) for k in range(300)}
    path = tmp_path / "tokens-fp.sqlite"
    write_old_format(path, "fp", items)
    with caplog.at_level(logging.WARNING, logger="mm_retrieval.tokencache"):
        c = open_existing(path, progress=True)
    said = caplog.text
    assert "old format" in said and "300 items" in said and "migrated" in said
    assert "migrating token cache" in capsys.readouterr().err  # the progress bar
    assert c.info == {"storage": "fp16"} and c.shape == SHAPE and len(c) == 300
    got = c.get(list(items))
    assert all(np.array_equal(got[k], v) for k, v in items.items())
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'tokens'").fetchone() is None
    c.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mm_retrieval.tokencache"):
        again = TokenCache(path, "fp", create=False)
    assert "old format" not in caplog.text and len(again) == 300  # once
    write(again, {"new": 5})
    assert values(again, ["new"]) == {"new": 5}
    again.close()


# ---- kills ---------------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from mm_retrieval.tokencache import TokenCache

    cache = TokenCache(sys.argv[1], "fp")
    for batch in range(3):
        for k in range(8):
            cache.add(f"b{batch}-{k}", np.full((4, 6), batch * 100 + k, np.float32))
        cache.commit()
        print(batch, flush=True)
""")


@pytest.mark.parametrize("failpoint", ["mid_slot=12", "mid_tokens=2"])
def test_a_write_killed_in_the_middle_of_a_slot_leaves_nothing_pointing_at_it(tmp_path, failpoint):
    path = tmp_path / "tokens-fp.sqlite"
    c = TokenCache(path, "fp")
    write(c, {"old-1": 1, "old-2": 2})
    c.delete(["old-1"])  # a free slot: the next batch takes it
    env = {**os.environ, "MMR_FAILPOINTS": failpoint}
    proc = subprocess.run([sys.executable, "-c", WRITER, str(path)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.split() == ["0"]  # batch 0 committed, batch 1 killed while writing its slots
    reader = open_existing(path)
    want = {"old-2": 2, **{f"b0-{k}": k for k in range(8)}}
    assert set(reader.ids()) == set(want)
    assert values(reader, [*want, "old-1", "b1-0", "b1-7"]) == want
    proc = subprocess.run([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr  # the next run writes over the half-written slots
    assert values(reader, [f"b{b}-{k}" for b in range(3) for k in range(8)]) == {f"b{b}-{k}": b * 100 + k for b in range(3) for k in range(8)}
    s = reader.stats()
    assert (s["live_slots"], s["free_slots"]) == (25, 0)  # the freed slot, then new ones; none leaked
    reader.close()
    c.close()


# ---- faults (issue 24 item 5) ---------------------------------------------------------------------


def test_a_truncated_data_file_is_a_clear_error(cache):
    write(cache, {f"i{k}": k for k in range(10)})
    data = tc.data_files(cache._base(1))[0]
    with open(data, "r+b") as f:
        f.truncate(slotfile.HEADER_BYTES + 5 * cache.bytes_per_item + 7)
    reader = open_existing(cache.path)
    assert values(reader, ["i0", "i4"]) == {"i0": 0, "i4": 4}  # whole slots before the cut still read
    with pytest.raises(IncompatibleError, match=r"cut short.*mmr cache compact.*mmr cache build"):
        reader.get(["i9"])
    assert cache.compact()["dropped"] == 5  # the recovery: whole slots kept, the cut ones dropped
    assert values(reader, [f"i{k}" for k in range(10)]) == {f"i{k}": k for k in range(5)}
    reader.close()


def test_a_foreign_data_file_is_a_clear_error(cache, tmp_path):
    write(cache, {"a": 1})
    data = tc.data_files(cache._base(1))[0]
    other = TokenCache(tmp_path / "tokens-other.sqlite", "other")
    write(other, {"a": 2})
    os.replace(tc.data_files(other._base(1))[0], data)  # another cache's slots under this one's name
    with pytest.raises(IncompatibleError, match="another cache"):
        open_existing(cache.path).get(["a"])
    data.write_bytes(b"PK\x03\x04 not a token file" + bytes(5000))
    with pytest.raises(IncompatibleError, match="not an mm_retrieval token data file"):
        open_existing(cache.path).get(["a"])
    data.unlink()
    with pytest.raises(IncompatibleError, match="are gone"):
        open_existing(cache.path).get(["a"])
    junk = tmp_path / "tokens-junk.sqlite"
    junk.write_bytes(b"this is no database" * 100)
    with pytest.raises(IncompatibleError, match="is not a token cache"):
        open_existing(junk)


def test_a_slot_map_that_disagrees_with_the_file_never_serves_wrong_tokens(cache):
    write(cache, {"a": 1, "b": 2, "c": 3})
    with sqlite3.connect(cache.path) as db:  # the map says "a" lives where "b" does
        slot_b = db.execute("SELECT slot FROM slots WHERE id = 'b'").fetchone()[0]
        db.execute("UPDATE slots SET slot = ? WHERE id = 'a'", (slot_b,))
    with pytest.raises(IncompatibleError, match=r"do not hold what the map says.*mmr cache compact"):
        cache.get(["a", "c"])
    assert values(cache, ["b", "c"]) == {"b": 2, "c": 3}
    done = cache.compact()  # the recovery: the disagreeing row is dropped, the rest kept
    assert done["dropped"] == 1
    assert values(cache, ["a", "b", "c"]) == {"b": 2, "c": 3}


def test_a_full_disk_during_a_slot_write_leaves_the_cache_as_it_was(cache, monkeypatch):
    write(cache, {"a": 1, "b": 2})
    cache.delete(["a"])
    real = os.pwrite
    budget = [cache.bytes_per_item + 10]  # room for one slot and a bit: the disk fills in the 2nd

    def pwrite(fd, data, offset):
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real(fd, bytes(data)[: budget[0]], offset)
        budget[0] -= n
        return n

    monkeypatch.setattr(slotfile.os, "pwrite", pwrite)
    with pytest.raises(InputError, match=r"disk .* is full.*nothing of them was recorded"):
        write(cache, {"c": 3, "d": 4, "b": 20})
    monkeypatch.setattr(slotfile.os, "pwrite", real)
    assert values(cache, ["a", "b", "c", "d"]) == {"b": 2}
    assert cache.stats()["free_slots"] == 1
    cache._pending.clear()
    write(cache, {"c": 3, "d": 4, "b": 20})  # space freed: the same write goes through
    assert values(cache, ["a", "b", "c", "d"]) == {"b": 20, "c": 3, "d": 4}


TWO_WRITERS = textwrap.dedent("""
    import sys
    import numpy as np
    from mm_retrieval.tokencache import TokenCache

    cache, me = TokenCache(sys.argv[1], "fp"), int(sys.argv[2])
    for batch in range(30):
        for k in range(6):  # ids of its own, and shared ones both processes overwrite
            cache.add(f"w{me}-{batch}-{k}", np.full((4, 6), me * 500 + batch * 10 + k, np.float32))  # exact in fp16
            cache.add(f"shared-{k}", np.full((4, 6), me * 500 + batch * 10 + k, np.float32))
        cache.commit()
        if batch % 5 == 4:
            cache.delete([f"w{me}-{batch - 1}-0"])
""")


def test_two_writers_queue_and_every_id_keeps_its_own_tokens(tmp_path):
    path = tmp_path / "tokens-fp.sqlite"
    TokenCache(path, "fp").close()
    procs = [subprocess.Popen([sys.executable, "-c", TWO_WRITERS, str(path), str(me)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for me in (1, 2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    c = open_existing(path)
    got = values(c, c.ids())
    deleted = {f"w{me}-{b - 1}-0" for me in (1, 2) for b in range(4, 30, 5)}
    want = {f"w{me}-{b}-{k}": me * 500 + b * 10 + k for me in (1, 2) for b in range(30) for k in range(6)}
    assert {k: v for k, v in got.items() if not k.startswith("shared")} == {k: v for k, v in want.items() if k not in deleted}
    last = {got[f"shared-{k}"] for k in range(6)}
    assert {v // 500 for v in last} <= {1, 2} and all(v % 10 == k for k, v in zip(range(6), [got[f"shared-{k}"] for k in range(6)]))
    with sqlite3.connect(path) as db:  # no slot handed to two ids, none both live and free
        slots = [r[0] for r in db.execute("SELECT slot FROM slots")]
        free = {r[0] for r in db.execute("SELECT slot FROM free")}
    assert len(slots) == len(set(slots)) and not free & set(slots)
    c.close()


@pytest.mark.parametrize("writer", ["rewrote it", "is halfway through it"])
def test_a_slot_reused_between_a_readers_lookup_and_its_copy_is_never_served(cache, monkeypatch, writer):
    """The race a stamp exists for: a reader looks "a" up, then (before it copies) "a" is deleted
    and the writer reuses its slot for "c", whole or half-written. The reader must not return c's
    tokens, or a torn slot, as a's: it looks again and finds "a" gone."""
    from mm_retrieval import failpoints

    write(cache, {"a": 1, "b": 2})
    reader = open_existing(cache.path)
    real_gather, real_hit = slotfile.SlotFile.gather, failpoints.hit

    def interrupted(name, **kw):
        if name == "mid_slot":
            raise KeyboardInterrupt  # the writer stops here, its slot half-written (no row points at it)
        real_hit(name, **kw)

    def racing(self, slots, stamps, out):
        if slotfile.SlotFile.gather is racing:
            monkeypatch.setattr(slotfile.SlotFile, "gather", real_gather)
            cache.delete(["a"])
            if writer == "rewrote it":
                write(cache, {"c": 3})
            else:
                monkeypatch.setattr(slotfile.failpoints, "hit", interrupted)
                with pytest.raises(KeyboardInterrupt):
                    write(cache, {"c": 3})
        return real_gather(self, slots, stamps, out)

    monkeypatch.setattr(slotfile.SlotFile, "gather", racing)
    assert values(reader, ["a", "b"]) == {"b": 2}
    assert cache.stats()["free_slots"] == (0 if writer == "rewrote it" else 1)
    reader.close()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gather_tensor_lands_the_same_tokens_on_the_device(cache, device):
    """On CUDA through a kept page-locked buffer and one copy; a second call (other ids, the same
    buffer) must not overwrite the first's copy in flight."""
    write(cache, {f"i{k}": k for k in range(10)})
    first, present = cache.gather_tensor(["i2", "nope", "i7"], device)
    second, _ = cache.gather_tensor(["i1", "i3", "i5"], device)
    assert first.device.type == device and first.dtype.itemsize == 2 and present.tolist() == [True, False, True]
    assert first[0].float().mean().item() == 2 and first[2].float().mean().item() == 7
    assert [second[k].float().mean().item() for k in range(3)] == [1, 3, 5]
