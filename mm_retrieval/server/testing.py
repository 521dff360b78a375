"""A small served collection for tests, examples and plugin authors: no internet, a few seconds.

:func:`make_demo_collection` writes a handful of distinct images, indexes them with the tiny
``mmr-tiny`` open_clip config (seeded random weights) into Milvus Lite, and saves a reranker
checkpoint whose head is perturbed, so that reranking visibly reorders the first stage.
:func:`serve_demo` starts ``mmr serve`` on it on 127.0.0.1::

    with serve_demo(tmp_path) as (server, demo):
        httpx.post(f"{server.url}/v1/rerank", json={"query": "a red picture", "documents": demo.paths})
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..testing.images import COLORS, make_image  # re-exported: servers' tests and plugin authors use them

TINY_ENCODER = {"model": "mmr-tiny", "pretrained": "none", "workers": 0, "batch_size": 8}


@dataclass
class DemoCollection:
    """An indexed Milvus Lite collection plus a reranker checkpoint trained on its encoder."""

    root: Path
    db: str
    collection: str
    checkpoint: Path | None
    paths: list[str] = field(default_factory=list)  # as stored in the collection, in COLORS order

    def pipeline(self, *, rerank: bool = True):
        """A fresh :class:`~mm_retrieval.Pipeline` on the collection (the model is the collection's)."""
        from .. import Pipeline

        return Pipeline(db=self.db, collection=self.collection, encoder={"workers": 0},
                        reranker=str(self.checkpoint) if rerank and self.checkpoint else None)


def make_demo_collection(root: str | Path, *, collection: str = "images", reranker: bool = True, seed: int = 0) -> DemoCollection:
    """Write 8 images under ``root/images``, index them into ``root/mmr.db`` and save a reranker
    checkpoint under ``root/reranker`` (unless ``reranker=False``)."""
    from .. import Pipeline

    root = Path(root)
    images = [make_image(root / "images" / f"{name}.png", rgb, seed=i) for i, (name, rgb) in enumerate(COLORS.items())]
    db = str(root / "mmr.db")
    pipe = Pipeline(db=db, collection=collection, encoder=TINY_ENCODER)
    pipe.index(root / "images", progress=False)
    checkpoint = save_demo_reranker(pipe, root / "reranker", seed=seed) if reranker else None
    pipe.close()  # Milvus Lite: another process (`mmr serve`, `mmr search`) may open the database now
    return DemoCollection(root=root, db=db, collection=collection, checkpoint=checkpoint, paths=[str(p.resolve()) for p in images])


def save_demo_reranker(pipe: Any, out: Path, *, seed: int = 0) -> Path:
    """A small reranker for ``pipe``'s encoder whose correction head dominates (so it reorders)."""
    import numpy as np
    import torch

    from ..stages.rerankers.cross_attention.checkpoint import save_reranker
    from ..stages.rerankers.cross_attention.model import CrossAttentionScorer, RerankerConfig

    encoder = pipe.encoder
    encoder.warm_up()
    from PIL import Image

    text_dim = encoder.encode_text_tokens(["x"])[1].shape[-1]
    pixels = encoder.image_transform(Image.new("RGB", (32, 32)))[None]
    _, tokens = encoder.encode_pixels(pixels, with_tokens=True)
    image_dim = int(np.asarray(tokens).shape[-1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CrossAttentionScorer(RerankerConfig(text_dim=int(text_dim), image_dim=image_dim, width=64, heads=2, memory_dim=32))
        with torch.no_grad():
            model.head[-1].weight.normal_(0, 5.0)
            model.log_retrieval_scale.fill_(-5.0)
    save_reranker(model, out, encoder_fingerprint=encoder.fingerprint)
    return out


@contextlib.contextmanager
def serve_demo(root: str | Path, config: Any = None, *, demo: DemoCollection | None = None, rerank: bool = True) -> Iterator[tuple[Any, DemoCollection]]:
    """Build (or reuse) a demo collection and serve it on 127.0.0.1 with a real uvicorn."""
    from .app import create_app
    from .background import BackgroundServer
    from .engine import Engine

    demo = demo or make_demo_collection(root)
    engine = Engine(demo.pipeline(rerank=rerank), config)
    with BackgroundServer(create_app(engine)) as server:
        yield server, demo
