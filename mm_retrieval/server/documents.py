"""What a rerank "document" is here, and how it becomes something the reranker can score.

Rerank APIs were made for text; our documents are images. A document is one of:

* a **reference** to an indexed item: its path exactly as stored (what Milvus sends when its rerank
  function reads the ``path`` field), or its item id (32 hex characters);
* an **inline image**: a ``data:image/...;base64,...`` URI, bare base64 of an image file, or a
  vLLM-style content part ``{"type": "image_url", "image_url": {"url": "data:..."}}``.

An indexed reference scores from what indexing stored: its vector (first-stage score) and its
cached image tokens (reranker memory); its file is never read. A path that is not stored but names
a file whose content is (a duplicate, which indexing stores once under its first path) is read
and hashed, and scores as that item. An inline image is decoded and
encoded on the fly and never written to the collection or the token cache; if its bytes are an
indexed item's, that item's stored vector and tokens are used, so both ways score the same.
Anything else is an unknown reference, reported with its position.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..decode import DecodeError, content_hash, decode_image, item_id
from .config import ServerConfig
from .errors import ApiError

if TYPE_CHECKING:
    from ..stages.base import Encoder, Store

ITEM_ID = re.compile(r"[0-9a-f]{32}")
_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^;,]*)*?);base64,", re.IGNORECASE)
# File signatures of the formats Pillow reads here; bare base64 counts as an image only with one.
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
_LOOKUP_CHUNK = 100  # paths per Milvus query (keeps each filter expression small)


@dataclass(frozen=True)
class Reference:
    """A document given as text: a stored path, an item id, or bare base64 of an image."""

    text: str


@dataclass(frozen=True)
class InlineImage:
    """A document given as image bytes (decoded from a data URI or a content part)."""

    data: bytes


Document = Reference | InlineImage


@dataclass
class Candidate:
    """A document ready for the device: an indexed item (``id`` + stored ``vector``) or a new
    image (``pixels``, the encoder's preprocessed tensor)."""

    id: str | None = None
    vector: np.ndarray | None = None
    pixels: Any = None


def check_text(value: str, what: str, limit: int) -> str:
    """Refuse text the encoder or the JSON encoder would choke on: lone surrogates, NUL, too long."""
    if len(value) > limit:
        raise ApiError(413, f"{what} is {len(value):,} characters long; the limit is {limit:,}", kind="validation")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(422, f"{what} is not valid Unicode text (it contains a lone surrogate)") from None
    if "\x00" in value:
        raise ApiError(422, f"{what} contains a NUL character")
    return value


def check_count(n: int, config: ServerConfig) -> None:
    """At least one document, at most ``max_documents`` (checked before any is decoded)."""
    if n == 0:
        raise ApiError(400, "no documents to rerank: send at least one", param="documents", kind="empty")
    if n > config.max_documents:
        raise ApiError(413, f"{n} documents in one request; the limit is {config.max_documents} "
                            "(split the request, or start the server with a larger --max-documents)", param="documents", kind="validation")


def image_from_data_uri(uri: str, config: ServerConfig, where: str) -> InlineImage:
    """``data:image/png;base64,...`` -> the image bytes (size-checked, not yet decoded)."""
    m = _DATA_URI.match(uri)
    if m is None:
        raise ApiError(422, f"{where}: a data URI must look like data:image/png;base64,<base64> (only base64 data URIs are accepted)")
    mime = (m.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise ApiError(422, f"{where}: data URI of type {mime!r} is not an image")
    return InlineImage(_b64decode(uri[m.end():], config, where, strict=True))


def image_from_part(part: dict[str, Any], config: ServerConfig, where: str) -> Document:
    """A vLLM/OpenAI content part -> a document. ``image_url`` parts must carry a data URI (the
    server fetches nothing from the network); ``text`` parts are references."""
    kind = part.get("type")
    if kind == "text":
        return Reference(check_text(part["text"], where, config.max_body_bytes))
    if kind == "image_url":
        url = check_text(part["image_url"]["url"], where, config.max_body_bytes)
        if url.startswith("data:"):
            return image_from_data_uri(url, config, where)
        raise ApiError(422, f"{where}: image_url must be a data: URI; this server does not fetch {url[:60]!r}. "
                            "Send the image inline (data:image/png;base64,...) or reference an indexed path")
    raise ApiError(422, f"{where}: content part type {kind!r} is not supported (use image_url or text)")


def image_from_base64(text: str, config: ServerConfig, where: str) -> bytes:
    """Image bytes sent as a ``data:image/...;base64,`` URI or as bare base64 (size-checked,
    not yet decoded)."""
    if text.startswith("data:"):
        return image_from_data_uri(text, config, where).data
    return _b64decode(text, config, where, strict=True)


def _b64decode(text: str, config: ServerConfig, where: str, *, strict: bool) -> bytes:
    limit = config.max_image_bytes
    if len(text) > (limit // 3 + 2) * 4 + 1024:  # refuse before decoding; base64 is 4/3 the size
        raise ApiError(413, f"{where}: inline image is larger than the {limit:,}-byte limit (--max-image-mb)", kind="validation")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        if strict:
            raise ApiError(422, f"{where}: the payload is not valid base64") from None
        return b""
    if len(data) > limit:
        raise ApiError(413, f"{where}: inline image is {len(data):,} bytes; the limit is {limit:,} (--max-image-mb)", kind="validation")
    return data


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


class DocumentResolver:
    """Turns documents into :class:`Candidate` s using the collection (runs in a worker thread:
    it queries Milvus and decodes images, but never touches a model)."""

    def __init__(self, store: Store, encoder: Encoder, config: ServerConfig):
        self.store = store
        self.encoder = encoder
        self.config = config

    def resolve(self, docs: Sequence[Document]) -> list[Candidate]:
        """One candidate per document, in order; unknown references and bad images raise
        :class:`ApiError` listing every offending position."""
        texts = {d.text for d in docs if isinstance(d, Reference)}
        short = [t for t in texts if len(t) <= self.config.max_reference_chars]
        rows = self._by_path(short)
        rows.update(self._by_id([t for t in short if t not in rows and ITEM_ID.fullmatch(t)]))
        rows.update(self._by_content([t for t in short if t not in rows]))
        inline: dict[int, bytes] = {}
        unknown: list[str] = []
        for i, d in enumerate(docs):
            if isinstance(d, InlineImage):
                inline[i] = d.data
            elif d.text not in rows:
                data = _b64decode(d.text, self.config, f"document {i}", strict=False) if len(d.text) >= 16 else b""
                if data and _looks_like_image(data):
                    inline[i] = data
                else:
                    unknown.append(f"[{i}] {d.text[:120]!r}")
        if unknown:
            shown = ", ".join(unknown[:20]) + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
            raise ApiError(
                422, f"{len(unknown)} of {len(docs)} documents are neither an indexed path or id nor an inline image: {shown}. "
                     "Index the images with `mmr index`, reference them by their stored path or id, or send them inline "
                     "as data:image/...;base64 URIs", param="documents")
        textual = [f"[{i}] {d.text[:120]!r}" for i, d in enumerate(docs) if i not in inline and not rows[d.text]["has_image"]]
        if textual:
            raise ApiError(422, f"{len(textual)} documents are text-only items (indexed without an image), which the image "
                                f"reranker cannot score: {', '.join(textual[:20])}", param="documents")
        known = self._by_id(sorted({item_id(content_hash(b)) for b in inline.values()}))  # inline copies of indexed images
        out: list[Candidate] = []
        errors: list[str] = []
        for i, d in enumerate(docs):
            if i not in inline:
                row = rows[d.text]
                out.append(Candidate(id=row["id"], vector=row["vector"]))
                continue
            iid = item_id(content_hash(inline[i]))
            if iid in known and known[iid]["has_image"]:
                out.append(Candidate(id=iid, vector=known[iid]["vector"]))
                continue
            try:
                out.append(Candidate(pixels=self._preprocess(inline[i])))
            except DecodeError as e:
                errors.append(f"[{i}] {e}")
        if errors:
            raise ApiError(422, f"{len(errors)} inline image(s) could not be used: {'; '.join(errors[:10])}", param="documents")
        return out

    def check_image(self, data: bytes, what: str) -> None:
        """Refuse image bytes over the size limit (413) or that don't decode as an image within
        the server's pixel limit (422), before any model sees them."""
        if len(data) > self.config.max_image_bytes:
            raise ApiError(413, f"{what} is {len(data):,} bytes; the limit is {self.config.max_image_bytes:,} "
                                "(send a smaller image, or start the server with a larger --max-image-mb)", kind="validation")
        try:
            self._preprocess(data)
        except DecodeError as e:
            raise ApiError(422, f"{what} is not a usable image: {e}") from None

    def _preprocess(self, data: bytes):
        image = decode_image(data, max_pixels=min(self.config.max_image_pixels, self.encoder.max_pixels))
        try:
            return self.encoder.image_transform(image)
        except Exception as e:  # odd modes (16-bit, palette+alpha) must be the caller's 4xx, not our 500
            raise DecodeError(f"cannot preprocess image: {type(e).__name__}: {e}") from None

    # ---- collection lookups ----------------------------------------------------------------
    def _by_path(self, paths: Sequence[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(paths), _LOOKUP_CHUNK):
            chunk = paths[start:start + _LOOKUP_CHUNK]
            expr = f"path in [{', '.join(map(quote, chunk))}]"
            for row in self._query(expr, limit=2 * len(chunk)):
                found[row["path"]] = _row(row)
        return found

    def _by_id(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        if not ids:
            return {}
        return {r["id"]: _row(r) for r in self.store.get(list(ids), fields=self._fields())}

    def _by_content(self, paths: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Unstored paths of files whose content is indexed (duplicates): path -> that item's row.
        Only absolute paths of regular files are read, within the indexing file-size limit."""
        import os

        from ..decode import DEFAULT_MAX_FILE_BYTES, read_or_reason, read_regular_file

        ids: dict[str, str] = {}
        for p in paths:
            if os.path.isabs(p) and "\x00" not in p and os.path.isfile(p):
                data, error = read_or_reason(lambda p=p: read_regular_file(p, DEFAULT_MAX_FILE_BYTES))
                if error is None:
                    ids[p] = item_id(content_hash(data))
        found = self._by_id(sorted(set(ids.values())))
        return {p: found[i] for p, i in ids.items() if i in found}

    def _fields(self) -> list[str]:
        # collections written before text vectors existed (schema 1) have no has_image field
        return ["id", "path", "vector", "has_image"] if self.store.has_text_vectors() else ["id", "path", "vector"]

    def _query(self, expr: str, *, limit: int) -> list[dict[str, Any]]:
        return self.store.query(expr, self._fields(), limit)


def quote(text: str) -> str:
    """A Milvus string literal for ``text`` (escapes per Milvus' expression grammar)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _row(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": str(row["id"]), "path": row.get("path", ""), "vector": np.asarray(row["vector"], dtype=np.float32),
            "has_image": bool(row.get("has_image", True))}
