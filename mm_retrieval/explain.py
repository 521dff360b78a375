"""See why: a reranker's attention over an image, per query word, as heatmaps.

:func:`attention_maps` asks the pipeline's reranker (any with ``can_explain``) what it attended to
when it scored one (query, image) pair: an :class:`~mm_retrieval.types.AttentionMaps`, one map
over the image's patch grid per layer, head and query word. :class:`Explanation` selects from
them (one layer or the mean over layers, one head or the mean over heads); :func:`render_grid`
draws them over the image as a PNG grid (``mmr explain``); the web page draws the same maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, InputError
from .types import AttentionMaps

# A perceptual dark-to-bright ramp (inferno-like): low attention dark, high attention bright.
_RAMP = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39], [252, 255, 164]], float)


@dataclass
class Explanation:
    """A reranker's attention of one query over one image."""

    query: str
    attention: AttentionMaps  # maps [layers, heads, words, gh, gw]
    image: Any  # the PIL image (EXIF-rotated, RGB)
    image_id: str | None = None

    @property
    def words(self) -> list[str]:
        return self.attention.words

    @property
    def score(self) -> float:
        """The reranker's score for this pair."""
        return self.attention.score

    @property
    def retrieval_score(self) -> float:
        """The first stage's similarity of this pair."""
        return self.attention.retrieval_score

    @property
    def layers(self) -> int:
        return int(self.attention.maps.shape[0])

    @property
    def heads(self) -> int:
        return int(self.attention.maps.shape[1])

    def grid(self, *, layer: int | None = None, head: int | None = None) -> np.ndarray:
        """[words, gh, gw]: one layer's maps (``layer``) or their mean over layers, of one head
        (``head``) or the mean over heads."""
        maps = np.asarray(self.attention.maps)
        for name, value, n in (("layer", layer, self.layers), ("head", head, self.heads)):
            if value is not None and not 0 <= value < n:
                raise InputError(f"--{name} {value}: the reranker has {n} {name}s (0..{n - 1})")
        maps = maps.mean(0) if layer is None else maps[layer]
        return maps.mean(0) if head is None else maps[head]

    @property
    def maps(self) -> np.ndarray:
        """[words, gh, gw] averaged over layers and heads; each sums to 1."""
        return self.grid()

    @property
    def head_maps(self) -> np.ndarray:
        """[heads, words, gh, gw] averaged over layers."""
        return np.asarray(self.attention.maps).mean(0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query, "words": self.words, "score": self.score, "retrieval_score": self.retrieval_score,
            "id": self.image_id, "grid": list(self.maps.shape[1:]), "layers": self.layers, "heads": self.heads,
            "maps": np.round(self.maps, 5).tolist(), "head_maps": np.round(self.head_maps, 5).tolist(),
        }


def attention_maps(pipeline: Any, query: str, image: str | Path | bytes) -> Explanation:
    """Explain the pipeline reranker's score of ``image`` (an indexed id, an image file, or an
    image file's bytes) for ``query``. An indexed image is scored from what search uses (its
    stored vector and cached tokens); any other image is encoded on the fly."""
    from .decode import DecodeError, decode_image, is_video
    from .search import encode_text, read_image_query, stored_vector
    from .types import Hit

    if pipeline.config.reranker is not None:
        pipeline.collection_facts.precheck(pipeline.encoder)  # the collection exists and fits: said before any model loads
    reranker = pipeline.reranker
    if reranker is None:
        raise ConfigError("explaining needs a reranker: pass --rerank DIR (from `mmr train-reranker`) or "
                          "--rerank Salesforce/blip-itm-base-coco (BLIP)")
    if not reranker.can_explain:
        raise ConfigError(f"{reranker.label} cannot show what it attended to; explain with a reranker that can "
                          "(the cross_attention one: --rerank DIR from `mmr train-reranker`; BLIP: --rerank Salesforce/blip-itm-base-coco)")
    reranker.warm_up()
    q = encode_text(query, pipeline.encoder, reranker)
    image_id, path = (None, "the image sent") if isinstance(image, bytes) else _locate(pipeline, str(image))
    try:
        if isinstance(image, bytes):  # sent by a client (`mmr explain` through `mmr serve`)
            pil = decode_image(image).convert("RGB")
        elif image_id is not None and is_video(path):  # a video segment: its representative frame
            from .video import frame_at

            (row,) = pipeline.store.get([image_id], ["frame"])
            pil = frame_at(path, float(row.get("frame") or 0.0)).convert("RGB")
        else:
            pil = decode_image(read_image_query(path)).convert("RGB")
    except DecodeError as e:
        raise InputError(f"{path} is not a usable image: {e}") from e
    if image_id is not None:  # indexed: exactly what search scores
        cosine = float(stored_vector(pipeline.store, image_id) @ q.embedding())
        att = reranker.attention_maps(q, Hit(id=image_id, path=path, score=cosine, retrieval_score=cosine))
    else:
        att = reranker.attention_maps(q, Hit(id="", path=path, score=0.0, retrieval_score=0.0), image=pil)
    return Explanation(query=q.text, attention=att, image=pil, image_id=image_id)


def _locate(pipeline: Any, ref: str) -> tuple[str | None, str]:
    """(indexed id or None, file path) for an id or a path."""
    store = pipeline.store
    store.require()
    p = Path(ref).expanduser()
    if p.is_file():
        return indexed_at(store, str(p.resolve())), str(p.resolve())
    rows = store.get([ref], fields=["id", "path", "has_image"]) if len(ref) == 32 else []
    if rows and rows[0].get("has_image", True):
        return ref, rows[0]["path"]
    raise InputError(f"{ref!r} is neither an image file nor the id of an indexed image")


def indexed_at(store: Any, path: str) -> str | None:
    """The id of the item indexed from the file at ``path`` (as stored: resolved), or None."""
    rows = list(store.iter_rows(("id", "path"), filter=f"path == {_quote(path)}"))
    return rows[0]["id"] if rows else None


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def colorize(heat: np.ndarray) -> np.ndarray:
    """[h, w] values in [0, 1] -> [h, w, 3] uint8 through the ramp."""
    x = np.clip(heat, 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_RAMP) - 2)
    t = (x - lo)[..., None]
    return (_RAMP[lo] * (1 - t) + _RAMP[lo + 1] * t).astype(np.uint8)


def overlay(image: Any, heat: np.ndarray, size: int = 224, alpha: float = 0.55) -> Any:
    """The image (square, ``size`` px) with a normalised heatmap blended over it."""
    from PIL import Image

    base = image.convert("RGB").resize((size, size), Image.BICUBIC)
    h = heat - heat.min()
    h = h / h.max() if h.max() > 0 else h
    hm = Image.fromarray(colorize(h)).resize((size, size), Image.BICUBIC)
    return Image.blend(base, hm, alpha)


def draw_text(draw: Any, xy: tuple[int, int], text: str, *, size: int = 11) -> None:
    """Black ``text`` at ``xy``, word by word: Pillow's default font draws a space 2 px wide at
    this size, which reads as no space at all ("firststage"), so words are set a third of the
    font size apart (each extra space adds as much again)."""
    from PIL import ImageFont

    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    x, y = xy
    gap = max(draw.textlength(" ", font=font), size / 3)
    for i, word in enumerate(text.split(" ")):
        if i:
            x += gap
        if word:
            draw.text((x, y), word, fill="black", font=font)
            x += draw.textlength(word, font=font)


def render_grid(ex: Explanation, out: str | Path, *, size: int = 224, head: int | None = None,
                layer: int | None = None) -> Path:
    """Write a PNG: the image, the whole query's attention, then one panel per query word
    (``head``: one attention head instead of the mean over heads; ``layer``: one layer instead
    of the mean over layers)."""
    return render_maps(ex.image, ex.query, ex.words, ex.grid(layer=layer, head=head), out, score=ex.score,
                       retrieval_score=ex.retrieval_score, size=size, head=head, layer=layer)


def render_maps(image: Any, query: str, words: list[str], maps: np.ndarray, out: str | Path, *, score: float,
                retrieval_score: float, size: int = 224, head: int | None = None, layer: int | None = None) -> Path:
    """:func:`render_grid` from its parts: ``maps`` [words, gh, gw] are the ones selected by
    ``head`` and ``layer`` (named in the title); ``mmr explain`` through a server draws the maps
    it sent."""
    from PIL import Image, ImageDraw

    maps = np.asarray(maps)
    panels = [("image", image.convert("RGB").resize((size, size), Image.BICUBIC)),
              ("whole query", overlay(image, maps.mean(0), size))]
    panels += [(w, overlay(image, m, size)) for w, m in zip(words, maps)]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    label_h, top = 18, 26
    grid = Image.new("RGB", (cols * size, top + rows * (size + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    which = ("mean over heads" if head is None else f"head {head}") + (", mean over layers" if layer is None else f", layer {layer}")
    draw_text(draw, (6, 6), f"{query!r}  reranker {score:.3f}  first stage {retrieval_score:.3f}  ({which})")
    for i, (label, panel) in enumerate(panels):
        x, y = (i % cols) * size, top + (i // cols) * (size + label_h)
        grid.paste(panel, (x, y + label_h))
        draw_text(draw, (x + 4, y + 3), label)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, format="PNG")
    return out
