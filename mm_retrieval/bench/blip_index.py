"""Index throughput with and without BLIP tokens, through the real indexing path.

Both runs go through :func:`mm_retrieval.stages.base.encode_files`, what ``mmr index`` and
``mmr cache build`` run: files read, hashed, decoded and preprocessed (in DataLoader workers when
there are any), the first-stage encoder's forward pass per batch; *with* BLIP tokens each image is
preprocessed for both models, BLIP's vision transformer runs on the same batches
(``reranker.image_side()``) and its tokens are written through each storage option's
``token_writer()``. The Milvus upsert is left out (the same in both runs; the GPU machine has no
Milvus), so the ratio is the cost of BLIP tokens at its largest.

The first stage is the product's open_clip encoder stage where open_clip is installed, else
:class:`ClipStandIn`: transformers' CLIP vision tower with open_clip ViT-B-32's dimensions
(224 px, patch 32, width 768, 12 layers), random weights, as an ``Encoder`` stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..devices import autocast, autocast_dtype
from ..stages.base import Encoder
from .timing import sync


@dataclass(frozen=True)
class StandInConfig:
    size: str = "base"  # base: ViT-B/32 dimensions; tiny: a 2-layer 32 px tower (quick runs)
    device: str = "cpu"
    batch_size: int = 64
    workers: int = 0
    seed: int = 0


class ClipStandIn(Encoder):
    """The first-stage image tower where open_clip is not installed: transformers'
    ``CLIPVisionModelWithProjection`` at ViT-B-32's dimensions, random weights, bf16/fp16
    autocast on CUDA as the open_clip stage does. Images only (the bench never encodes text)."""

    stage_kind, stage_name = "encoder", "bench_clip_standin"
    Config: ClassVar[type] = StandInConfig

    def _warm_up(self) -> None:
        import torch
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        if self.config.size == "tiny":
            cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=32, patch_size=8, projection_dim=16)
        else:
            cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                   image_size=224, patch_size=32, projection_dim=512)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.model = CLIPVisionModelWithProjection(cfg).eval().to(self.config.device)
        self.device = self.config.device
        self._cfg = cfg
        self._dtype = autocast_dtype(self.device, "auto")  # the stages' own rule (mm_retrieval.devices)

    @property
    def dim(self) -> int:
        self.warm_up()
        return int(self._cfg.projection_dim)

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    @property
    def workers(self) -> int:
        return self.config.workers

    @property
    def fingerprint(self) -> str:
        return f"bench-clip-standin-{self.config.size}-{self.config.seed}"

    def encode_text(self, texts):  # pragma: no cover - the bench encodes images only
        raise NotImplementedError

    def encode_text_tokens(self, texts, *, with_tokens=True):  # pragma: no cover
        raise NotImplementedError

    def autocast(self) -> Any:
        self.warm_up()
        return autocast(self.device, self._dtype)

    def encode_pixels(self, pixels: Any, *, with_tokens: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        import torch
        import torch.nn.functional as F

        with torch.inference_mode(), self.autocast():
            emb = self.model(pixel_values=pixels.to(self.device, non_blocking=True)).image_embeds
            return F.normalize(emb.float(), dim=-1).cpu().numpy(), None

    @property
    def image_transform(self):
        from ..stages.rerankers.blip_itm.image import BlipImageTransform

        self.warm_up()
        # CLIP's mean/std are BLIP's defaults; a square resize instead of resize + centre crop
        return BlipImageTransform(size=int(self._cfg.image_size))


def first_stage(device: str, *, quick: bool, batch_size: int, workers: int) -> tuple[Encoder, str]:
    """(warm encoder, description): open_clip's ViT-B-32 (``mmr-tiny`` when quick) through the
    product's encoder stage where open_clip is installed, else :class:`ClipStandIn`."""
    try:
        import open_clip  # noqa: F401  (the encoder stage imports it when it warms up)
    except ImportError:
        open_clip = None
    if open_clip is not None:
        from ..stages.encoders.open_clip import OpenClipEncoder

        model = "mmr-tiny" if quick else "ViT-B-32"
        enc = OpenClipEncoder(model=model, pretrained="none", device=device, batch_size=batch_size, workers=workers)
        enc.warm_up()
        return enc, f"open_clip {model} (encoder/open_clip stage, random weights)"
    enc = ClipStandIn(size="tiny" if quick else "base", device=device, batch_size=batch_size, workers=workers)
    enc.warm_up()
    what = "tiny CLIP vision tower" if quick else "CLIP ViT-B/32 image tower (transformers CLIPVisionModelWithProjection)"
    return enc, f"{what}, random weights: stand-in for open_clip, which this machine lacks"


@dataclass
class IndexRun:
    seconds: float
    first_batch_s: float  # until the first batch was encoded (worker start-up, first decode)
    images: int
    first_batch_images: int
    write_s: float = 0.0  # token writes (codec + SQLite), inside ``seconds``
    ids: list[str] | None = None  # item id per path, in path order

    def report(self) -> dict[str, Any]:
        steady = self.images - self.first_batch_images
        out = {
            "images": self.images,
            "seconds": round(self.seconds, 3),
            "img_s": round(self.images / self.seconds, 2) if self.seconds > 0 else None,
            "first_batch_s": round(self.first_batch_s, 3),
            # after the first batch: worker start-up and warm-up excluded
            "steady_img_s": round(steady / (self.seconds - self.first_batch_s), 2) if steady and self.seconds > self.first_batch_s else None,
        }
        if self.write_s:
            out["token_write_ms_per_image"] = round(1000 * self.write_s / self.images, 3)
        return out


def index_files(encoder: Encoder, paths: list[Path], *, image_side: Any = None, writers: list[Any] = ()) -> IndexRun:
    """One pass of ``encode_files`` over ``paths`` (with ``image_side``: its tokens written
    through every writer, committed per batch as an index run does)."""
    from ..encoding import ImageEncoding, encode_files

    device = str(encoder.device)
    ids: dict[str, str] = {}
    n = first_n = 0
    first = write = 0.0
    sync(device)
    t0 = time.perf_counter()
    encoding = ImageEncoding(encoder, tokens=image_side is not None, image_side=image_side)
    for batch in encode_files(encoding, [str(p) for p in paths]):
        decoded = [it for it, _, _ in batch if it.decoded]
        if image_side is not None:
            w0 = time.perf_counter()
            for writer in writers:
                for it, _, tok in batch:
                    if it.decoded:
                        writer.add(it.id, tok)
                writer.commit()
            write += time.perf_counter() - w0
        ids.update((it.path, it.id) for it in decoded)
        n += len(decoded)
        if not first:
            sync(device)
            first, first_n = time.perf_counter() - t0, len(decoded)
    sync(device)
    seconds = time.perf_counter() - t0
    return IndexRun(seconds, first, n, first_n, write, [ids.get(str(p), "") for p in paths])
