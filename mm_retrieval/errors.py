"""The exceptions mm_retrieval raises.

One root (:class:`MMRError`) and a few subclasses that tell the caller what kind of fix is needed.
Messages say what was given, what is valid, and how to fix it. The CLI maps them to one line on
stderr and an exit code (:attr:`MMRError.exit_code`); library code never prints.
"""

from __future__ import annotations

from collections.abc import Iterable


class MMRError(Exception):
    """Root of every error mm_retrieval raises on purpose."""

    exit_code = 1


class InputError(MMRError):
    """The user gave something unusable: an empty query, a missing file, a bad table."""

    exit_code = 2


class ConfigError(InputError):
    """A configuration value or file is invalid."""


class UnknownStageError(ConfigError):
    """No stage of this kind is registered under that name."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        self.kind, self.name, self.known = kind, name, sorted(known)
        listing = ", ".join(self.known) or "(none)"
        super().__init__(
            f"unknown {kind} stage {name!r}; known {kind} stages: {listing}. "
            f"Run `mmr plugins` to see every stage and any plugin that failed to load."
        )


class StoreError(MMRError):
    """The vector store failed. ``retriable`` says whether trying again can help."""

    def __init__(self, message: str, *, retriable: bool = False):
        super().__init__(message)
        self.retriable = retriable


class IncompatibleError(InputError):
    """Two artefacts disagree: a collection built by another model, a reranker trained on
    another encoder, a token cache written by another encoder."""


class ModelLoadError(MMRError):
    """Model weights or config could not be loaded (offline, missing file, bad checkpoint)."""

    exit_code = 2


class StageError(MMRError):
    """A stage raised something other than an :class:`MMRError` in ``warm_up`` or in one of its
    role's methods (see :mod:`mm_retrieval.stages.base`). ``stage`` is its ``kind/name``; the
    original exception is the ``__cause__``."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"[{stage}] {message}")
        self.stage = stage


class MissingDependencyError(MMRError):
    """An optional dependency is not installed; the message carries the pip command."""

    exit_code = 2

    def __init__(self, package: str, extra: str | None = None, purpose: str = ""):
        hint = f'pip install "mm-retrieval[{extra}]"' if extra else f"pip install {package}"
        what = f" (needed for {purpose})" if purpose else ""
        super().__init__(f"{package} is not installed{what}. Install it with: {hint}")
        self.package = package
