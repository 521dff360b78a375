"""The shared fixtures (tests/fixtures.py) for every test under tests/."""

from tests.fixtures import *  # noqa: F401,F403


def pytest_sessionstart(session):
    """Fail the whole run at once, naming the package, when the test extra is not fully installed
    (say an extra spelled in a way the installing pip does not match), rather than let every test
    behind it fail on its own."""
    import pytest

    missing = _missing_test_requirements()
    if missing:
        pytest.exit("the test extra is not fully installed (run the README's test command):\n  "
                    + "\n  ".join(missing), returncode=4)


def _missing_test_requirements() -> list[str]:
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return missing_requirements(
        tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"])


def missing_requirements(wanted: list[str]) -> list[str]:
    """Each of these requirements, and of the extras they name (pymilvus[bulk-writer] -> minio, ...),
    that is not installed at a version it allows."""
    from importlib import metadata

    from packaging.requirements import Requirement

    missing, todo = [], [(Requirement(line), "") for line in wanted]
    while todo:
        req, via = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": via}):
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(f"{req}{' (for ' + via + ')' if via else ''}: not installed")
            continue
        if not req.specifier.contains(have, prereleases=True):
            missing.append(f"{req}: {have} is installed")
        for extra in req.extras:
            todo += [(Requirement(dep), extra) for dep in metadata.requires(req.name) or []
                     if Requirement(dep).marker and Requirement(dep).marker.evaluate({"extra": extra})]
    return missing
