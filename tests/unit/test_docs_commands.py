"""docs/commands.md is every command's --help, generated: this test fails when the CLI and the page
disagree. Rewrite the page after changing the CLI:

    MMR_WRITE_DOCS=1 .venv/bin/python -m pytest tests/unit/test_docs_commands.py
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from mm_retrieval.cli import cli

PAGE = Path(__file__).resolve().parents[2] / "docs" / "commands.md"
HEADER = """# Every command's `--help`

Generated from the command line itself (`tests/unit/test_docs_commands.py` checks it on every test
run; `MMR_WRITE_DOCS=1 .venv/bin/python -m pytest tests/unit/test_docs_commands.py` rewrites it).
"""


def _commands(group: click.Group, path: list[str]):
    ctx = click.Context(group, info_name=path[-1])
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        yield [*path, name], cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, [*path, name])


def _help(path: list[str], cmd: click.Command) -> str:
    # Contexts made as `mmr a b --help` makes them (the group's context_settings, inherited), so
    # the page does not depend on which command ran first in this process (click caches each
    # command's help option on first use).
    ctx = click.Context(cli, info_name=path[0], terminal_width=100, **cli.context_settings)
    for name in path[1:]:
        sub = ctx.command.get_command(ctx, name)
        ctx = click.Context(sub, info_name=name, parent=ctx, **sub.context_settings)
    assert ctx.command is cmd
    return cmd.get_help(ctx)


def render() -> str:
    parts = [HEADER, "## `mmr`\n\n```text\n" + _help(["mmr"], cli) + "\n```\n"]
    for path, cmd in _commands(cli, ["mmr"]):
        parts.append(f"## `{' '.join(path)}`\n\n```text\n{_help(path, cmd)}\n```\n")
    return "\n".join(parts)


def test_the_commands_page_is_the_cli_help():
    page = render()
    if os.environ.get("MMR_WRITE_DOCS"):
        PAGE.parent.mkdir(exist_ok=True)
        PAGE.write_text(page)
    assert PAGE.read_text() == page, (
        "docs/commands.md is out of date: MMR_WRITE_DOCS=1 .venv/bin/python -m pytest tests/unit/test_docs_commands.py")


def test_the_page_has_every_command():
    text = PAGE.read_text()
    missing = [" ".join(path) for path, _ in _commands(cli, ["mmr"]) if f"## `{' '.join(path)}`" not in text]
    assert missing == []
