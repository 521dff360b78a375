"""Index runs whose encoding runs on a Ray cluster (``mmr index SOURCE --ray [ADDRESS]``).

Needs the optional extra: ``pip install "mm-retrieval[ray]"`` (Ray Data). What runs where:

- **the driver** (the ``mmr index`` process): lists the source, plans the run against the
  collection (skips unchanged and known files), encodes caption texts, and performs every write:
  vectors, text vectors, token cache rows, deletions, in :mod:`mm_retrieval.indexing`'s
  crash-safe order (tokens, then rows, then old rows);
- **the actors** (:class:`~.actors.EncoderActor`, a Ray Data actor pool of ``--ray-actors``,
  one GPU each on a GPU cluster): each loads the model once, then reads, hashes, decodes and
  encodes batches of files, and sends vectors and token arrays back to the driver.

Every node must see the files under the paths the driver lists (a shared filesystem) and have
mm_retrieval installed in the same version. See :mod:`.connect` for addresses, :mod:`.dataset`
for the Ray Data pipeline.
"""

from __future__ import annotations

from .actors import stage_spec
from .connect import RayCluster, connect, require_ray
from .dataset import RayEncodeBatches, default_actors

__all__ = ["RayCluster", "RayEncodeBatches", "connect", "default_actors", "require_ray", "stage_spec"]
