"""The shared fixtures (tests/fixtures.py) for every test under tests/."""

from tests.fixtures import *  # noqa: F401,F403
