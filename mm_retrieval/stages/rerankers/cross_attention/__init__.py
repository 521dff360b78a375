"""Reranker ``cross_attention``: the query's text tokens attend to each candidate's cached image
tokens, on top of the first stage's score.

* :mod:`.stage` -- the stage (:class:`CrossAttentionReranker`): token cache, scoring, attention maps;
* :mod:`.model` -- the torch model (no I/O);
* :mod:`.checkpoint` -- saving and loading it (safetensors + JSON).

Importing this package is cheap: torch loads when the stage warms up.
"""

from __future__ import annotations

from .stage import CrossAttentionConfig, CrossAttentionReranker

__all__ = ["CrossAttentionConfig", "CrossAttentionReranker"]
