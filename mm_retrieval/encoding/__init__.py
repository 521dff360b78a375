"""The encoding engine of index runs: image and video files in, one result per file out.

Between the stage contracts (:mod:`mm_retrieval.stages.base`, which know nothing of files or
torch) and what writes (:mod:`mm_retrieval.indexing`, :mod:`mm_retrieval.backfill`,
:mod:`mm_retrieval.distributed`'s actors):

- :class:`ImageEncoding`: what is computed of each image, decided once (the encoder's embedding;
  no tokens, the encoder's patch tokens, or a reranker's own image side's), and the decoding
  workers' transform built once;
- :func:`encode_files`: image files, decoded in worker processes (:mod:`mm_retrieval.workers`)
  while the model encodes, yielded as batches of :class:`EncodedFile` (item, vector, tokens);
  :class:`EncodeBatches` is its protocol (Ray's actors implement it too);
- :func:`encode_videos` / :func:`segment_tokens`: video files, sampled, encoded and segmented;
- :func:`decode_workers` / :func:`indexing_threads`: the split of the cores between decoding
  processes and torch threads.
"""

from __future__ import annotations

from .images import EncodeBatches, EncodedFile, encode_files, per_file
from .side import ImageEncoding
from .threads import cpu_threads, decode_workers, indexing_threads
from .videos import EncodedVideo, encode_videos, segment_tokens

__all__ = [
    "EncodeBatches", "EncodedFile", "EncodedVideo", "ImageEncoding", "cpu_threads", "decode_workers", "encode_files",
    "encode_videos", "indexing_threads", "per_file", "segment_tokens",
]
