"""Rerankers, one folder each (``cross_attention/``, ...): the stage with its model and
checkpoint code, all implementing :class:`mm_retrieval.stages.base.Reranker`."""
