"""Encoder ``open_clip``: any open_clip dual encoder.

``model`` may be an architecture name (``ViT-B-32``, or a tiny ``mmr-*`` config shipped here),
an ``hf-hub:org/repo`` name, a directory written by ``mmr train-encoder`` (open_clip's own
hub layout, loaded through its ``local-dir:`` schema) or a model-config JSON file.
``pretrained`` is an open_clip tag, a local checkpoint file, ``"none"`` for seeded random
weights, or unset for the architecture's default tag.

Embeddings equal open_clip's own ``preprocess`` + ``encode_image``/``encode_text`` (L2-normalised);
the same forward pass also yields the token features the reranker caches.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ...decode import DEFAULT_MAX_PIXELS
from ...digest import check_tensor_checkpoint, file_digest
from ...devices import autocast, autocast_dtype, check_device, check_precision, resolve_device
from ...errors import ConfigError, ModelLoadError
from ...registry import register
from ..base import Encoder, SettingsFromConfig

log = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B-32"
# The tag a user gets when they name an architecture but no weights.
DEFAULT_PRETRAINED = {"ViT-B-32": "laion2b_s34b_b79k", "ViT-B-16": "laion2b_s34b_b88k", "ViT-L-14": "laion2b_s32b_b82k"}
NO_WEIGHTS = ("none", "random")


@dataclass(frozen=True)
class OpenClipConfig:
    model: str = DEFAULT_MODEL
    pretrained: str | None = None  # None: the architecture's default tag; "none": seeded random init
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 64
    workers: int = 2  # DataLoader processes decoding images while the model runs
    index_threads: int = 0  # torch threads while indexing on CPU with workers; 0: cores minus workers
    precision: str = "auto"  # auto (bf16/fp16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are skipped as decompression bombs
    cache_dir: str | None = None  # where downloaded weights go (open_clip's default when unset)
    seed: int = 0  # makes random-init weights reproducible across processes

    def __post_init__(self) -> None:
        check_device(self.device, where="encoder device")
        check_precision(self.precision)


@register("encoder", "open_clip")
class OpenClipEncoder(SettingsFromConfig, Encoder):
    """An open_clip model as an encoder stage."""

    Config = OpenClipConfig
    _autocast_dtype: Any = None  # set by warm_up: the dtype forwards run in (None: fp32)

    @property
    def image_size(self) -> int | None:
        """The vision tower's input size (loads the model)."""
        self.warm_up()
        size = getattr(self.model.visual, "image_size", None)  # a timm or HF tower may not say
        if isinstance(size, (tuple, list)):
            size = size[0]
        return int(size) if size else None

    @property
    def logit_scale(self) -> float | None:
        """CLIP's learned temperature, ``exp(logit_scale)`` (loads the model)."""
        self.warm_up()
        scale = getattr(self.model, "logit_scale", None)  # an open_clip model may have none
        return float(scale.detach().exp()) if scale is not None else None

    # ---- resolution (cheap, no weights loaded) -------------------------------------------
    @cached_property
    def _identity(self) -> tuple[str, str | None, str, bool]:
        """(open_clip model name, pretrained argument, weights identity, whether the pretrained tag
        still needs checking against open_clip's list). Read from files only, without importing
        open_clip (which imports torch: seconds) where that is possible: architectures from their
        config files, model directories, hf-hub names, weight files and ``none``. So a model other
        than a collection's is refused before anything heavy loads (:meth:`cheap_info`)."""
        model, pretrained = self.config.model, self.config.pretrained
        p = Path(model).expanduser()
        if model.startswith(("hf-hub:", "local-dir:")):
            if model.startswith("local-dir:"):
                return (*self._local_dir(Path(model[len("local-dir:"):])), False)
            return model, None, model, False
        if p.is_dir():
            return (*self._local_dir(p), False)
        if p.suffix == ".json" and p.is_file():
            import open_clip  # the file's architecture is known to open_clip once registered

            open_clip.add_model_config(p)
            model = p.stem
        else:
            known = _known_models()
            if model not in known:
                close = difflib.get_close_matches(model, known, n=5, cutoff=0.5)
                hint = f" Did you mean: {', '.join(close)}?" if close else ""
                raise ConfigError(
                    f"unknown model {model!r}: not an open_clip architecture, an hf-hub: name, a model directory "
                    f"or a model-config JSON file.{hint} See open_clip.list_models() for architectures."
                )
        if pretrained is None:
            pretrained = _default_tag(model)
        if pretrained.lower() in NO_WEIGHTS:
            return model, None, f"random-init/seed{self.config.seed}", False
        wp = Path(pretrained).expanduser()
        if wp.is_file():
            return model, str(wp.resolve()), f"file/{file_digest(wp)[:16]}", False
        if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise ConfigError(f"pretrained weights file not found: {pretrained}")
        return model, pretrained, f"{model}/{pretrained}", pretrained != DEFAULT_PRETRAINED.get(model)

    @cached_property
    def _resolved(self) -> tuple[str, str | None, str]:
        """(open_clip model name, pretrained argument, weights identity), the tag checked."""
        name, pretrained, weights, unchecked = self._identity
        if unchecked:
            tags = _pretrained_tags(name)
            if pretrained not in tags:
                listing = ", ".join(tags) or "(none: pass --pretrained PATH to a checkpoint, or --pretrained none)"
                raise ConfigError(f"unknown pretrained tag {pretrained!r} for {name}; known tags: {listing}")
        return name, pretrained, weights

    def _local_dir(self, d: Path) -> tuple[str, None, str]:
        d = d.expanduser().resolve()
        cfg = d / "open_clip_config.json"
        if not cfg.is_file():
            raise ConfigError(
                f"{d} is not an open_clip model directory (no open_clip_config.json); "
                "train one with `mmr train-encoder TABLE --out DIR` or pass an architecture name"
            )
        weights = sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin")) + sorted(d.glob("*.pth"))
        if not weights:
            raise ModelLoadError(f"model directory {d} has a config but no weights file (*.safetensors)")
        ident = hashlib.sha256(cfg.read_bytes()).hexdigest()[:8] + "/" + file_digest(weights[0])[:16]
        return f"local-dir:{d}", None, f"local-dir/{ident}"

    @cached_property
    def fingerprint(self) -> str:  # type: ignore[override]
        """Identifies architecture + weights; computed without loading the model (an unknown
        pretrained tag is an error, not a fingerprint)."""
        name, _, weights = self._resolved
        return _fingerprint(name, weights)

    def cheap_info(self) -> dict[str, Any]:
        """:meth:`info` from files only (no open_clip import); ``dim`` None where only the loaded
        model knows it (hf-hub). A pretrained tag is not yet checked against open_clip's list: a
        wrong one still gives another fingerprint than any collection's (built with a real one)."""
        name, _, weights, _ = self._identity
        dim = self._dim if self._warm else _config_dim(name)
        return {"stage": self.stage_name, "fingerprint": _fingerprint(name, weights), "dim": dim, **self._names(weights)}

    def info(self) -> dict[str, Any]:
        """Recorded in the collection; ``model``/``pretrained`` reload the same encoder later."""
        _, _, weights = self._resolved
        return {**super().info(), **self._names(weights)}

    def _names(self, weights: str) -> dict[str, Any]:
        model, pretrained = self.config.model, self.config.pretrained
        if not model.startswith(("hf-hub:", "local-dir:")) and Path(model).expanduser().exists():
            model = str(Path(model).expanduser().resolve())
        if pretrained and Path(pretrained).expanduser().is_file():
            pretrained = str(Path(pretrained).expanduser().resolve())
        return {"model": model, "pretrained": pretrained, "weights": weights}

    # ---- loading ---------------------------------------------------------------------------
    def _warm_up(self) -> None:
        import open_clip
        import torch

        from ...models.tiny import register_tiny_configs

        register_tiny_configs()

        name, pretrained, weights = self._resolved
        self.device = resolve_device(self.config.device)
        for f in _pickled_weight_files(name, pretrained):
            check_tensor_checkpoint(f)  # open_clip retries a TypeError without weights_only
        # Weights not in the local cache and a hub that can't be reached: one clear error now,
        # instead of huggingface_hub's retries and warnings; cached weights load with no request.
        cached = _weights_cached(name, pretrained, self.config.cache_dir)
        if not cached and (_hub_offline() or not _remote_reachable(name, pretrained)):
            raise _unreachable_error(name, pretrained, self.config.cache_dir)
        try:
            with torch.random.fork_rng(devices=[]), _hub_requests(allowed=not cached), _no_duplicate_warning():
                torch.manual_seed(self.config.seed)  # random-init weights identical in every process
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=pretrained, device=self.device, cache_dir=self.config.cache_dir
                )
        except (ConfigError, ModelLoadError):
            raise
        except Exception as e:
            raise _load_error(name, pretrained, e) from e
        if weights.startswith("random-init"):
            log.warning(
                "%s has no pretrained weights: using random weights (seed %d); search results are not meaningful. "
                "Pass --pretrained TAG_OR_PATH or --model DIR from `mmr train-encoder`.",
                name, self.config.seed,
            )
        model.eval()
        self.model = model
        self._preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(name, cache_dir=self.config.cache_dir) if name.startswith("hf-hub:") else open_clip.get_tokenizer(name)
        self._autocast_dtype = autocast_dtype(self.device, self.config.precision)
        self._text_ln = _text_final_norm(model)
        self._trim_text = _trim_exact(model) and self._trim_agrees()
        with torch.inference_mode():
            self._dim = int(model.encode_text(self.tokenizer([""]).to(self.device)).shape[-1])

    @property
    def dim(self) -> int:
        """The embedding width: from the model's config when it states it (so that :meth:`info`,
        and with it the check against the collection's model, needs no download), else the
        loaded model's."""
        if not self._warm:
            name, _, _ = self._resolved
            width = _config_dim(name)
            if width is not None:
                return width
        self.warm_up()
        return self._dim

    def autocast(self) -> Any:
        """The precision forwards run in (:func:`~mm_retrieval.devices.autocast_dtype` of the
        config's ``precision``), as a context manager; none before :meth:`warm_up`."""
        return autocast(self.device, self._autocast_dtype)

    # ---- encoding --------------------------------------------------------------------------
    @property
    def image_transform(self) -> Any:
        """open_clip's own eval ``preprocess`` for this model."""
        self.warm_up()
        return self._preprocess

    def encode_pixels(self, pixels: Any, *, with_tokens: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        import torch
        import torch.nn.functional as F

        self.warm_up()
        visual = self.model.visual
        with torch.inference_mode(), self.autocast():
            pixels = pixels.to(self.device, non_blocking=True)
            if with_tokens:
                if not hasattr(visual, "output_tokens"):
                    raise ConfigError(f"{self.config.model}: its vision tower does not expose patch tokens; the reranker needs a ViT")
                visual.output_tokens = True
                try:
                    pooled, tokens = visual(pixels)
                finally:
                    visual.output_tokens = False
            else:
                pooled, tokens = self.model.encode_image(pixels), None
            emb = F.normalize(pooled.float(), dim=-1)
        return emb.cpu().numpy(), None if tokens is None else tokens.to(torch.float16).cpu().numpy()

    def tokenize(self, texts: Sequence[str]):
        return self.tokenizer(list(texts))

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        emb, _, _ = self.encode_text_tokens(texts, with_tokens=False)
        return emb.cpu().numpy()

    def encode_text_tokens(self, texts: Sequence[str], *, with_tokens: bool = True, full_context: bool = False):
        """(embeddings [N, D] float32 normalised, token features [N, C, W] float32 or None, mask [N, C] bool).

        C is the tokenizer's context length and ``mask`` is True at real (non-padding) tokens. On a
        causal text tower pooled at its end-of-text token (open_clip's CLIP text towers) the tower
        runs on the batch's first L positions only, L = last real token + 1, which is exact: no
        position attends to a later one, so padding after L changes no output. Token features past
        L are then zeros (never computed; always masked). ``full_context`` runs all C positions,
        open_clip's own ``encode_text`` (the reference the trimmed path is checked against)."""
        self.warm_up()
        ids = self.tokenize(texts).to(self.device)
        mask = ids != _pad_id(self.tokenizer)
        if self._trim_text and not full_context and len(ids):
            emb, tokens = self._encode_trimmed(ids, mask, with_tokens)
        else:
            emb, tokens = self._encode_full(ids, with_tokens)
        return emb, tokens, mask

    def _encode_full(self, ids, with_tokens: bool):
        import torch
        import torch.nn.functional as F

        captured: dict[str, Any] = {}
        hook = None
        if with_tokens:
            # The final LayerNorm's output is the text tower's per-token features (before pooling);
            # hooking it keeps this exactly open_clip's own code path.
            hook = self._text_ln.register_forward_hook(lambda m, i, o: captured.__setitem__("tokens", o))
        try:
            with torch.inference_mode(), self.autocast():
                emb = F.normalize(self.model.encode_text(ids).float(), dim=-1)
        finally:
            if hook is not None:
                hook.remove()
        tokens = captured.get("tokens")
        return emb, (None if tokens is None else tokens.float())

    def _encode_trimmed(self, ids, mask, with_tokens: bool):
        """``CLIP.encode_text`` step by step on ``ids[:, :L]`` (positional embedding and causal
        mask sliced to L); only used where :func:`_trim_exact` holds."""
        import torch
        import torch.nn.functional as F
        from open_clip.transformer import text_global_pool

        model = self.model
        used = mask.any(0).nonzero()
        L = int(used.max()) + 1 if len(used) else ids.shape[1]
        short = ids[:, :L]
        with torch.inference_mode(), self.autocast():
            cast = model.transformer.get_cast_dtype()
            x = model.token_embedding(short).to(cast) + model.positional_embedding[:L].to(cast)
            x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:L, :L]))
            pooled = text_global_pool(x, short, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
            proj = model.text_projection
            if proj is not None:
                pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
            emb = F.normalize(pooled.float(), dim=-1)
            tokens = None
            if with_tokens:
                tokens = x.new_zeros((ids.shape[0], ids.shape[1], x.shape[-1]), dtype=torch.float32)
                tokens[:, :L] = x.float()
        return emb, tokens

    def _trim_agrees(self) -> bool:
        """Warm-up self-check of the trimmed path against open_clip's own, in fp32 (catches an
        open_clip version whose text tower differs from what :func:`_encode_trimmed` replays)."""
        ids = self.tokenizer(["a photo of a dog", "two"]).to(self.device)
        mask = ids != _pad_id(self.tokenizer)
        dtype, self._autocast_dtype = self._autocast_dtype, None
        try:
            full, ftok = self._encode_full(ids, True)
            trim, ttok = self._encode_trimmed(ids, mask, True)
        except Exception as e:  # noqa: BLE001 - any failure means: use the full path
            log.warning("text tower: trimmed encoding unavailable (%s: %s); using all %d positions", type(e).__name__, e, ids.shape[1])
            return False
        finally:
            self._autocast_dtype = dtype
        diff = max(float((full - trim).abs().max()), float(((ftok - ttok).abs() * mask[..., None]).max()))
        if not diff <= 1e-4:
            log.warning("text tower: trimmed encoding differs from open_clip's by %.2g; using all %d positions", diff, ids.shape[1])
            return False
        return True


def _pickled_weight_files(name: str, pretrained: str | None) -> list[Path]:
    """Local pickle-based checkpoints open_clip may load for this model (not .safetensors)."""
    if name.startswith("local-dir:"):  # the file open_clip will pick (it may prefer a .bin to a .safetensors)
        d = Path(name[len("local-dir:"):])
        try:
            from open_clip.factory import _find_checkpoint_in_dir

            chosen = _find_checkpoint_in_dir(d)
            files = [Path(chosen)] if chosen else []
        except ImportError:  # another open_clip version: check every candidate
            files = sorted(d.glob("*.bin")) + sorted(d.glob("*.pth"))
        return [f for f in files if f.suffix.lower() != ".safetensors"]
    if pretrained and Path(pretrained).is_file() and Path(pretrained).suffix.lower() not in (".safetensors", ".npz", ".npy"):
        return [Path(pretrained)]
    return []


def _config_dim(name: str) -> int | None:
    """The embedding width a model's config states (``embed_dim``), without loading it; None for
    an ``hf-hub:`` model (its config is remote) or a config without it."""
    if name.startswith("hf-hub:"):
        return None
    if name.startswith("local-dir:"):
        try:
            cfg = json.loads((Path(name[len("local-dir:"):]) / "open_clip_config.json").read_text()).get("model_cfg", {})
        except (OSError, ValueError):
            return None
    else:
        cfg = _model_cfg(name)
    width = cfg.get("embed_dim") if isinstance(cfg, dict) else None
    return int(width) if isinstance(width, int) else None


# ---- offline: fail fast -------------------------------------------------------------------
HUB_CONNECT_TIMEOUT = 3.0  # seconds a reachability test of the weights' host may take


def _hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (``HF_HUB_OFFLINE``)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _remote_source(name: str, pretrained: str | None) -> tuple[str, str | None] | None:
    """Where open_clip would fetch this model's weights: ("hub", "repo/file") or ("url", URL);
    None when nothing is fetched (a local directory or file, or random weights)."""
    import open_clip

    if name.startswith("hf-hub:"):
        return "hub", name[len("hf-hub:"):].rstrip("/") + "/open_clip_config.json"
    if name.startswith("local-dir:") or pretrained is None or Path(pretrained).is_file():
        return None
    cfg = open_clip.get_pretrained_cfg(name, pretrained) or {}
    if cfg.get("hf_hub"):
        return "hub", cfg["hf_hub"]
    return ("url", cfg["url"]) if cfg.get("url") else None


def _weights_cached(name: str, pretrained: str | None, cache_dir: str | None) -> bool:
    """Whether the weights open_clip would fetch are in the local cache already (or nothing is
    fetched): then loading needs no network request."""
    source = _remote_source(name, pretrained)
    if source is None:
        return True
    kind, where = source
    if kind == "url":
        folder = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "clip"
        return (folder / os.path.basename(where or "")).is_file()
    from huggingface_hub import try_to_load_from_cache

    repo, filename = os.path.split(where or "")
    filename = filename or "open_clip_pytorch_model.bin"  # open_clip's HF_WEIGHTS_NAME
    try:
        from open_clip.pretrained import _get_safe_alternatives

        names = [*_get_safe_alternatives(filename), filename]  # the files open_clip tries, in its order
    except ImportError:  # another open_clip version: the file itself
        names = [filename]
    return any(isinstance(try_to_load_from_cache(repo, n, cache_dir=cache_dir), str) for n in names)


def _remote_reachable(name: str, pretrained: str | None) -> bool:
    """A TCP connection to the host serving the weights opens within a few seconds."""
    import socket
    from urllib.parse import urlsplit

    source = _remote_source(name, pretrained)
    if source is None:
        return True
    if source[0] == "hub":
        from huggingface_hub import constants

        url = constants.ENDPOINT
    else:
        url = source[1] or ""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=HUB_CONNECT_TIMEOUT):
            return True
    except OSError:
        return False


def _unreachable_error(name: str, pretrained: str | None, cache_dir: str | None) -> ModelLoadError:
    from huggingface_hub import constants

    what = name if name.startswith("hf-hub:") else f"{name} / {pretrained}"
    source = _remote_source(name, pretrained)
    host = constants.ENDPOINT if source is not None and source[0] == "hub" else "their download server"
    why = "HF_HUB_OFFLINE is set" if _hub_offline() else f"{host} can't be reached (offline?)"
    where = cache_dir or "the local cache"
    return ModelLoadError(
        f"could not fetch the weights for {what}: they are not in {where} and {why}. Fetch them once on a "
        "connected machine (the same command downloads them), or pass --pretrained PATH (a local checkpoint file), "
        "or --model DIR (a directory written by `mmr train-encoder`)."
    )


class _hub_requests:
    """With ``allowed=False``: huggingface_hub answers from its cache only (no request, no retry)
    while open_clip loads weights known to be cached; the setting is restored afterwards."""

    def __init__(self, *, allowed: bool):
        self.allowed = allowed

    def __enter__(self) -> None:
        from huggingface_hub import constants

        self.before = constants.HF_HUB_OFFLINE
        if not self.allowed:
            constants.HF_HUB_OFFLINE = True

    def __exit__(self, *exc: Any) -> None:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = self.before


class _no_duplicate_warning:
    """Drops open_clip's own "No pretrained weights loaded" warning (on the root logger) while
    loading: this stage logs one that says what to do about it."""

    @staticmethod
    def filter(record: logging.LogRecord) -> bool:
        return not (record.name == "root" and str(record.msg).startswith("No pretrained weights loaded"))

    def __enter__(self) -> None:
        logging.getLogger().addFilter(self.filter)

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger().removeFilter(self.filter)


def _fingerprint(name: str, weights: str) -> str:
    """Architecture (its config; for hf-hub its name) + weights identity, hashed."""
    arch = name if name.startswith(("hf-hub:", "local-dir:")) else json.dumps(_model_cfg(name), sort_keys=True)
    if name.startswith("local-dir:"):
        arch = "local-dir"  # the weights identity already covers the config file
    return hashlib.sha256(f"{arch}|{weights}".encode()).hexdigest()[:16]


def _model_cfg(name: str) -> dict:
    """open_clip's config of architecture ``name`` ({} if it has none). Before open_clip is
    imported, read from the same JSON files it reads (its own ``model_configs``, then the tiny
    ones shipped here), so that a fingerprint costs no torch import; once it is imported (it may
    hold configs registered at run time), open_clip answers."""
    if "open_clip" not in sys.modules:
        cfg = _config_files().get(name)
        if cfg is not None:
            return json.loads(cfg.read_text())
    import open_clip

    from ...models.tiny import register_tiny_configs

    register_tiny_configs()
    return open_clip.get_model_config(name) or {}


@functools.lru_cache(maxsize=1)
def _config_files() -> dict[str, Path]:
    """Architecture name -> config file, as open_clip registers them (later folders win), found
    without importing open_clip; empty when open_clip is not installed."""
    import importlib.util

    from ...models.tiny import CONFIG_DIR

    spec = importlib.util.find_spec("open_clip")
    folders = [Path(d) / "model_configs" for d in (spec.submodule_search_locations or [])] if spec else []
    files: dict[str, Path] = {}
    for folder in [*folders, CONFIG_DIR]:
        for f in sorted(folder.glob("*.json")):
            try:
                cfg = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(cfg, dict) and all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
                files[f.stem] = f
    return files


def _known_models() -> list[str]:
    """The architecture names open_clip knows (``open_clip.list_models()``, tiny ones included)."""
    if "open_clip" not in sys.modules:
        return list(_config_files())
    import open_clip

    from ...models.tiny import register_tiny_configs

    register_tiny_configs()
    return open_clip.list_models()


def _default_tag(model: str) -> str:
    """The weights an architecture gets when none are named: ours for the common ones, else
    open_clip's first tag; "none" (seeded random) for the tiny ones shipped here and for an
    architecture without published weights."""
    from ...models.tiny import CONFIG_DIR

    if model in DEFAULT_PRETRAINED:
        return DEFAULT_PRETRAINED[model]
    if (CONFIG_DIR / f"{model}.json").is_file():
        return "none"
    return (_pretrained_tags(model)[:1] or ["none"])[0]


def _pretrained_tags(model: str) -> list[str]:
    import open_clip

    return open_clip.list_pretrained_tags_by_model(model)


def _trim_exact(model) -> bool:
    """True when running the text tower on fewer positions than the context length is exact: an
    open_clip ``CLIP`` (text tower inline, not an HF or custom one) whose attention mask is causal
    (-inf exactly above the diagonal) and which pools at the end-of-text token (``argmax``/``eos``;
    ``last`` reads the final position, which trimming would move). Anything else (non-causal or
    padding-masked towers, other pooling) keeps the full path."""
    import torch

    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "text_pool_type")
    mask = getattr(model, "attn_mask", None)
    if not all(hasattr(model, a) for a in needed) or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return False
    n = model.positional_embedding.shape[0]
    if mask.shape != (n, n):
        return False
    above = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)
    causal = bool((torch.isneginf(mask) == above).all()) and bool((mask[~above] == 0).all())
    pool = model.text_pool_type
    return causal and (pool == "argmax" or (pool == "eos" and getattr(model, "text_eos_id", None) is not None))


def _text_final_norm(model):
    if hasattr(model, "ln_final"):
        return model.ln_final
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "ln_final"):
        return text.ln_final
    return None


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None and hasattr(tokenizer, "tokenizer"):
        pad = getattr(tokenizer.tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _load_error(name: str, pretrained: str | None, e: Exception) -> ModelLoadError:
    text = f"{type(e).__name__}: {e}"
    remote = name.startswith("hf-hub:") or (pretrained is not None and not Path(pretrained).is_file())
    if remote:
        what = name if name.startswith("hf-hub:") else f"{name} / {pretrained}"
        return ModelLoadError(
            f"could not fetch the weights for {what} ({text}). If this machine is offline, fetch them "
            "on a connected machine and pass --pretrained PATH (a local checkpoint file), or --model DIR "
            "(a directory written by `mmr train-encoder`)."
        )
    return ModelLoadError(f"could not load {name} with weights {pretrained}: {text}")
