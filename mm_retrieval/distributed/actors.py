"""The encoder actor: what each member of the Ray actor pool runs (``map_batches`` callable class).

An actor builds its stages once, from their specs (``{"name": ..., **config}``, what
:meth:`Stage.to_dict` gives), and then for each batch of ``(pos, path)`` rows reads, hashes,
decodes and encodes exactly as :func:`~mm_retrieval.encoding.encode_files` does in one
process (the same :class:`~mm_retrieval.decode.ImageFileDataset` items, so a bad file gets the
same reason, and the same :class:`~mm_retrieval.encoding.ImageEncoding`). It returns one Arrow row per file: the item's fields, its vector and its tokens
as bytes (flattened, with shape and dtype). It writes nothing anywhere: the driver does.

A stage that fails to load does not kill the actor (Ray would log a dead actor's traceback and
retry); the error is kept and raised, tagged, on the first batch, so the run stops at once with
the stage's own message (:func:`actor_error`).
"""

from __future__ import annotations

import json
import os
import re
import socket
from typing import Any

from .. import failpoints

#: Tags around an actor's error message, so the driver finds it inside Ray's wrapping.
_OPEN, _CLOSE = "<<mmr-actor:", ":mmr-actor>>"
_TAGGED = re.compile(re.escape(_OPEN) + r"(.*?)" + re.escape(_CLOSE), re.S)


class ActorError(RuntimeError):
    """Raised in an actor with a tagged message ``label|text`` (see :func:`actor_error`)."""

    def __init__(self, label: str, text: str):
        super().__init__(f"{_OPEN}{label}|{text}{_CLOSE}")


def actor_error(e: BaseException) -> tuple[str, str] | None:
    """(stage label, message) of the first tagged actor error in ``e``, its causes or its text."""
    seen = 0
    while e is not None and seen < 10:
        m = _TAGGED.search(str(e))
        if m:
            label, _, text = m.group(1).partition("|")
            return label, text
        e, seen = e.__cause__ or e.__context__, seen + 1  # type: ignore[assignment]
    return None


def stage_spec(stage: Any) -> dict[str, Any]:
    """What an actor rebuilds ``stage`` from: its config (:meth:`Stage.to_dict`) and its class."""
    cls = type(stage)
    return {**stage.to_dict(), "_class": f"{cls.__module__}:{cls.__qualname__}"}


def build_stage(kind: str, spec: dict[str, Any]) -> Any:
    """The stage ``spec`` (from :func:`stage_spec`) describes: its class imported by module path,
    so a stage the driver registered at run time (or whose entry point this node's install lacks)
    loads too; else by registered name."""
    import importlib

    from .. import registry

    params = dict(spec)
    name, ref = params.pop("name"), params.pop("_class", None)
    if ref is None:
        return registry.create(kind, name, params)
    module, _, qualname = ref.partition(":")
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    return cls(params)


class EncoderActor:
    """Encodes batches of image files on one Ray worker (CPU or one GPU)."""

    def __init__(self, encoder_spec: dict[str, Any], side_spec: dict[str, Any] | None, known_ids: Any,
                 tokens: bool, threads: int, decode_threads: int = 0, env: dict[str, str] | None = None):
        """``known_ids``: a Ray object ref to the frozenset of ids already indexed (hashed, not
        decoded); ``tokens``: compute each image's tokens (the image side's with ``side_spec``,
        else the encoder's); ``threads``: torch threads on a CPU actor (0: leave them); ``decode_threads``:
        threads reading and decoding a batch's files (a GPU actor; 0: one after the other);
        ``env``: the driver's variables this actor needs (set before any model code is imported;
        a Ray ``runtime_env`` would do it too, at the cost of a fresh worker pool per run)."""
        if env:
            os.environ.update(env)
            failpoints.rearm()
        self.pool = None
        if decode_threads > 0:  # PIL releases the GIL while it decodes: threads keep a GPU fed
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="mmr-decode")
        self.host = socket.gethostname()
        self.label = f"encoder/{encoder_spec.get('name', '?')}"
        self.error: str | None = None
        try:
            self._start(encoder_spec, side_spec, known_ids, tokens, threads)
        except Exception as e:  # kept for the first batch (see the module docstring)
            self.error = f"a Ray encoder actor on {self.host} (pid {os.getpid()}) could not load its model: {_reason(e)}"

    def _start(self, encoder_spec: dict[str, Any], side_spec: dict[str, Any] | None, known_ids: Any,
               tokens: bool, threads: int) -> None:
        import ray
        import torch

        from ..encoding import ImageEncoding

        if threads > 0:
            torch.set_num_threads(threads)
        self.encoder = build_stage("encoder", encoder_spec)
        self.label = self.encoder.label
        self.encoder.warm_up()
        side = None
        if side_spec is not None:
            self.label = f"reranker/{side_spec.get('name', '?')}"
            side = build_stage("reranker", side_spec).image_side()
            self.label = self.encoder.label
        self.encoding = ImageEncoding(self.encoder, tokens=tokens, image_side=side)
        self.known_ids = known_ids if isinstance(known_ids, frozenset) else ray.get(known_ids)

    def __call__(self, batch: Any) -> Any:
        """A pyarrow table of ``pos``, ``path`` rows -> the table described in the module docstring."""
        if self.error is not None:
            raise ActorError(self.label, self.error)
        failpoints.hit("ray_actor_batch")  # tests: SIGKILL this actor process mid-run (see failpoints)
        try:
            return self._encode(batch)
        except Exception as e:
            raise ActorError(self.label, f"a Ray encoder actor on {self.host} failed: {_reason(e)}") from e


    def _encode(self, batch: Any) -> Any:
        import numpy as np
        import pyarrow as pa

        from ..decode import ImageFileDataset, collate_items
        from ..encoding import per_file

        pos = batch.column("pos").to_pylist()
        paths = batch.column("path").to_pylist()
        dataset = ImageFileDataset(paths, self.encoding.transform, known_ids=self.known_ids, max_pixels=self.encoder.max_pixels)
        if self.pool is not None:
            items = list(self.pool.map(dataset.__getitem__, range(len(paths))))
        else:
            items = [dataset[i] for i in range(len(paths))]
        items, pixels = collate_items(items)
        files = per_file(items, None, None) if pixels is None else per_file(items, *self.encoding.encode(pixels))
        vectors: list[bytes | None] = []
        toks: list[bytes | None] = []
        shapes: list[list[int] | None] = []
        dtypes: list[str | None] = []
        for _, vector, tokens in files:
            vectors.append(None if vector is None else np.ascontiguousarray(vector, dtype=np.float32).tobytes())
            t = None if tokens is None else np.ascontiguousarray(np.asarray(tokens))
            toks.append(None if t is None else t.tobytes())
            shapes.append(None if t is None else list(t.shape))
            dtypes.append(None if t is None else str(t.dtype))
        return pa.table({
            "pos": pa.array([pos[it.pos] for it in items], pa.int64()),
            "path": pa.array([it.path for it in items], pa.string()),
            "id": pa.array([it.id for it in items], pa.string()),
            "digest": pa.array([it.digest for it in items], pa.string()),
            "known": pa.array([it.known for it in items], pa.bool_()),
            "decoded": pa.array([it.decoded for it in items], pa.bool_()),
            "error": pa.array([it.error for it in items], pa.string()),
            "meta": pa.array([json.dumps(it.meta) for it in items], pa.string()),  # the file's own metadata
            "vector": pa.array(vectors, pa.binary()),
            "tokens": pa.array(toks, pa.binary()),
            "token_shape": pa.array(shapes, pa.list_(pa.int64())),
            "token_dtype": pa.array(dtypes, pa.string()),
        })


def _reason(e: BaseException) -> str:
    """``e`` as one message: an mm_retrieval error as it reads (a StageError without its own
    ``[stage]`` prefix, which the driver's StageError adds again), anything else with its type."""
    from ..errors import MMRError, StageError

    if isinstance(e, StageError):
        return str(e).removeprefix(f"[{e.stage}] ")
    return str(e) if isinstance(e, MMRError) else f"{type(e).__name__}: {e}"
