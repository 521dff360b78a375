"""Shared by the wire formats: turning document strings into :mod:`documents` objects."""

from __future__ import annotations

from collections.abc import Sequence

from ..config import ServerConfig
from ..documents import Document, Reference, check_count, check_text, image_from_data_uri


def references(texts: Sequence[str], config: ServerConfig) -> list[Document]:
    """Document strings as the text APIs send them: a ``data:`` URI is an inline image; anything
    else is a reference (path, id, or bare base64), resolved by the engine."""
    check_count(len(texts), config)
    limit = config.max_body_bytes  # a reference may be a whole base64 image; the body bound caps it
    out: list[Document] = []
    for i, text in enumerate(texts):
        check_text(text, f"document {i}", limit)
        out.append(image_from_data_uri(text, config, f"document {i}") if text.startswith("data:") else Reference(text))
    return out
