"""`mmr sync`: add new, replace changed, remove gone; --dry-run changes nothing."""

import json

from mm_retrieval import Pipeline
from mm_retrieval.cli import main
from mm_retrieval.tokencache import caches_in, open_existing
from tests.helpers import COLORS, TINY, make_image


def _paths(pipe):
    return sorted(r["path"] for r in pipe.store.iter_rows(("path",)))


def _token_ids(pipe):
    return [set(open_existing(p).ids()) for p in caches_in(pipe.store.cache_dir())]


def test_sync_plan_then_apply(tmp_path, image_folder):
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder={**TINY, "workers": 0})
    pipe.index(image_folder, progress=False)
    other = tmp_path / "elsewhere"
    make_image(other / "keep.png", (1, 1, 1), seed=5)
    pipe.index(other, progress=False)  # outside the synced folder: must be left alone
    before = _paths(pipe)

    (image_folder / "red.png").unlink(missing_ok=True)
    (image_folder / "nested" / "red.png").unlink(missing_ok=True)
    make_image(image_folder / "new.png", (9, 99, 199), seed=42)
    make_image(image_folder / "blue.png", (0, 0, 100), seed=43)  # changed content

    plan = pipe.sync(image_folder, dry_run=True).plan
    assert plan["add"] == [str(image_folder / "new.png")]
    assert plan["check"] == [str(image_folder / "blue.png")]
    assert plan["remove"] == [str(image_folder / "nested" / "red.png")]
    assert _paths(pipe) == before  # a dry run changes nothing

    report = pipe.sync(image_folder, progress=False)
    assert (report.indexed, report.replaced, report.removed) == (2, 1, 1)
    after = _paths(pipe)
    assert str(image_folder / "nested" / "red.png") not in after
    assert str(image_folder / "new.png") in after and str(other / "keep.png") in after
    assert len(after) == len(COLORS) + 1  # -1 removed, +1 new, +1 elsewhere
    ids = {r["id"] for r in pipe.store.iter_rows(("id",))}
    assert all(t == ids for t in _token_ids(pipe))  # removed entries' tokens went too


def test_sync_cli_dry_run_json(tmp_path, image_folder, capsys):
    def run(*args):  # the CLI in this process: its JSON is tested here, not the process
        code = main([*args, "--db", str(tmp_path / "m.db"), "--json"])
        out = capsys.readouterr()
        assert code == 0, out.err[-3000:]
        return json.loads(out.out)

    assert run("index", str(image_folder), "--model", "mmr-tiny", "--pretrained", "none", "--workers", "0")["indexed"] == len(COLORS)
    (image_folder / "green.png").unlink()
    plan = run("sync", str(image_folder), "--dry-run")["plan"]
    assert plan["remove"] == [str(image_folder / "green.png")] and plan["add"] == []


def test_dry_run_reports_entries_it_cannot_use(tmp_path, image_folder):
    """A table row naming a missing file and a row with neither path nor text are in the dry
    run's report, as in the real run's (the source finds its problems while it is read)."""
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder={**TINY, "workers": 0})
    pipe.index(image_folder, progress=False)
    table = image_folder / "list.csv"
    table.write_text("path,caption\ngreen.png,a green one\ngone.png,a file that is not there\n,\n")
    gone = str(image_folder / "gone.png")

    dry = pipe.sync(table, dry_run=True)
    reasons = {f.path: f.error for f in dry.failed}
    assert "No such file" in reasons.pop(gone)
    assert list(reasons.values()) == ["row has neither a path nor text; skipped"]
    assert dry.plan["add"] == [] and dry.plan["check"] == [str(image_folder / "green.png")]  # its caption is new
    assert dry.to_dict()["skipped"] == 2  # `mmr sync --dry-run --json` shows them

    real = pipe.sync(table, progress=False)
    assert [(f.path, f.error) for f in real.failed] == [(f.path, f.error) for f in dry.failed]
    assert real.indexed == 0 and real.removed == len(COLORS) - 1  # only green.png is listed
