"""mm_retrieval: multimodal search with CLIP-style dual encoders in Milvus and a cross-attention reranker.

The Python API mirrors the CLI::

    from mm_retrieval import Pipeline
    pipe = Pipeline(db="./mmr.db")
    pipe.index("photos/")
    result = pipe.search("a red bicycle", k=5)
"""

import os

# Milvus Lite serves gRPC in-process; keep gRPC core's informational lines off stderr (decoding
# workers are not forked from this process: see mm_retrieval.workers).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

__version__ = "0.1.0"

__all__ = ["Pipeline", "PipelineConfig", "StageSpec", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import mm_retrieval` (and `mmr --help`) stays fast.
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    if name in ("PipelineConfig", "StageSpec"):
        from . import config

        return getattr(config, name)
    raise AttributeError(name)
