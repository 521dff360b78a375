"""Encoding image files: read, hash and decode in worker processes, encode here, one result per file."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from .side import ImageEncoding
from .threads import cpu_threads, decode_workers, workers_died


class EncodedFile(NamedTuple):
    """One file of a batch: the decoding worker's ``item`` (:class:`~mm_retrieval.decode.DecodedItem`:
    ``pos``, ``path``, ``id``, ``error``, ``known``...) and, when it was decoded, its ``vector`` [D]
    and ``tokens`` [P, W] (None without tokens); both None for a known or unreadable file."""

    item: Any
    vector: np.ndarray | None
    tokens: np.ndarray | None


class EncodeBatches(Protocol):
    """What turns image files into vectors for an index run: :func:`encode_files` in this process,
    or encoder actors on a Ray cluster (:class:`mm_retrieval.distributed.RayEncodeBatches`), same
    output either way: batches (lists) of :class:`EncodedFile`, every path once."""

    def __call__(self, encoding: ImageEncoding, paths: list[str], *,
                 known_ids: frozenset[str] = ...) -> Iterator[list[EncodedFile]]: ...


def per_file(items: Sequence[Any], vectors: Any, tokens: Any) -> list[EncodedFile]:
    """A batch as the encoder returns it (``vectors[j]``, ``tokens[j]``: the j-th *decoded* item's)
    -> one :class:`EncodedFile` per item, in the items' order."""
    out, j = [], 0
    for it in items:
        if it.decoded:
            out.append(EncodedFile(it, vectors[j], None if tokens is None else tokens[j]))
            j += 1
        else:
            out.append(EncodedFile(it, None, None))
    return out


def encode_files(encoding: ImageEncoding, paths: list[str], *,
                 known_ids: frozenset[str] = frozenset()) -> Iterator[list[EncodedFile]]:
    """Read, hash, decode and encode image files, decoding in DataLoader workers so that it
    overlaps the forward pass. Yields each batch (the encoder's ``batch_size`` files) as one
    :class:`EncodedFile` per path; ``known_ids``: ids already indexed, whose files are hashed, not
    decoded. What is computed of each image (tokens or not, whose) is ``encoding``'s.

    Workers (the encoder's ``workers``) are forked from this process's fork server, not from this
    process, and die with it (:mod:`mm_retrieval.workers`: a worker forked from the run inherited
    the open database and write lock). The server is started once per process, by the first call
    that needs workers; files that fit in one batch, which workers could not overlap with anything,
    are decoded here (so a small run starts no process). As with ``spawn``, a script that indexes
    with workers must guard its entry point with ``if __name__ == "__main__":``.
    """
    from torch.utils.data import DataLoader

    from ..decode import ImageFileDataset, collate_items
    from ..workers import worker_context

    encoder = encoding.encoder
    workers = decode_workers(encoder, len(paths))
    context = worker_context() if workers else None  # first: the fork server imports while the model loads
    encoder.warm_up()
    # On a CPU the workers send uint8 crops and the batch is normalised here, vectorised: a quarter of
    # the bytes through shared memory (on CUDA the float batch is pinned for the copy instead).
    on_cpu = str(encoder.device) == "cpu"
    dataset = ImageFileDataset(paths, encoding.transform, known_ids=known_ids, max_pixels=encoder.max_pixels,
                               uint8=on_cpu)
    loader = DataLoader(
        dataset,
        batch_size=encoder.batch_size,
        num_workers=workers,
        collate_fn=collate_items,
        prefetch_factor=4 if workers else None,
        pin_memory=str(encoder.device).startswith("cuda"),
        multiprocessing_context=context,
    )
    with cpu_threads(encoder, workers):
        try:
            batches = iter(loader)  # starts the workers
        except (OSError, EOFError) as e:  # the fork server died before forking them
            raise workers_died(encoder, e) from e
        try:
            for items, pixels in batches:
                if pixels is None:
                    yield per_file(items, None, None)
                else:
                    yield per_file(items, *encoding.encode(dataset.to_float(pixels)))
        except RuntimeError as e:
            if "DataLoader worker" not in str(e):
                raise
            raise workers_died(encoder, e) from e
