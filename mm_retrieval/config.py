"""Configuration: one frozen dataclass per stage, and the pipeline file that names the stages.

Precedence, lowest first: a stage's dataclass defaults -> the pipeline file (``--config``) ->
explicit overrides (CLI flags, keyword arguments). Overrides whose value is ``None`` are pruned,
so an unset CLI flag never clobbers a value from the file. Unknown keys are errors that list the
valid ones.

A pipeline file is TOML with one table per stage kind; ``name`` picks the registered stage and
every other key is that stage's config::

    [encoder]
    name = "open_clip"        # the default
    model = "ViT-B-32"
    pretrained = "laion2b_s34b_b79k"

    [store]
    uri = "./mmr.db"
    collection = "images"

    [reranker]
    checkpoint = "runs/reranker"

    [search]
    k = 10
    candidates = 100
"""

from __future__ import annotations

import dataclasses
import functools
import stat
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

C = TypeVar("C")

MAX_CONFIG_BYTES = 1024 * 1024  # a pipeline file is a few hundred bytes
# the stage a pipeline file's section gets when it names none
DEFAULT_STAGE_NAMES = {"encoder": "open_clip", "store": "milvus", "reranker": "cross_attention"}
# The default store's database and collection (store/milvus' config), here so that the CLI can
# name them without importing the store (`mmr search` through a server loads no stage at all).
DEFAULT_DB, DEFAULT_COLLECTION = "./mmr.db", "images"


def prune_none(d: dict[str, Any]) -> dict[str, Any]:
    """Drop keys whose value is None (unset CLI flags)."""
    return {k: v for k, v in d.items() if v is not None}


def config_from_dict(cls: type[C], data: dict[str, Any] | None, *, where: str = "") -> C:
    """Build the frozen dataclass ``cls`` from ``data``; unknown keys and wrong types are errors."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    label = where or cls.__name__
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in {label}; valid keys: {', '.join(sorted(fields))}"
        )
    hints = _type_hints(cls)
    for key, value in data.items():
        _check_type(label, key, value, hints.get(key))
    try:
        return cls(**data)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid {label}: {e}") from e


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    """A config class's resolved field types. Resolving evaluates the annotations (about 0.3 ms,
    most of ``Pipeline.search``'s own overhead when it ran per query), so once per class."""
    return typing.get_type_hints(cls)


def _check_type(label: str, key: str, value: Any, hint: Any) -> None:
    if hint is None:
        return
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) else (hint,)
    for t in allowed:
        base = typing.get_origin(t) or t
        if t is Any or base is type(None) and value is None:
            return
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if base is int and isinstance(value, bool):
            continue
        if isinstance(base, type) and isinstance(value, base):
            return
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{label}: {key} must be {names}, got {type(value).__name__} {value!r}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """The JSON/TOML-serialisable form of a stage config (round-trips with config_from_dict)."""
    return dataclasses.asdict(config)


def _check_stage_params(spec: "StageSpec", *, where: str) -> None:
    """Unknown keys and wrong types in a stage's section of a pipeline file, reported against the
    file at load time (the stage itself is created later, when the file name is long gone)."""
    from . import registry

    label = f"[{spec.kind}] in {where}"
    try:
        stage_config = getattr(registry.get(spec.kind, spec.name), "Config", None)
    except ConfigError as e:
        raise ConfigError(f"{label}: {e}") from e
    if not dataclasses.is_dataclass(stage_config):
        return
    fields = {f.name for f in dataclasses.fields(stage_config)}
    unknown = sorted(set(spec.params) - fields)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(map(repr, unknown))} in {label}; valid keys: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(stage_config)
    for key, value in spec.params.items():
        _check_type(label, key, value, hints.get(key))


@dataclass(frozen=True)
class StageSpec:
    """Which registered stage to use and its params (validated by the stage's own Config)."""

    kind: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def with_params(self, overrides: dict[str, Any]) -> "StageSpec":
        return StageSpec(self.kind, self.name, {**self.params, **prune_none(overrides)})


@dataclass(frozen=True)
class SearchConfig:
    """Defaults for a search: how many hits to return, how many first-stage candidates to rerank."""

    k: int = 10
    candidates: int = 100  # the reranker sees this many first-stage hits
    rerank: bool = True  # use the [reranker] stage when one is configured
    mode: str = "auto"  # image | text | hybrid | auto (text queries: hybrid when the collection has text vectors, else image; image queries: image)
    hybrid_ranker: str = "rrf"  # Milvus' RRFRanker, or "weighted" (WeightedRanker with hybrid_weights)
    hybrid_weights: list[float] = field(default_factory=lambda: [0.5, 0.5])  # image, text
    rrf_k: int = 60  # RRF's smoothing constant (Milvus' default)


@dataclass(frozen=True)
class IndexConfig:
    """Defaults for index and sync runs (the pipeline file's ``[index]``)."""

    ocr: bool = False  # read the text in images (mm_retrieval.ocr; pip install "mm-retrieval[ocr]"), like --ocr
    tokens: str = "eager"  # eager: the reranker's tokens written while indexing | lazy: computed by the first rerank that needs them (--tokens)
    token_budget: str = ""  # lazy tokens: bound the cache ("20GB", or a number of images), least recently used evicted (--token-budget)


@dataclass(frozen=True)
class PipelineConfig:
    """The stages of a pipeline plus search defaults. Build it with :meth:`load` or directly."""

    encoder: StageSpec = field(default_factory=lambda: StageSpec("encoder", "open_clip"))
    store: StageSpec = field(default_factory=lambda: StageSpec("store", "milvus"))
    reranker: StageSpec | None = None
    search: SearchConfig = field(default_factory=SearchConfig)
    index: IndexConfig = field(default_factory=IndexConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "pipeline config") -> "PipelineConfig":
        known = {"encoder", "store", "reranker", "search", "index"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown section(s) {', '.join(map(repr, unknown))} in {where}; valid: {', '.join(sorted(known))}")
        kwargs: dict[str, Any] = {}
        for kind in ("encoder", "store", "reranker"):
            if kind in data:
                section = data[kind]
                if not isinstance(section, dict):
                    raise ConfigError(f"[{kind}] in {where} must be a table, got {type(section).__name__}")
                section = dict(section)
                name = section.pop("name", DEFAULT_STAGE_NAMES[kind])
                if not isinstance(name, str):
                    raise ConfigError(f"[{kind}].name in {where} must be a string")
                kwargs[kind] = StageSpec(kind, name, section)
        if "search" in data:
            if not isinstance(data["search"], dict):
                raise ConfigError(f"[search] in {where} must be a table")
            kwargs["search"] = config_from_dict(SearchConfig, data["search"], where=f"[search] in {where}")
        if "index" in data:
            if not isinstance(data["index"], dict):
                raise ConfigError(f"[index] in {where} must be a table")
            kwargs["index"] = config_from_dict(IndexConfig, data["index"], where=f"[index] in {where}")
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path) -> "PipelineConfig":
        """Read a TOML pipeline file; errors name the file and the problem."""
        p = Path(path)
        try:
            # a FIFO or device given as --config would block or never end; a huge file is a mistake
            st = p.stat()
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"config file {p} is not a regular file; pass a TOML file")
            if st.st_size > MAX_CONFIG_BYTES:
                raise ConfigError(f"config file {p} is {st.st_size:,} bytes; a pipeline file is at most {MAX_CONFIG_BYTES:,}")
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {p}") from e
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {p}: {e}") from e
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from e
        except RecursionError:  # tomllib recurses into nested arrays/tables: [[[[...]]]]
            raise ConfigError(f"config file {p} is not a pipeline file: values nested too deeply") from None
        config = cls.from_dict(data, where=str(p))
        for spec in (config.encoder, config.store, config.reranker):
            if spec is not None:
                _check_stage_params(spec, where=str(p))
        return config

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kind in ("encoder", "store", "reranker"):
            spec = getattr(self, kind)
            if spec is not None:
                out[kind] = {"name": spec.name, **spec.params}
        out["search"] = config_to_dict(self.search)
        if self.index != IndexConfig():
            out["index"] = config_to_dict(self.index)
        return out
