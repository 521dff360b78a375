"""How BLIP's vision tokens are stored in the token cache: fp32, fp16 or int8 with a per-token scale.

The token cache (:mod:`mm_retrieval.tokencache`) holds one fp16 array of a fixed shape per item.
Rather than teach it other dtypes, each storage option packs its bytes into such an array (a
reinterpreting *view*, never a conversion, so no bit changes on the way in or out):

=======  ==========================================  ========================  =================
option   bytes of one token (width W)                stored array              base, 384 px
=======  ==========================================  ========================  =================
fp32     4 W (exact: parity with transformers)       [P, 2 W]                  1772 KB / image
fp16     2 W                                         [P, W]                    886 KB / image
int8     W int8 values + one fp16 scale (absmax/127) [P, (W + 2) / 2]          444 KB / image
=======  ==========================================  ========================  =================

(P = 577 tokens and W = 768 for BLIP-base at 384 px; 197 tokens at 224 px.) The option is part of
the cache's fingerprint, so a cache is never read with another option's decoder.

Decoding runs in torch on the scoring device: int8 tokens travel to the GPU at half the bytes of
fp16 and are scaled there.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ....errors import ConfigError

STORAGES = ("fp16", "int8", "fp32")


def check_storage(storage: str) -> str:
    if storage not in STORAGES:
        raise ConfigError(f"unknown token storage {storage!r}; use one of {', '.join(STORAGES)}")
    return storage


def stored_shape(tokens: int, width: int, storage: str) -> tuple[int, int]:
    """Shape of the fp16 array one image's ``[tokens, width]`` vision tokens are stored as."""
    check_storage(storage)
    if storage == "fp16":
        return tokens, width
    if storage == "fp32":
        return tokens, 2 * width
    return tokens, (width + 2 + 1) // 2  # int8 values + a 2-byte scale, padded to whole fp16 elements


def stored_bytes(tokens: int, width: int, storage: str) -> int:
    """Bytes one image takes in the cache (excluding SQLite's per-row overhead)."""
    a, b = stored_shape(tokens, width, storage)
    return a * b * 2


def encode(tokens: np.ndarray, storage: str) -> np.ndarray:
    """``[n, P, W]`` float tokens -> ``[n, *stored_shape]`` fp16 arrays for the token cache."""
    check_storage(storage)
    x = np.asarray(tokens)
    if storage == "fp16":
        return np.ascontiguousarray(x, dtype=np.float16)
    if storage == "fp32":
        x = np.ascontiguousarray(x, dtype=np.float32)
        return x.view(np.float16)  # [n, P, 2W]: the same bytes
    q, scale = quantize_int8(x)
    n, p, w = q.shape
    packed = np.zeros((n, p, 2 * stored_shape(p, w, "int8")[1]), dtype=np.uint8)
    packed[..., :w] = q.view(np.uint8)
    packed[..., w : w + 2] = scale[..., None].view(np.uint8).reshape(n, p, 2)
    return packed.view(np.float16)


def decode(stored: Any, storage: str, width: int, *, device: str = "cpu"):
    """``[n, *stored_shape]`` fp16 arrays (numpy, or a torch tensor, e.g. page-locked) ->
    ``[n, P, W]`` float32 torch tensor on ``device``."""
    import torch

    check_storage(storage)
    t = stored if isinstance(stored, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(stored))
    t = t.contiguous().to(device, non_blocking=True)
    if storage == "fp16":
        return t.float()
    if storage == "fp32":
        return t.view(torch.float32)
    raw = t.view(torch.uint8)
    q = raw[..., :width].view(torch.int8)
    scale = raw[..., width : width + 2].contiguous().view(torch.float16)  # [n, P, 1]
    return q.float() * scale.float()


def quantize_int8(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-token int8: ``(q [.., W] int8, scale [..] fp16)`` with ``tokens ≈ q * scale``.

    The scale is each token's absolute maximum / 127, rounded to fp16 *before* quantising, so
    that the stored scale is exactly the one the values were divided by (error ≤ scale / 2)."""
    x = np.asarray(tokens, dtype=np.float32)
    scale = (np.abs(x).max(axis=-1) / 127.0).astype(np.float16)
    scale[~np.isfinite(scale) | (scale == 0)] = np.float16(1.0)  # an all-zero token: any scale is exact
    q = np.clip(np.rint(x / scale.astype(np.float32)[..., None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_int8`: ``[.., W]`` float32."""
    return q.astype(np.float32) * scale.astype(np.float32)[..., None]
