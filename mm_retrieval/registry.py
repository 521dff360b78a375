"""The stage registry: every stage is found by ``(kind, name)``.

Built-in stages register with the :func:`register` decorator and are *also* declared as entry
points, so they are discovered through exactly the path third-party plugins use: the
``mm_retrieval.plugins`` entry-point group. Two entry-point forms are understood:

* ``"encoder/my_encoder" = "my_pkg.enc:MyEncoder"`` -- the name carries kind and stage name, so
  listing needs no import; the class is imported only when that stage is asked for.
* ``"my_plugin" = "my_pkg.stages"`` -- a module that registers its stages with :func:`register`
  when imported (it is imported when listing or when a lookup misses).

A plugin that fails to import is recorded with its error (see :func:`load_errors`) and never
breaks the others.
"""

from __future__ import annotations

import logging
import threading
import traceback
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable, TypeVar

from .errors import ConfigError, UnknownStageError

log = logging.getLogger(__name__)

GROUP = "mm_retrieval.plugins"
KINDS = ("source", "encoder", "store", "reranker")

T = TypeVar("T")


@dataclass
class StageEntry:
    """One registered stage: where it comes from and, once imported, its class."""

    kind: str
    name: str
    origin: str  # "builtin" or the distribution that provides it
    target: str  # "module:attr" it loads from
    cls: Any = None
    error: str | None = None


@dataclass
class PluginError:
    """A plugin entry point that failed to load."""

    entry_point: str
    origin: str
    error: str
    traceback: str = field(repr=False, default="")


_lock = threading.RLock()
_stages: dict[tuple[str, str], StageEntry] = {}
_errors: list[PluginError] = []
_discovered = False
_modules_loaded = False
_module_eps: list[EntryPoint] = []
_loading_origin: str | None = None  # the distribution whose module plugin is being imported


def register(kind: str, name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: register a stage class under ``(kind, name)``."""
    if kind not in KINDS:
        raise ConfigError(f"cannot register stage {name!r}: unknown kind {kind!r}; kinds are {', '.join(KINDS)}")

    def deco(cls: type[T]) -> type[T]:
        with _lock:
            key = (kind, name)
            entry = _stages.get(key)
            target = f"{cls.__module__}:{cls.__qualname__}"
            if entry is None:
                _stages[key] = StageEntry(kind, name, _loading_origin or _origin_of(cls.__module__), target, cls)
            else:
                entry.cls, entry.error = cls, None
        cls.stage_kind, cls.stage_name = kind, name  # type: ignore[attr-defined]
        return cls

    return deco


def _origin_of(module: str) -> str:
    return "builtin" if module.split(".")[0] == "mm_retrieval" else module.split(".")[0]


def _discover() -> None:
    """Read entry-point names (no imports) once per process."""
    global _discovered
    with _lock:
        if _discovered:
            return
        _discovered = True
        for ep in entry_points(group=GROUP):
            origin = ep.dist.name if ep.dist is not None else "unknown"
            if origin == "mm-retrieval":
                origin = "builtin"
            if "/" in ep.name:
                kind, _, name = ep.name.partition("/")
                if kind not in KINDS:
                    _errors.append(PluginError(ep.name, origin, f"unknown stage kind {kind!r} (kinds: {', '.join(KINDS)})"))
                    continue
                _stages.setdefault((kind, name), StageEntry(kind, name, origin, ep.value))
            else:
                _module_eps.append(ep)


def _load_module_plugins() -> None:
    """Import module-style plugins (they register on import)."""
    global _modules_loaded
    _discover()
    with _lock:
        if _modules_loaded:
            return
        _modules_loaded = True
        global _loading_origin
        for ep in _module_eps:
            origin = ep.dist.name if ep.dist is not None else "unknown"
            _loading_origin = origin
            try:
                ep.load()
            except Exception as e:  # a broken plugin must not break the others
                _errors.append(PluginError(ep.name, origin, f"{type(e).__name__}: {e}", traceback.format_exc()))
                log.debug("plugin %r failed to load: %s", ep.name, e)
            finally:
                _loading_origin = None


def _import_entry(entry: StageEntry) -> Any:
    if entry.cls is not None:
        return entry.cls
    if entry.error is not None:
        return None
    try:
        obj = EntryPoint(name=f"{entry.kind}/{entry.name}", value=entry.target, group=GROUP).load()
    except Exception as e:
        entry.error = f"{type(e).__name__}: {e}"
        _errors.append(PluginError(f"{entry.kind}/{entry.name}", entry.origin, entry.error, traceback.format_exc()))
        log.debug("stage %s/%s failed to load: %s", entry.kind, entry.name, e)
        return None
    entry.cls = obj
    obj.stage_kind, obj.stage_name = entry.kind, entry.name
    return obj


def names(kind: str) -> list[str]:
    """Names registered for ``kind`` (from entry-point names and imported modules)."""
    _discover()
    return sorted(n for (k, n) in _stages if k == kind)


def get(kind: str, name: str) -> Any:
    """The stage class for ``(kind, name)``; :class:`UnknownStageError` lists the known names."""
    if kind not in KINDS:
        raise ConfigError(f"unknown stage kind {kind!r}; kinds are {', '.join(KINDS)}")
    _discover()
    entry = _stages.get((kind, name))
    if entry is None:
        _load_module_plugins()
        entry = _stages.get((kind, name))
    if entry is None:
        raise UnknownStageError(kind, name, names(kind))
    cls = _import_entry(entry)
    if cls is None:
        raise ConfigError(f"{kind} stage {name!r} (from {entry.origin}) failed to load: {entry.error}")
    return cls


def list_stages(load: bool = True) -> list[StageEntry]:
    """Every stage, sorted by kind and name. With ``load`` each is imported so that
    broken plugins show their error (see :func:`load_errors`)."""
    _load_module_plugins()
    if load:
        for entry in list(_stages.values()):
            _import_entry(entry)
    return sorted(_stages.values(), key=lambda e: (KINDS.index(e.kind), e.name))


def load_errors() -> list[PluginError]:
    """Plugins (or stages) that failed to load so far."""
    return list(_errors)


def create(kind: str, name: str, params: dict | None = None) -> Any:
    """Instantiate a stage from its registered name and a params dict (validated)."""
    return get(kind, name)(params or {})
