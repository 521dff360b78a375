"""`mmr cache info` / `mmr cache build`: the token cache a collection indexed without tokens lacks."""

import json

from mm_retrieval import Pipeline
from mm_retrieval.cli import main
from tests.helpers import COLORS, TINY


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_cache_build_fills_what_an_index_without_tokens_left_out(tmp_path, image_folder, capsys):
    db = str(tmp_path / "mmr.db")
    Pipeline(db=db, encoder={**TINY, "workers": 0}, cache_tokens=False).index(image_folder, progress=False)
    assert main(["cache", "info", "--db", db, "--json"]) == 0
    assert _json(capsys)["caches"] == []

    assert main(["cache", "build", "--db", db, "--json", "--no-progress"]) == 0
    built = _json(capsys)
    assert (built["encoded"], built["from_raw_tokens"], built["items"], built["failed"]) == (len(COLORS), 0, len(COLORS), [])

    assert main(["cache", "info", "--db", db, "--json"]) == 0
    caches = _json(capsys)["caches"]
    assert [(c["fingerprint"], c["items"]) for c in caches] == [(built["fingerprint"], len(COLORS))]
    assert main(["cache", "build", "--db", db, "--json", "--no-progress"]) == 0
    assert _json(capsys)["encoded"] == 0  # nothing left to do


def test_cache_build_of_a_missing_collection_creates_no_cache(tmp_path, capsys):
    db = tmp_path / "mmr.db"
    assert main(["cache", "build", "--db", str(db), "--collection", "nope", "--model", "mmr-tiny", "--pretrained", "none"]) != 0
    assert "collection 'nope' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "mmr.db.mmr" / "nope").exists()


def test_cache_info_shows_free_slots_and_compact_gives_them_back(tmp_path, image_folder, capsys):
    from mm_retrieval.tokencache import purge

    db = str(tmp_path / "mmr.db")
    with Pipeline(db=db, encoder={**TINY, "workers": 0}) as pipe:
        pipe.index(image_folder, progress=False)
        ids = [r["id"] for r in pipe.store.iter_rows(("id",))]
        purge(pipe.store.cache_dir(), ids[:3])  # what `mmr sync` does for removed files
    assert main(["cache", "info", "--db", db, "--json"]) == 0
    (c,) = _json(capsys)["caches"]
    s = c["slots"]
    assert (s["live_slots"], s["free_slots"], c["items"]) == (len(COLORS) - 3, 3, len(COLORS) - 3)
    assert s["free_bytes"] == 3 * c["bytes_per_item"] and s["live_bytes"] == (len(COLORS) - 3) * c["bytes_per_item"]
    assert main(["cache", "info", "--db", db]) == 0
    assert f"slots: {len(COLORS) - 3} live ({s['live_bytes']:,} B), 3 free ({s['free_bytes']:,} B" in capsys.readouterr().out

    assert main(["cache", "compact", "--db", db, "--json"]) == 0
    (done,) = _json(capsys)["caches"]
    assert done["compacted"] and done["bytes_after"] < done["bytes_before"] and done["dropped"] == 0
    assert main(["cache", "info", "--db", db, "--json"]) == 0
    (after,) = _json(capsys)["caches"]
    assert (after["slots"]["live_slots"], after["slots"]["free_slots"]) == (len(COLORS) - 3, 0)
