"""Settings of ``mmr serve``: where it listens, who may call it, how big a request may be, and how
requests are batched on the device."""

from __future__ import annotations

from dataclasses import dataclass

from ..query import MAX_QUERY_CHARS

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """Every limit is enforced before any model runs; a request over one gets a 4xx naming it."""

    host: str = "127.0.0.1"  # loopback by default: exposing the API is an explicit choice (--host 0.0.0.0)
    port: int = 8000
    api_key: str | None = None  # when set, every endpoint but /healthz, /readyz and the docs needs it
    model_name: str | None = None  # echoed as "model" in vLLM-style replies; default: derived from --rerank
    # request bounds
    max_documents: int = 1000  # per rerank request (Cohere recommends <= 1000; Milvus sends 10 x limit)
    max_query_chars: int = MAX_QUERY_CHARS
    max_reference_chars: int = 4096  # a path or id; Milvus stores paths up to 4096 bytes
    max_image_bytes: int = 10 * MiB  # one inline image (a rerank document or a /search image query), decoded from base64
    max_image_pixels: int = 25_000_000  # larger inline images are refused as decompression bombs
    max_body_bytes: int = 32 * MiB  # whole request body; enforced while it streams in
    # dynamic batching: concurrent requests share one text-encoder and one reranker forward
    batch_wait_ms: float = 2.0  # how long the first request of a batch waits for company
    max_batch_requests: int = 64
    max_batch_documents: int = 4096  # (query, document) pairs in one reranker forward
    max_queue: int = 1024  # requests waiting for the device; more are refused with 429
    # the web page's images (/thumb/ID, /image/ID): only indexed items' files, never through a symlink
    media_roots: tuple[str, ...] = ()  # also serve files whose real path lies under these (e.g. symlinked photo folders)
    thumb_size: int = 256  # longest side of a thumbnail, px
    thumb_cache: int = 512  # thumbnails kept in memory (an LRU; ~10 KiB each)
    max_view_side: int = 2048  # /image/ID is re-encoded, at most this many px on its longest side

    @property
    def batching(self) -> bool:
        return self.max_batch_requests > 1
