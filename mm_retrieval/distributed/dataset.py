"""The Ray Data side of an index run: paths in, batches of one result per file out.

:class:`RayEncodeBatches` has :func:`~mm_retrieval.encoding.encode_files`' signature and
output (the :class:`~mm_retrieval.encoding.EncodeBatches` protocol), so the
:class:`~mm_retrieval.indexing.Indexer` runs unchanged on the driver: it plans, and it writes
every vector, text vector, token cache row and deletion, in its crash-safe order. Only reading,
hashing, decoding and encoding move to the cluster::

    paths --from_arrow (one block per batch)--> map_batches(EncoderActor, ActorPoolStrategy(size=N),
    num_gpus=1 on GPUs) --iter_batches (in order)--> EncodedFiles (rebuilt DecodedItem, vector, tokens)

Results come back in the paths' order (``preserve_order``), so a run's report equals the
single-process run's. A killed actor is restarted by Ray and its batch retried (Ray Data's actor
pools retry system failures without limit); a run that dies anyway resumes by re-running it,
like any index run.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..encoding import EncodedFile, ImageEncoding
from ..errors import InputError, StageError
from ..stages.base import Encoder
from .actors import EncoderActor, actor_error, stage_spec
from .connect import RayCluster

log = logging.getLogger(__name__)

#: Environment variables the actors get from the driver (failpoints for tests; offline switches).
FORWARDED_ENV = ("MMR_FAILPOINTS", "MMR_FAILPOINT_ONCE_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
#: Seconds the actor pool may take to start (model download included) before the run fails.
ACTOR_START_TIMEOUT_S = 900


def default_actors(cluster: RayCluster, use_gpu: bool) -> int:
    """One actor per GPU on a GPU cluster, else one per 4 CPUs (at least one)."""
    return max(1, cluster.gpus if use_gpu else cluster.cpus // 4)


class RayEncodeBatches:
    """Encode image files on a pool of Ray actors (see the module docstring).

    ``encoder``: the driver's encoder (its spec, device aside, builds each actor's copy);
    ``side_spec``: the reranker's spec (:func:`~.actors.stage_spec`) when index runs feed its own
    image side (BLIP), else None;
    ``actors``: pool size (default :func:`default_actors`).
    """

    def __init__(self, cluster: RayCluster, encoder: Encoder, *, actors: int | None = None, side_spec: dict[str, Any] | None = None):
        if actors is not None and actors < 1:
            raise InputError(f"--ray-actors must be at least 1, got {actors}")
        self.cluster = cluster
        self.side_spec = side_spec
        cfg = encoder.config
        device = str(getattr(cfg, "device", "cpu") or "cpu")
        if device.startswith("cuda") and cluster.gpus == 0:
            raise InputError(f"--device {device} with --ray: the Ray cluster at {cluster.address} has no GPU; use --device cpu or auto")
        self.use_gpu = cluster.gpus > 0 and device in ("auto", "cuda") or device.startswith("cuda")
        self.actors = actors if actors is not None else default_actors(cluster, self.use_gpu)
        if self.use_gpu and self.actors > cluster.gpus:
            raise InputError(f"--ray-actors {self.actors}: each actor takes one GPU and the cluster has {cluster.gpus}")
        self.decode_threads = encoder.workers if self.use_gpu else 0
        if self.use_gpu:  # its decoding threads' CPUs, where the cluster has them
            self.cpus_per_actor = float(max(1, min(self.decode_threads, cluster.cpus // self.actors, int(cluster.max_node_cpus) or 1)))
        else:
            if self.actors > cluster.cpus:
                raise InputError(f"--ray-actors {self.actors}: each actor takes at least one CPU and the cluster has {cluster.cpus}")
            self.cpus_per_actor = float(max(1, min(cluster.cpus // self.actors, int(cluster.max_node_cpus) or 1)))
        self.batch_size = encoder.batch_size
        spec = stage_spec(encoder)
        if "device" in spec:  # each actor sees only its own GPU (CUDA_VISIBLE_DEVICES), as cuda:0
            spec["device"] = "cuda" if self.use_gpu else "cpu"
        self.encoder_spec = spec
        self.label = encoder.label

    def describe(self) -> dict[str, Any]:
        """The ``"ray"`` section of ``mmr index --json``."""
        return {
            "address": self.cluster.address, "actors": self.actors, "gpus_per_actor": 1 if self.use_gpu else 0,
            "cpus_per_actor": self.cpus_per_actor, "decode_threads": self.decode_threads, "batch_size": self.batch_size,
            "cluster": {"cpus": self.cluster.cpus, "gpus": self.cluster.gpus},
        }

    def __call__(self, encoding: ImageEncoding, paths: list[str], *,
                 known_ids: frozenset[str] = frozenset()) -> Iterator[list[EncodedFile]]:
        """What :func:`~mm_retrieval.encoding.encode_files` yields, computed by the actors: each
        rebuilds ``encoding`` (the encoder from its spec, the image side from the reranker's)."""
        if not paths:
            return
        if encoding.image_side is not None and self.side_spec is None:
            raise InputError("an image side needs the reranker's spec to be rebuilt on the Ray actors (pass side_spec)")
        from ray.data import DataContext

        ctx = DataContext.get_current()  # this run's settings, the caller's again once it ends
        saved = (ctx.execution_options.preserve_order, ctx.wait_for_min_actors_s, ctx.raise_original_map_exception)
        ctx.execution_options.preserve_order = True  # the report lists files in the single-process order
        ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S  # never wait forever for actors that can't be placed
        ctx.raise_original_map_exception = True
        try:
            yield from self._run(paths, known_ids, encoding.tokens, encoding.image_side is not None)
        finally:
            ctx.execution_options.preserve_order, ctx.wait_for_min_actors_s, ctx.raise_original_map_exception = saved

    def _run(self, paths: list[str], known_ids: frozenset[str], tokens: bool, image_side: bool) -> Iterator[list[EncodedFile]]:
        import pyarrow as pa
        import ray
        from ray.data import ActorPoolStrategy

        bs = self.batch_size
        blocks = [pa.table({"pos": pa.array(range(i, min(i + bs, len(paths))), pa.int64()),
                            "path": pa.array(paths[i : i + bs], pa.string())}) for i in range(0, len(paths), bs)]
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        ds = ray.data.from_arrow(blocks).map_batches(
            EncoderActor,
            batch_size=bs,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=min(self.actors, len(blocks))),
            num_cpus=self.cpus_per_actor,
            num_gpus=1 if self.use_gpu else None,
            fn_constructor_kwargs={
                "encoder_spec": self.encoder_spec, "side_spec": self.side_spec if image_side else None,
                "known_ids": ray.put(known_ids), "tokens": tokens,
                "threads": 0 if self.use_gpu else int(self.cpus_per_actor), "decode_threads": self.decode_threads, "env": env,
            },
            udf_modifying_row_count=False,
        )
        try:
            for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                if table.num_rows:
                    yield unpack(table)
        except Exception as e:
            found = actor_error(e)
            if found is not None:
                raise StageError(found[0], found[1]) from e
            raise StageError(self.label, f"the Ray encoder actors failed: {type(e).__name__}: {_short(e)}") from e


def unpack(table: Any) -> list[EncodedFile]:
    """One actor output table -> the batch :func:`~mm_retrieval.encoding.encode_files` yields."""
    from ..decode import DecodedItem

    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    out = []
    for k in range(table.num_rows):
        item = DecodedItem(int(cols["pos"][k]), cols["path"][k], id=cols["id"][k] or "", digest=cols["digest"][k] or "",
                           decoded=bool(cols["decoded"][k]), known=bool(cols["known"][k]), error=cols["error"][k],
                           meta=json.loads(cols["meta"][k]) if cols.get("meta") and cols["meta"][k] else {})
        vector = tokens = None
        if item.decoded:
            vector = np.frombuffer(cols["vector"][k], dtype=np.float32)
            if cols["tokens"][k] is not None:
                tokens = np.frombuffer(cols["tokens"][k], dtype=np.dtype(cols["token_dtype"][k])).reshape(cols["token_shape"][k])
        out.append(EncodedFile(item, vector, tokens))
    return out


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:500] + "...") if len(text) > 500 else (text or type(e).__name__)
