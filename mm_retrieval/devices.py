"""Where models run and in what precision: one rule for every stage (encoders, rerankers,
training, benchmarks).

A device is ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` (the current CUDA
device) or ``cuda:N`` (the N-th). A precision is ``auto`` (bf16 autocast on a CUDA device that
has it, else fp16; fp32 on the CPU), ``fp32``, ``bf16`` or ``fp16``.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from .errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(device: str, *, where: str = "device") -> str:
    """``device`` if it is written as a device (see the module docstring), else ConfigError
    naming it and the forms; cheap (no torch import): config and option validation."""
    if not isinstance(device, str) or not _DEVICE.match(device.strip()):
        raise ConfigError(f"{where} {device!r} is not a device; use auto, cpu, cuda or cuda:N (N: the GPU's index, 0 for the first)")
    return device.strip()


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; a CUDA request without CUDA, or ``cuda:N``
    beyond the GPUs there are, is a ConfigError saying what there is."""
    device = check_device(device)
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
    if ":" in device:
        index, count = int(device.split(":", 1)[1]), torch.cuda.device_count()
        if index >= count:
            raise ConfigError(f"device {device!r} requested but this machine has {count} CUDA device{'s' if count != 1 else ''} "
                              f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}); pick one of them, or --device cuda")
    return device


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else ConfigError listing them."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    return precision


def autocast_dtype(device: str, precision: str) -> Any:
    """The torch dtype a model on ``device`` (resolved: :func:`resolve_device`) runs its forward
    in under autocast, or None for plain fp32. ``auto``: bf16 on a CUDA device that supports it,
    else fp16; none on the CPU (CPU autocast is slower than fp32 there). An explicit ``fp16`` is
    honoured on any device, ``bf16`` too except on a GPU without it (fp16 there)."""
    import torch

    check_precision(precision)
    if precision == "fp32" or (precision == "auto" and device == "cpu"):
        return None
    if precision == "fp16":
        return torch.float16
    if device == "cpu":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16  # bf16 where the GPU has it


def autocast(device: str, dtype: Any) -> Any:
    """A context manager running ``device``'s forwards in ``dtype`` (:func:`autocast_dtype`), or
    doing nothing for None."""
    if dtype is None:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)
