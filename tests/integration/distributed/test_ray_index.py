"""`mmr index --ray`: a real local Ray instance (2 CPUs) encodes, the driver writes into a real
`milvus-lite server` on 127.0.0.1, and the collection equals the single-process run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.data")

from mm_retrieval import Pipeline  # noqa: E402
from mm_retrieval.errors import StageError  # noqa: E402
from mm_retrieval.tokencache import caches_in, open_existing  # noqa: E402
from tests.helpers import COLORS, TINY, free_port, make_image  # noqa: E402

ENCODER = {**TINY, "workers": 0, "batch_size": 4}
BAD = {"empty.png": b"", "corrupt.png": None, "notes.jpg": b"not an image at all"}  # None: a truncated PNG


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for the module (2 CPUs, as CI has); the index runs reuse it."""
    import ray

    from mm_retrieval.distributed import connect

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    connect(None)  # the quiet settings, as a run applies them
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A folder of 8 images and 3 bad files, and a table captioning 4 other images (one row
    without a file, one text-only row)."""
    import pandas as pd

    root = tmp_path_factory.mktemp("ray-data")
    folder = root / "photos"
    for i, (name, rgb) in enumerate(COLORS.items()):
        make_image((folder / "nested" if i % 3 == 0 else folder) / f"{name}.png", rgb, seed=i)
    for name, data in BAD.items():
        if data is None:
            data = make_image(root / name, (9, 9, 9), size=(64, 64), seed=99).read_bytes()
            data = data[: len(data) // 2]
        (folder / name).write_bytes(data)
    captioned = root / "captioned"
    rows = []
    for i, (name, rgb) in enumerate(list(COLORS.items())[:4]):
        make_image(captioned / f"{name}.jpg", rgb, seed=100 + i)
        rows.append({"path": f"captioned/{name}.jpg", "caption": f"a {name} square", "year": 2020 + i})
    rows.append({"path": "captioned/missing.jpg", "caption": "gone", "year": 1999})
    rows.append({"path": "", "caption": "a text-only note about the sea", "year": 2000})
    pd.DataFrame(rows).to_parquet(root / "table.parquet")
    return {"folder": folder, "table": root / "table.parquet", "root": root}


def _pipe(uri: str, collection: str) -> Pipeline:
    return Pipeline(db=uri, collection=collection, encoder=dict(ENCODER))


def _snapshot(pipe: Pipeline) -> dict:
    """Every row (vectors included) and every token cache row of the collection."""
    store = pipe.store
    ids = sorted(r["id"] for r in store.iter_rows(("id",)))
    rows = {r["id"]: r for r in store.get(ids, fields=["id", "vector", "text_vector", "path", "caption", "metadata", "content_hash"])}
    tokens = {}
    for path in caches_in(store.cache_dir()):
        cache = open_existing(path)
        tokens[path.name] = cache.get(sorted(cache.ids()))
        cache.close()
    return {"ids": ids, "rows": rows, "tokens": tokens}


@pytest.fixture(scope="module")
def runs(ray_instance, milvus_server, data, tmp_path_factory):
    """The folder and the table indexed single-process into one collection and on Ray (2 actors)
    into another; during the Ray folder run one actor is SIGKILLed on its first batch."""
    single = _pipe(milvus_server, "single")
    t0 = time.perf_counter()
    reports = {"single": [single.index(data["folder"], progress=False), single.index(data["table"], progress=False)]}
    print(f"single-process runs: {time.perf_counter() - t0:.1f}s")
    once = tmp_path_factory.mktemp("failpoint-once")
    mp = pytest.MonkeyPatch()
    mp.setenv("MMR_FAILPOINTS", "ray_actor_batch=1")
    mp.setenv("MMR_FAILPOINT_ONCE_DIR", str(once))
    distributed = _pipe(milvus_server, "on_ray")
    t0 = time.perf_counter()
    try:
        first = distributed.index(data["folder"], progress=False, ray="local", ray_actors=2)
    finally:
        mp.undo()
    killed_run_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reports["ray"] = [first, distributed.index(data["table"], progress=False, ray="local", ray_actors=1)]
    print(f"ray runs: folder (actor killed) {killed_run_s:.1f}s, table {time.perf_counter() - t0:.1f}s")
    return {"single": single, "ray": distributed, "reports": reports, "killed": (once / "ray_actor_batch").exists(),
            "killed_run_s": killed_run_s}


@pytest.mark.slow  # a Ray actor pool per run, and a milvus-lite server
def test_ray_run_equals_the_single_process_run(runs):
    a, b = _snapshot(runs["single"]), _snapshot(runs["ray"])
    assert a["ids"] == b["ids"] and len(a["ids"]) == len(COLORS) + 4 + 1  # images, captioned images, text-only row
    for i in a["ids"]:
        ra, rb = a["rows"][i], b["rows"][i]
        assert np.allclose(ra["vector"], rb["vector"], atol=1e-5)
        assert (ra["text_vector"] is None) == (rb["text_vector"] is None)
        if ra["text_vector"] is not None:
            assert np.allclose(ra["text_vector"], rb["text_vector"], atol=1e-5)
        assert {k: ra[k] for k in ("path", "caption", "metadata", "content_hash")} == {k: rb[k] for k in ("path", "caption", "metadata", "content_hash")}
    # the same token cache rows: same files, same ids, same arrays
    assert a["tokens"].keys() == b["tokens"].keys() and a["tokens"]
    for name, got in a["tokens"].items():
        assert sorted(got) == sorted(b["tokens"][name]) == sorted(r for r in a["ids"] if a["rows"][r]["path"])
        for i, arr in got.items():
            assert np.allclose(arr.astype(np.float32), b["tokens"][name][i].astype(np.float32), atol=2e-3)
    # the same report: bad files skipped with the same reasons, in the same order
    for single, ray, actors in zip(runs["reports"]["single"], runs["reports"]["ray"], (2, 1)):
        sd, rd = single.to_dict(), ray.to_dict()
        assert rd.pop("ray")["actors"] == actors
        for d in (sd, rd):
            d.pop("seconds")
        assert sd == rd
    reasons = {Path(f.path).name: f.error for f in runs["reports"]["ray"][0].failed}
    assert reasons.keys() == BAD.keys() and reasons["empty.png"] == "empty file (0 bytes)"
    assert reasons["notes.jpg"] == "not an image (unrecognised format)" and "corrupt" in reasons["corrupt.png"]
    assert any(Path(f.path).name == "missing.jpg" for f in runs["reports"]["ray"][1].failed)


@pytest.mark.slow
def test_a_killed_actor_is_retried_nothing_lost_nothing_duplicated(runs):
    assert runs["killed"], "the failpoint never killed an actor"
    store = runs["ray"].store
    rows = list(store.iter_rows(("id", "path")))
    assert len(rows) == len({r["id"] for r in rows}) == len(COLORS) + 5  # no duplicate, nothing missing
    assert runs["reports"]["ray"][0].indexed == len(COLORS)


@pytest.mark.slow  # a subprocess driver joining the module's Ray instance
def test_second_ray_run_from_the_cli_adds_nothing(runs, ray_instance, milvus_server, data):
    touched = data["folder"] / f"{list(COLORS)[1]}.png"
    os.utime(touched, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime: re-hashed by an actor, found known
    env = {**os.environ, "MMR_CACHE_DIR": os.environ["MMR_CACHE_DIR"]}
    proc = subprocess.run(
        [sys.executable, "-m", "mm_retrieval", "index", str(data["folder"]), "--db", milvus_server, "--collection", "on_ray",
         "--model", TINY["model"], "--pretrained", TINY["pretrained"], "--batch-size", "4", "--workers", "0",
         "--ray", ray_instance, "--ray-actors", "1", "--json", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["indexed"] == 0 and doc["unchanged"] == len(COLORS) and doc["skipped"] == len(BAD)
    assert doc["ray"]["actors"] == 1 and doc["ray"]["address"] == ray_instance
    assert runs["ray"].store.count() == len(COLORS) + 5


def test_unreachable_address_exits_2_and_writes_nothing(tmp_path, data):
    port = free_port()  # nothing listens here
    db = tmp_path / "mmr.db"
    proc = subprocess.run(
        [sys.executable, "-m", "mm_retrieval", "index", str(data["folder"]), "--db", str(db), "--model", TINY["model"],
         "--pretrained", TINY["pretrained"], "--ray", f"ray://127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"cannot reach the Ray cluster at --ray ray://127.0.0.1:{port}" in proc.stderr and "nothing was written" in proc.stderr
    assert not db.exists() and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_an_actor_that_cannot_load_the_model_stops_the_run(ray_instance, data, tmp_path):
    """The driver's model config file is gone by the time the actors load it (a file only on
    the driver's disk): the run stops with the actor's error, naming the encoder, within bounds."""
    import shutil

    import mm_retrieval.models
    from mm_retrieval import registry

    src = Path(mm_retrieval.models.__file__).parent / "configs" / "mmr-tiny.json"
    cfg = tmp_path / "driver-only.json"
    shutil.copy(src, cfg)
    encoder = registry.create("encoder", "open_clip", {"model": str(cfg), "pretrained": "none", "workers": 0, "batch_size": 4})
    encoder.warm_up()
    encoder.info()
    cfg.unlink()
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder=encoder)
    t0 = time.perf_counter()
    with pytest.raises(StageError) as e:
        pipe.index(data["folder"], progress=False, ray="local", ray_actors=1)
    assert time.perf_counter() - t0 < 120
    msg = str(e.value)
    assert msg.startswith("[encoder/open_clip]") and "could not load its model" in msg and "driver-only.json" in msg, msg
    assert pipe.store.count() == 0


def test_without_ray_one_message_names_the_extra(monkeypatch, capsys, data, tmp_path):
    from mm_retrieval.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: `import ray` raises ImportError
    monkeypatch.setitem(sys.modules, "ray.data", None)
    assert main(["index", str(data["folder"]), "--db", str(tmp_path / "mmr.db"), "--ray"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "mm-retrieval[ray]"' in err and err.count("\n") == 1
    assert not (tmp_path / "mmr.db").exists()
    assert main(["index", str(data["folder"]), "--db", str(tmp_path / "mmr.db"), "--ray", "--ray-actors", "0"]) == 2
    assert "--ray-actors must be at least 1" in capsys.readouterr().err
    assert main(["index", "--ray", str(data["folder"]), "--db", str(tmp_path / "mmr.db")]) == 2  # the folder became the address
    assert "--ray took" in capsys.readouterr().err and not (tmp_path / "mmr.db").exists()
    assert main(["index", "--db", str(tmp_path / "mmr.db")]) == 2
    assert "Missing argument 'SOURCE'." in capsys.readouterr().err


def test_a_folder_of_parquet_shards_is_a_table_and_a_bad_shard_is_reported(tmp_path):
    import pandas as pd

    from mm_retrieval.pipeline import open_source

    shards = tmp_path / "shards"
    names = list(COLORS)[:4]
    for i, name in enumerate(names):
        make_image(tmp_path / "img" / f"{name}.png", COLORS[name], seed=i)
    shards.mkdir()
    pd.DataFrame([{"path": f"../img/{n}.png", "caption": n} for n in names[:2]]).to_parquet(shards / "part-0.parquet")
    (shards / "part-1.parquet").write_bytes(b"PAR1 this is not parquet")
    pd.DataFrame([{"path": str(tmp_path / "img" / f"{n}.png"), "caption": n} for n in names[2:]]).to_parquet(shards / "part-2.parquet")
    (shards / "_SUCCESS").write_bytes(b"")
    assert open_source(shards).stage_name == "table"
    assert open_source(tmp_path / "img").stage_name == "folder"  # images: a folder, whatever else it holds
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder=dict(ENCODER))
    report = pipe.index(shards, progress=False)
    assert report.indexed == 4
    assert [f.path for f in report.failed] == [str(shards.resolve() / "part-1.parquet")]
    assert "unreadable table shard" in report.failed[0].error
    captions = sorted(r["caption"] for r in pipe.store.iter_rows(("id", "caption")))
    assert captions == sorted(names)


@pytest.mark.extended  # another actor pool, loading a (tiny) BLIP beside the encoder
def test_blip_image_side_tokens_on_ray_equal_single_process(ray_instance, data, tmp_path):
    """With a reranker that has its own image side (BLIP), the actors compute its tokens too,
    and the driver's token cache rows equal a single-process run's."""
    from mm_retrieval.testing.blip import make_tiny_blip

    blip = make_tiny_blip(tmp_path / "blip-tiny")
    snaps = []
    for name, ray in (("single", None), ("ray", "local")):
        pipe = Pipeline(db=str(tmp_path / f"{name}.db"), encoder=dict(ENCODER), reranker=str(blip))
        report = pipe.index(data["folder"], progress=False, ray=ray, ray_actors=1 if ray else None)
        assert report.indexed == len(COLORS)
        snaps.append(_snapshot(pipe))
        pipe.close()
    a, b = snaps
    assert a["ids"] == b["ids"] and a["tokens"].keys() == b["tokens"].keys()
    (name,) = [n for n in a["tokens"] if n.startswith("tokens-blip")] or list(a["tokens"])
    assert sorted(a["tokens"][name]) == sorted(b["tokens"][name]) == a["ids"]
    for i, arr in a["tokens"][name].items():
        assert np.allclose(arr.astype(np.float32), b["tokens"][name][i].astype(np.float32), atol=2e-3)


@pytest.mark.slow
def test_videos_beside_images_on_ray_equal_the_single_process_run(ray_instance, milvus_server, tmp_path):
    """Images go to the actors, videos stay in the driver (a video's segments land in one write):
    the collection is the single-process run's, segment rows included."""
    from mm_retrieval.testing.videos import make_video

    folder = tmp_path / "media"
    for i, (name, rgb) in enumerate(list(COLORS.items())[:3]):
        make_image(folder / f"{name}.png", rgb, seed=i)
    make_video(folder / "clip.mp4", [("red", 3), ("blue", 3)])
    single, on_ray = _pipe(milvus_server, "media_single"), _pipe(milvus_server, "media_ray")
    expected = single.index(folder, progress=False).to_dict()
    got = on_ray.index(folder, progress=False, ray="local", ray_actors=1).to_dict()
    for doc in (expected, got):
        doc.pop("seconds"), doc.pop("ray", None)
    assert got == expected and got["video"]["indexed_videos"] == 1 and got["video"]["segments"] >= 1
    a, b = _snapshot(single), _snapshot(on_ray)
    assert a["ids"] == b["ids"] and len(a["ids"]) == 3 + got["video"]["segments"]
    fields = ["id", "media_id", "start", "end", "frame", "segments"]
    assert sorted(map(sorted, (r.items() for r in single.store.get(a["ids"], fields)))) == sorted(
        map(sorted, (r.items() for r in on_ray.store.get(b["ids"], fields))))
    for i in a["ids"]:
        np.testing.assert_allclose(a["rows"][i]["vector"], b["rows"][i]["vector"], atol=1e-5)


@pytest.mark.slow
def test_sync_on_ray_equals_sync_in_one_process(ray_instance, milvus_server, tmp_path, capsys):
    """`mmr sync --ray`: new files encoded on the actors, a deleted file's entry removed; the
    collection equals a single-process sync's."""
    names = list(COLORS.items())
    folder = tmp_path / "photos"
    for i, (name, rgb) in enumerate(names[:3]):
        make_image(folder / f"{name}.png", rgb, seed=i)
    single, on_ray = _pipe(milvus_server, "sync_single"), _pipe(milvus_server, "sync_ray")
    single.index(folder, progress=False), on_ray.index(folder, progress=False)
    (folder / f"{names[0][0]}.png").unlink()
    make_image(folder / f"{names[3][0]}.png", names[3][1], seed=3)
    assert single.sync(folder, progress=False).to_dict()["removed"] == 1
    from mm_retrieval.cli import main

    capsys.readouterr()
    code = main(["sync", str(folder), "--db", milvus_server, "--collection", "sync_ray", "--model", TINY["model"],
                 "--pretrained", TINY["pretrained"], "--ray", ray_instance, "--ray-actors", "1", "--json", "--no-progress"])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    doc = json.loads(out.out)
    assert (doc["indexed"], doc["removed"], doc["unchanged"]) == (1, 1, 2) and doc["ray"]["actors"] == 1
    a, b = _snapshot(single), _snapshot(on_ray)
    assert a["ids"] == b["ids"] and a["tokens"].keys() == b["tokens"].keys()
    for i in a["ids"]:
        np.testing.assert_allclose(a["rows"][i]["vector"], b["rows"][i]["vector"], atol=1e-5)
