"""Reranker ``blip_itm``: BLIP's image-text matching (``transformers.BlipForImageTextRetrieval``)
over vision tokens cached at index time.

``load`` finds and loads a checkpoint (hub id or local directory), ``image`` is BLIP's image side
(preprocessing + vision transformer, run at index time), ``storage`` the cached token formats
(fp32, fp16, int8 with a per-token scale), ``text`` the query side's tokenisation, ``itm`` the
text encoder + ITM head over cached tokens (cross-attention keys and values folded into the query
for short queries), ``stage`` the stage itself. Importing this package does not import torch or transformers.
"""

from __future__ import annotations

from .load import looks_like_blip
from .stage import BlipItmConfig, BlipItmReranker

__all__ = ["BlipItmConfig", "BlipItmReranker", "looks_like_blip"]
