import json
import subprocess
import sys

import pytest

from mm_retrieval import registry
from mm_retrieval.errors import ConfigError, UnknownStageError
from mm_retrieval.stages.base import Source


def test_builtins_are_found_through_entry_points():
    names = {(e.kind, e.name): e for e in registry.list_stages(load=False)}
    for key in [("source", "folder"), ("source", "table"), ("encoder", "open_clip"), ("store", "milvus")]:
        assert key in names and names[key].origin == "builtin"


def test_unknown_name_lists_known_names():
    with pytest.raises(UnknownStageError) as e:
        registry.get("store", "elastic")
    assert "milvus" in str(e.value) and "mmr plugins" in str(e.value)


def test_unknown_kind():
    with pytest.raises(ConfigError, match="kinds are"):
        registry.get("widget", "x")


def test_decorator_registration():
    @registry.register("source", "test_inline")
    class Inline(Source):
        def records(self):
            return iter(())

    assert registry.get("source", "test_inline") is Inline
    assert "test_inline" in registry.names("source")


# The entry-point path, through a real installed distribution (tests/plugin_fixture, installed by
# the README's test command). Run in a subprocess so this process's registry state can't help.
def _plugins_json():
    out = subprocess.run([sys.executable, "-m", "mm_retrieval", "plugins", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_installed_plugin_stages_and_broken_plugin_reported():
    doc = _plugins_json()
    stages = {(s["kind"], s["name"]): s for s in doc["stages"]}
    assert ("source", "listing") in stages, "install the test plugin: pip install ./tests/plugin_fixture"
    assert stages[("source", "listing")]["origin"] == "mmr-test-plugin"
    assert stages[("source", "listing")]["error"] is None
    assert stages[("reranker", "reverse")]["origin"] == "mmr-test-plugin"  # module-form plugin
    broken = stages[("encoder", "broken")]
    assert "broken on purpose" in broken["error"]
    assert stages[("encoder", "open_clip")]["error"] is None  # the others still load


def test_broken_plugin_error_when_asked_for():
    with pytest.raises(ConfigError, match="failed to load.*broken on purpose"):
        registry.get("encoder", "broken")


def test_plugin_source_runs_in_pipeline(tmp_path, image_folder):
    listing = tmp_path / "list.txt"
    files = sorted(p.relative_to(tmp_path) for p in image_folder.rglob("*.png"))[:3]
    listing.write_text("\n".join(str(f) for f in files))
    src = registry.create("source", "listing", {"path": str(listing)})
    assert [r.path for r in src.records()] == [(tmp_path / f).resolve() for f in files]
