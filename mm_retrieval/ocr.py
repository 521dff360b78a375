"""Text in images (OCR): read at index time, stored per item, searched as words and as meaning.

The reader is ``rapidocr-onnxruntime`` (PaddleOCR's PP-OCRv4 detection and recognition models as
ONNX, inside its own wheel, run by onnxruntime on CPU): nothing is downloaded at run time, so it
works offline like the rest of indexing. It is an extra: ``pip install "mm-retrieval[ocr]"``.

What an item's OCR gives is stored in its metadata under the reserved key :data:`OCR_KEY` (a
JSON field every collection already has, so collections made before OCR take it without a
re-index, and every Milvus deployment can search it)::

    {"text": "Harbour Bakery open daily", "norm": "harbour bakery open daily",
     "words": [["Harbour", x0, y0, x1, y1], ...], "size": [width, height]}

``norm`` is the text lower-cased with punctuation dropped (:func:`normalize`), what word
searches match; ``words`` are the recognised words with their boxes in pixels of the image as
displayed (EXIF orientation applied), what the search page highlights. An image without text
stores ``{"text": "", ...}`` (read, nothing found), so a later ``--ocr`` run does not read it again.

Word search (``--mode ocr``, :func:`ocr_search`) asks the store for rows whose ``norm`` contains
any query word (a Milvus ``like`` filter on the JSON path) and scores them here: the fraction of
query words found as whole words, and the query as a consecutive phrase. Milvus' BM25 full-text
search works in Milvus Lite too (measured: a ``VARCHAR`` field with an analyzer, a sparse field and
a ``BM25`` function), but needs those fields in the schema, and Milvus Lite cannot add fields to an
existing collection (``add_collection_field`` is not implemented there); the ``like`` scan keeps
every existing collection searchable and is linear in the rows with OCR text.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError, MissingDependencyError

log = logging.getLogger(__name__)

OCR_KEY = "ocr"  # the reserved metadata key
MAX_WORDS = 400  # boxes kept per image (a page of small print has a few hundred words)
MAX_TEXT = 8000  # characters of text kept (Milvus' JSON field holds 64 KiB per row)
MAX_CANDIDATES = 16384  # Milvus caps one query at this many rows
# The detector scales an image's shorter side to 736 px, so a sliver (400 x 2) becomes 736 x 147200
# (measured: 28 s for that one image) and thinner ones fail inside the engine: refused up front.
MAX_ASPECT = 30.0
_WORD = re.compile(r"[^\W_]+")  # letters and digits, any script


def normalize(text: str) -> str:
    """Lower-case words separated by single spaces (punctuation dropped): what word search matches."""
    return " ".join(_WORD.findall(text.lower()))


@dataclass
class OcrResult:
    """The text read from one image: ``words`` are ``[word, x0, y0, x1, y1]`` in pixels of an
    image ``size`` = (width, height)."""

    text: str
    words: list[list[Any]] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)
    seconds: float = 0.0

    def to_metadata(self) -> dict[str, Any]:
        """The value stored under :data:`OCR_KEY`."""
        text = self.text[:MAX_TEXT]
        return {"text": text, "norm": normalize(text), "words": self.words[:MAX_WORDS], "size": list(self.size)}


class OcrReader:
    """One OCR engine, loaded on first use (about a second) and shared by the threads of a
    process (onnxruntime sessions are thread-safe; a lock keeps the loading single)."""

    def __init__(self) -> None:
        self._engine: Any = None
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        """Load the models; :class:`MissingDependencyError` naming the extra when not installed."""
        with self._lock:
            if self._engine is None:
                try:
                    from rapidocr_onnxruntime import RapidOCR
                except ImportError as e:
                    raise MissingDependencyError("rapidocr-onnxruntime", "ocr", "--ocr (text in images)") from e
                logging.getLogger("RapidOCR").setLevel(logging.WARNING)
                self._engine = RapidOCR()

    def read_image(self, image: Any) -> OcrResult:
        """The text of a decoded PIL image. Exceptions propagate (see :meth:`read_file`)."""
        import numpy as np

        self.warm_up()
        w, h = image.size
        if max(w, h) > MAX_ASPECT * max(min(w, h), 1):
            raise ValueError(f"image is {w}x{h}, too elongated to read text from (more than {MAX_ASPECT:g}:1)")
        t0 = time.perf_counter()
        rgb = np.asarray(image.convert("RGB"))[:, :, ::-1]  # the engine reads BGR arrays, as OpenCV gives them
        found, _ = self._engine(np.ascontiguousarray(rgb), return_word_box=True)
        lines, words = [], []
        for entry in found or ():
            box, text = entry[0], entry[1]
            lines.append(text)
            words.extend(_words(text, box, entry[3] if len(entry) > 3 else None, entry[4] if len(entry) > 4 else None))
        return OcrResult(" ".join(lines), words, image.size, time.perf_counter() - t0)

    def read_file(self, path: str, max_pixels: int | None = None) -> tuple[OcrResult | None, str | None]:
        """``(result, None)``, or ``(None, why)`` when the file can't be read or OCR fails on it
        (the reason shown next to its path; the item is indexed all the same)."""
        from .decode import (
            DEFAULT_MAX_PIXELS,
            DecodeError,
            decode_image,
            is_raw,
            read_regular_file,
        )

        try:
            image = decode_image(read_regular_file(path), max_pixels=max_pixels or DEFAULT_MAX_PIXELS, raw=is_raw(path))
        except DecodeError as e:
            return None, f"OCR: {e}"
        except OSError as e:
            return None, f"OCR: cannot read file: {e.strerror or e}"
        try:
            return self.read_image(image), None
        except MissingDependencyError:
            raise
        except Exception as e:  # the engine fails on odd images in odd ways: that file only
            log.debug("OCR failed on %s", path, exc_info=True)
            return None, f"OCR failed: {type(e).__name__}: {e}"


def _words(text: str, box: Any, char_boxes: Any, chars: Any) -> list[list[Any]]:
    """A line's words with their boxes: from the engine's per-character boxes where it gives them
    (Latin script: one box per character, spaces included), else the line's box for each word."""
    out: list[list[Any]] = []
    if char_boxes and chars and len(char_boxes) == len(chars):
        cur: list[tuple[str, Any]] = []
        for ch, cb in [*zip(chars, char_boxes), (" ", None)]:
            if ch.strip() and cb is not None:
                cur.append((ch, cb))
                continue
            if cur:
                out.append(["".join(c for c, _ in cur), *_bounds([p for _, b in cur for p in b])])
                cur = []
        if out:
            return out
    x0, y0, x1, y1 = _bounds(box)
    return [[w, x0, y0, x1, y1] for w in text.split()]


def _bounds(points: Any) -> list[int]:
    xs = [float(p[0]) for p in points]
    ys = [float(p[1]) for p in points]
    return [int(min(xs)), int(min(ys)), round(max(xs)), round(max(ys))]


_reader: OcrReader | None = None


def shared_reader() -> OcrReader:
    """The process' one :class:`OcrReader` (its models load once)."""
    global _reader
    if _reader is None:
        _reader = OcrReader()
    return _reader


# ---- searching --------------------------------------------------------------------------------
def query_words(query: str) -> list[str]:
    """The words a query matches (normalised); InputError when it has none."""
    words = normalize(query).split()
    if not words:
        raise InputError(f"--mode ocr searches the words in images, and the query {query!r} has none (letters or digits)")
    return words


def has_ocr(store: Any) -> bool:
    """Whether any item of the collection has had its text read (an empty text counts)."""
    return bool(store.query(f'metadata["{OCR_KEY}"]["norm"] like "%"', ["id"], 1))


def score_text(words: list[str], norm: str) -> tuple[float, list[str]]:
    """``(score, matched)`` of a stored ``norm`` text for the query ``words``, in [0, 1]: 0.5 for
    the share of distinct query words found, 0.4 when the whole query occurs as a phrase, 0.1 for
    the share found as whole words. Words are found inside longer runs too: the recogniser often
    reads a sign's words without the space between them ("peppersunday"), so "sunday" must match
    there (and then "sun" does too; a whole word ranks above). ``matched``: the query words found."""
    distinct = list(dict.fromkeys(words))
    matched = [w for w in distinct if w in norm]
    if not matched:
        return 0.0, []
    whole = set(norm.split())
    phrase = "".join(words) in norm.replace(" ", "")
    score = 0.5 * len(matched) / len(distinct) + (0.4 if phrase else 0.0) + 0.1 * sum(w in whole for w in matched) / len(distinct)
    return score, matched


def match_boxes(words: list[str], read: list[list[Any]]) -> list[list[Any]]:
    """The boxes of the query ``words`` among the ``read`` words ``[word, x0, y0, x1, y1]``: a
    read word holding a query word inside a longer run gets the share of its box those letters
    take (along its width: exact for level text, close for slanted)."""
    out = []
    for entry in read:
        token, x0, y0, x1, y1 = entry[:5]
        low = normalize(str(token)).replace(" ", "")
        for w in words:
            at = low.find(w)
            if at >= 0 and low:
                step = (x1 - x0) / len(low)
                out.append([w, int(x0 + step * at), y0, round(x0 + step * (at + len(w))), y1])
    return out


def ocr_search(store: Any, query: str, limit: int, filter: str = "") -> list[Any]:
    """The items whose OCR text holds the query's words, best first (:func:`score_text`; ties:
    more occurrences, then id). Each hit's ``metadata["ocr"]["matched"]`` lists the query words
    it holds, and ``["matches"]`` their boxes (:func:`match_boxes`: what the search page highlights)."""
    from .types import Hit

    words = query_words(query)
    if not has_ocr(store):
        raise InputError(
            f"collection {store.name!r} has no text read from its images: add it with `mmr sync SOURCE --ocr` (reads the "
            "text of the images already indexed, no re-encoding), or index with --ocr, then search with --mode ocr"
        )
    like = " or ".join(f'metadata["{OCR_KEY}"]["norm"] like "%{w}%"' for w in dict.fromkeys(words))
    expr = f"({like})" + (f" and ({filter})" if filter else "")
    rows = store.query(expr, ["id", "path", "caption", "metadata", "has_image"], MAX_CANDIDATES)
    scored = []
    for r in rows:
        norm = ((r.get("metadata") or {}).get(OCR_KEY) or {}).get("norm", "")
        score, matched = score_text(words, norm)
        if score > 0:
            scored.append((score, sum(norm.count(w) for w in matched), r, matched))
    scored.sort(key=lambda s: (-s[0], -s[1], str(s[2]["id"])))
    hits = []
    for i, (score, _, r, matched) in enumerate(scored[:limit]):
        meta = dict(r.get("metadata") or {})
        meta[OCR_KEY] = {**meta[OCR_KEY], "matched": matched, "matches": match_boxes(matched, meta[OCR_KEY].get("words") or [])}
        hits.append(Hit(id=str(r["id"]), path=r.get("path", ""), score=score, retrieval_score=score, caption=r.get("caption") or None,
                        metadata=meta, rank=i + 1, has_image=r.get("has_image", True)))
    return hits
