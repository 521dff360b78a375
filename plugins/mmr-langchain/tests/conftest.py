"""The repository's shared fixtures (tests/fixtures.py) for this plugin's tests."""

from tests.fixtures import *  # noqa: F401,F403
