"""See why: the reranker's attention over an image, per query word, as heatmaps.

:func:`attention_maps` scores one (query, image) pair with the reranker and returns its
cross-attention (text token -> image patch) grouped by query word, per head and averaged over
heads and layers. :func:`render_grid` draws them over the image as a PNG grid (``mmr explain``);
the web page draws the same maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, InputError

# A perceptual dark-to-bright ramp (inferno-like): low attention dark, high attention bright.
_RAMP = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39], [252, 255, 164]], float)


@dataclass
class Explanation:
    """Attention of one query over one image."""

    query: str
    words: list[str]  # query words, in order
    maps: np.ndarray  # [words, gh, gw]: averaged over heads and layers, each sums to 1
    head_maps: np.ndarray  # [heads, words, gh, gw]: averaged over layers
    score: float  # the reranker's score for this pair
    retrieval_score: float  # the first stage's cosine
    image: Any  # the PIL image (EXIF-rotated, RGB)
    image_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query, "words": self.words, "score": self.score, "retrieval_score": self.retrieval_score,
            "id": self.image_id, "grid": list(self.maps.shape[1:]),
            "maps": np.round(self.maps, 5).tolist(), "head_maps": np.round(self.head_maps, 5).tolist(),
        }


def word_spans(tokenizer: Any, query: str, n_tokens: int) -> list[tuple[str, list[int]]]:
    """Group token positions (1..n_tokens, after the start token) by query word. Falls back to
    one entry per token when the tokenizer can't encode words one at a time."""
    words = query.split()
    if hasattr(tokenizer, "encode"):
        spans, pos = [], 1
        for w in words:
            n = len(tokenizer.encode(w))
            if n:
                spans.append((w, list(range(pos, pos + n))))
                pos += n
        if spans and spans[-1][1][-1] <= n_tokens:
            return spans
    return [(f"token {i}", [i]) for i in range(1, n_tokens + 1)]


def attention_maps(pipeline: Any, query: str, image: str | Path) -> Explanation:
    """Explain the reranker's score of ``image`` (an indexed id or an image file) for ``query``."""
    import torch

    from .decode import DecodeError, decode_image
    from .pipeline import read_image_query, validate_query
    from .types import Hit

    q = validate_query(query)
    reranker = pipeline.reranker
    if reranker is None or not hasattr(reranker, "score_with_attention"):
        raise ConfigError("explaining needs the cross-attention reranker: pass --rerank DIR (from `mmr train-reranker`)")
    reranker.warm_up()
    encoder = pipeline.encoder
    image_id, path = _locate(pipeline, str(image))
    try:
        pil = decode_image(read_image_query(path)).convert("RGB")
    except DecodeError as e:
        raise InputError(f"{path} is not a usable image: {e}") from e
    emb, tokens = encoder.encode_pixels(encoder.image_transform(pil).unsqueeze(0), with_tokens=True)
    cosine = float(emb[0] @ encoder.encode_text([q])[0])
    if image_id is not None:  # indexed: use its cached memory, exactly what search uses
        hit = Hit(id=image_id, path=path, score=cosine, retrieval_score=cosine)
        scores, maps, mask = reranker.score_with_attention(q, [hit])
    else:  # not indexed: the same computation from freshly encoded tokens
        memory = torch.from_numpy(reranker.project(tokens)).to(reranker.device)
        _, text_tokens, mask = encoder.encode_text_tokens([q])
        with torch.inference_mode():
            logits, layer_maps = reranker.model(text_tokens.to(reranker.device), mask.to(reranker.device), memory,
                                                torch.tensor([cosine], device=reranker.device), return_attention=True)
        scores, maps, mask = logits[0].float().cpu().numpy(), [m[0].float().cpu() for m in layer_maps], mask[0].cpu()
    att = torch.stack([m[0] for m in maps]).mean(0).numpy()  # [H, L, P], averaged over layers
    P = att.shape[-1]
    g = int(round(P ** 0.5))
    if g * g != P:
        raise ConfigError(f"cannot lay {P} patch tokens out as a square grid")
    n_tokens = int(mask.sum()) - 2  # without start and end tokens
    spans = word_spans(encoder.tokenizer, q, n_tokens)
    head_maps = np.stack([att[:, idx, :].mean(1) for _, idx in spans], axis=1).reshape(att.shape[0], len(spans), g, g)
    return Explanation(query=q, words=[w for w, _ in spans], maps=head_maps.mean(0), head_maps=head_maps,
                       score=float(scores[0]), retrieval_score=cosine, image=pil, image_id=image_id)


def _locate(pipeline: Any, ref: str) -> tuple[str | None, str]:
    """(indexed id or None, file path) for an id or a path."""
    store = pipeline.store
    store.require()
    p = Path(ref).expanduser()
    if p.is_file():
        rows = list(store.iter_rows(("id", "path"), filter=f"path == {_quote(str(p.resolve()))}"))
        return (rows[0]["id"] if rows else None), str(p.resolve())
    rows = store.get([ref], fields=["id", "path", "has_image"]) if len(ref) == 32 else []
    if rows and rows[0].get("has_image", True):
        return ref, rows[0]["path"]
    raise InputError(f"{ref!r} is neither an image file nor the id of an indexed image")


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


def render_grid(ex: Explanation, out: str | Path, *, size: int = 224, head: int | None = None) -> Path:
    """Write a PNG: the image, the whole query's attention, then one panel per query word
    (``head``: one attention head instead of the mean over heads)."""
    from PIL import Image, ImageDraw

    maps = ex.maps if head is None else ex.head_maps[head]
    panels = [("image", ex.image.convert("RGB").resize((size, size), Image.BICUBIC)),
              ("whole query", overlay(ex.image, maps.mean(0), size))]
    panels += [(w, overlay(ex.image, m, size)) for w, m in zip(ex.words, maps)]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    label_h, top = 18, 26
    grid = Image.new("RGB", (cols * size, top + rows * (size + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    which = "mean over heads" if head is None else f"head {head}"
    draw.text((6, 6), f"{ex.query!r}  reranker {ex.score:.3f}  first stage {ex.retrieval_score:.3f}  ({which})", fill="black")
    for i, (label, panel) in enumerate(panels):
        x, y = (i % cols) * size, top + (i // cols) * (size + label_h)
        grid.paste(panel, (x, y + label_h))
        draw.text((x + 4, y + 3), label, fill="black")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, format="PNG")
    return out
