"""Tiny open_clip model configs (``mmr-*``) shipped for tests and demos; see :mod:`.tiny`.

Rerankers keep their torch models in their own folders (``stages/rerankers/<name>/``).
"""
