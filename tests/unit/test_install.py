"""What a fresh install gets: extras spelled as their packages publish them, a lock that covers and
satisfies pyproject.toml, and the README's commands using that lock."""

from __future__ import annotations

import re
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LOCK = ROOT / ".ci" / "constraints.txt"
LOWEST = ROOT / ".ci" / "constraints-lowest.txt"


def _requirements(extras: tuple[str, ...] = ("test", "ray", "bulk", "ocr")) -> list[Requirement]:
    lines = list(PYPROJECT["dependencies"])
    for extra in extras:
        lines += PYPROJECT["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def _pins(path: Path) -> dict[str, list[Requirement]]:
    """name -> the lock's pins (one per Python-version split), markers kept."""
    pins: dict[str, list[Requirement]] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins.setdefault(canonicalize_name(req.name), []).append(req)
    return pins


def _version(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req} is not a pin"
    return spec.version


def test_extras_are_spelled_as_their_packages_publish_them():
    # pip 23 (what `python3 -m venv` brings on Python 3.11 and 3.12) matches extra names as written: a
    # spelling the package does not publish installs nothing of it, with only a warning.
    wrong = []
    for req in _requirements():
        if not req.extras:
            continue
        try:
            published = set(metadata.metadata(req.name).get_all("Provides-Extra") or [])
        except metadata.PackageNotFoundError:
            continue
        wrong += [f"{req.name}[{extra}] (published: {sorted(published)})"
                  for extra in req.extras if extra not in published]
    assert wrong == []


def test_the_lock_pins_every_direct_dependency_within_its_bounds():
    pins = _pins(LOCK)
    missing = [str(r) for r in _requirements() if canonicalize_name(r.name) not in pins]
    outside = [f"{pin} vs {req}" for req in _requirements()
               for pin in pins.get(canonicalize_name(req.name), [])
               if not req.specifier.contains(_version(pin), prereleases=True)]
    assert missing == [] and outside == []


def test_the_lowest_lock_holds_the_stated_lower_bounds():
    # What `MMR_DEPS=lowest bash .ci/run` tests: each direct dependency's floor, as pyproject says it.
    pins = _pins(LOWEST)
    wrong = []
    for req in _requirements(extras=()):
        floors = [s.version for s in req.specifier if s.operator == ">="]
        got = [_version(p) for p in pins.get(canonicalize_name(req.name), [])]
        if floors and Version(floors[0]) not in [Version(v) for v in got]:
            wrong.append(f"{req}: lowest lock has {got}")
    assert wrong == []


def test_the_installed_environment_is_the_lock():
    # The README's commands install with -c .ci/constraints.txt: what runs the tests is what is locked.
    off = []
    for name, pins in _pins(LOCK).items():
        for pin in pins:
            if pin.marker and not pin.marker.evaluate():
                continue
            try:
                have = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue  # platform-only pins (e.g. CUDA libraries beside a CPU build of torch)
            if have.split("+")[0] != _version(pin):
                off.append(f"{name} {have} (lock: {_version(pin)})")
    assert off == [], "refresh the venv: the README's test command installs with -c .ci/constraints.txt"


def test_readme_commands_use_the_lock_and_its_torch():
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in quick.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2 and all("-c .ci/constraints.txt" in c for c in commands)
    pins = _pins(LOCK)
    for name in ("torch", "torchvision"):
        assert f"{name}=={_version(pins[name][0])}" in text, f"README's CPU-only line names another {name}"


def test_ci_runs_the_readme_commands_as_written():
    # .ci/run reads the commands out of the README rather than keeping copies of its own.
    script = (ROOT / ".ci" / "run").read_text()
    own = [line for line in script.splitlines()
           if re.search(r"\bpip\b", line) and not line.lstrip().startswith("#") and "readme_command" not in line]
    assert own == []
    out = subprocess.run(
        ["bash", "-c", 'cd "$1" && eval "$(sed -n "/^readme_command()/,/^}/p" .ci/run)" && '
                       'readme_command ".venv/bin/pip install"', "_", str(ROOT)],
        capture_output=True, text=True, check=True).stdout.strip()
    assert out in (ROOT / "README.md").read_text() and out.endswith("python -m pytest")


def test_a_missing_extra_package_is_named():
    from tests.conftest import missing_requirements

    assert missing_requirements(["pymilvus[bulk-writer]", "packaging"]) == []
    got = missing_requirements(["no-such-package-mmr>=1", "packaging>=999"])
    assert got == ["packaging>=999: " + metadata.version("packaging") + " is installed",
                   "no-such-package-mmr>=1: not installed"]
