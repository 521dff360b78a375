"""Helpers for tests and plugin authors: tiny checkpoints, fakes and contract tests."""
