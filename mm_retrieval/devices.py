"""Where models run: one rule for every stage (encoders, rerankers, training)."""

from __future__ import annotations

from .errors import ConfigError


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; a CUDA request without CUDA is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    return device
