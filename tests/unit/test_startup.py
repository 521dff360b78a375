"""`mmr --help`, `mmr plugins` and `mmr COMMAND --help` stay cheap: they import neither torch nor
open_clip (seconds each) nor the Milvus client. Checked in a fresh interpreter, for every command
the CLI has, so a new command or a module-level import added anywhere on the way is caught."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "torchvision", "open_clip", "transformers", "pymilvus", "milvus_lite")

# Runs every cheap invocation in one fresh interpreter; after each, lists the heavy modules loaded
# so far (the first invocation that loads one is the culprit).
PROBE = """
import contextlib, io, json, sys

import click

from mm_retrieval.cli import cli, main

def commands(group, prefix=()):
    for name, cmd in sorted(group.commands.items()):
        yield (*prefix, name)
        if isinstance(cmd, click.Group):
            yield from commands(cmd, (*prefix, name))

heavy = json.loads(sys.argv[1])
report = []
for argv in [["--help"], ["--version"], ["plugins"], ["plugins", "--json"], *[[*c, "--help"] for c in commands(cli)]]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    report.append({"argv": argv, "code": code, "output": len(out.getvalue() + err.getvalue()),
                   "heavy": sorted(m for m in heavy if m in sys.modules)})
print(json.dumps(report))
"""


def test_help_and_plugins_import_no_heavy_module():
    run = subprocess.run([sys.executable, "-c", PROBE, json.dumps(HEAVY)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    argvs = [r["argv"] for r in report]
    assert ["index", "--help"] in argvs and ["serve", "--help"] in argvs and ["cache", "build", "--help"] in argvs
    for r in report:
        assert r["code"] == 0 and r["output"] > 0, r  # each one really ran and printed something
    first = next((r for r in report if r["heavy"]), None)
    assert first is None, f"`mmr {' '.join(first['argv'])}` imports {first['heavy']}"
