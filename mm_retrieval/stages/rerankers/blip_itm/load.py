"""Finding and loading a BLIP image-text retrieval checkpoint.

A checkpoint is named by a Hugging Face hub id (``Salesforce/blip-itm-base-coco``, or any BLIP
retrieval model) or a local directory written by ``save_pretrained`` (model + processor). Hub
names resolve to a local snapshot in the Hugging Face cache: a complete cached snapshot is used
without touching the network; otherwise only ``config.json`` is fetched first, so a model that is
not a BLIP retrieval model is refused before gigabytes are downloaded. Offline (``HF_HUB_OFFLINE``
set, or no connection) and not cached, loading fails at once with one message naming
``--rerank PATH``.

Weights load from safetensors; a checkpoint with only ``pytorch_model*.bin`` files is first
loaded with ``torch.load(weights_only=True)`` (which never runs code from the file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ....digest import check_tensor_checkpoint, file_digest
from ....errors import ConfigError, MissingDependencyError, ModelLoadError

DEFAULT_CHECKPOINT = "Salesforce/blip-itm-base-coco"
EXAMPLES = "Salesforce/blip-itm-base-coco (or -large-coco, -base-flickr, -large-flickr)"
RETRIEVAL_ARCHITECTURE = "BlipForImageTextRetrieval"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a BLIP checkpoint needs (a hub repo also holds pytorch_model.bin / tf_model.h5: not fetched).
_HUB_FILES = [
    "config.json", "preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
    "vocab.txt", "special_tokens_map.json", "added_tokens.json", "*.safetensors", "model.safetensors.index.json",
]
_PICKLED = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
_TRANSFORMERS_MIN = "4.45"


def require_transformers() -> None:
    """MissingDependencyError with the pip command when transformers is absent."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(f"transformers>={_TRANSFORMERS_MIN}", purpose="the BLIP reranker (reranker/blip_itm)") from e


def looks_like_blip(ref: str) -> bool:
    """Whether ``--rerank REF`` names a BLIP checkpoint rather than one of ours (cheap: no model
    import, no network). A directory with a ``config.json`` (the transformers layout) is BLIP's;
    a directory of ours has ``reranker.json``; a name that is no local path but looks like a hub
    id (``org/name``) is a hub checkpoint, which only this stage can load."""
    p = Path(ref).expanduser()
    if p.is_dir():
        return (p / "config.json").is_file() and not (p / "reranker.json").is_file()
    return not p.exists() and bool(_HUB_ID.match(ref))


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


# ---- resolving a name to a local directory -----------------------------------------------
def resolve_checkpoint(ref: str, *, cache_dir: str | None = None) -> Path:
    """The local directory holding checkpoint ``ref`` (a directory, or a hub id fetched or cached)."""
    if not ref:
        raise ConfigError(f"the BLIP reranker needs a checkpoint: pass --rerank {DEFAULT_CHECKPOINT} or a directory saved from one")
    p = Path(ref).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"--rerank {ref}: a BLIP checkpoint is a directory (config.json, model.safetensors, tokenizer), not a file")
        d = p.resolve()
        if not (d / "config.json").is_file():
            ours = " It holds a checkpoint of our cross-attention reranker (reranker/cross_attention)." if (d / "reranker.json").is_file() else ""
            raise ConfigError(f"{d} is not a BLIP checkpoint: it has no config.json.{ours}")
        check_retrieval_config(read_config(d), ref)
        return d
    if not _HUB_ID.match(ref):
        raise ConfigError(f"--rerank {ref}: no such directory, and not a Hugging Face hub id (org/name) such as {DEFAULT_CHECKPOINT}")
    return _from_hub(ref, cache_dir)


def _from_hub(repo: str, cache_dir: str | None) -> Path:
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError as e:  # transformers depends on it: only a broken install gets here
        raise MissingDependencyError("huggingface_hub", purpose=f"fetching {repo}") from e
    cached = _cached_snapshot(repo, cache_dir)
    if cached is not None and _complete(cached):
        check_retrieval_config(read_config(cached), repo)
        return cached
    if hub_offline():
        raise _offline_error(repo, cache_dir, "HF_HUB_OFFLINE is set")
    try:
        config = Path(hf_hub_download(repo, "config.json", cache_dir=cache_dir))
        check_retrieval_config(json.loads(config.read_text()), repo)  # before fetching the weights
        d = Path(snapshot_download(repo, cache_dir=cache_dir, allow_patterns=_HUB_FILES))
        if not _weight_files(d):
            d = Path(snapshot_download(repo, cache_dir=cache_dir, allow_patterns=_HUB_FILES + _PICKLED))
    except (ConfigError, ModelLoadError):
        raise
    except Exception as e:
        raise _hub_error(repo, cache_dir, e) from e
    if not _complete(d):
        raise ModelLoadError(f"{repo} on the Hugging Face hub lacks files a BLIP checkpoint needs (config.json, weights, tokenizer); found {sorted(os.listdir(d))}")
    return d


def _cached_snapshot(repo: str, cache_dir: str | None) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, cache_dir=cache_dir, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError) or a malformed cache entry
        return None


def _complete(d: Path) -> bool:
    tokenizer = (d / "tokenizer.json").is_file() or (d / "vocab.txt").is_file()
    return (d / "config.json").is_file() and tokenizer and bool(_weight_files(d))


def _offline_error(repo: str, cache_dir: str | None, why: str) -> ModelLoadError:
    where = cache_dir or "the Hugging Face cache (HF_HOME)"
    return ModelLoadError(
        f"cannot load the BLIP checkpoint {repo}: there is no such directory here, this machine is offline ({why}) "
        f"and it is not in {where}. "
        f"On a machine with internet run `huggingface-cli download {repo}` (or save it with "
        "BlipForImageTextRetrieval/BlipProcessor .save_pretrained(DIR)), copy the files here and pass --rerank PATH "
        "(the directory), or connect and retry."
    )


def _hub_error(repo: str, cache_dir: str | None, e: Exception) -> ConfigError | ModelLoadError:
    name = type(e).__name__
    if name in ("RepositoryNotFoundError", "RevisionNotFoundError"):
        return ConfigError(
            f"--rerank {repo}: no such directory here, and no such model on the Hugging Face hub (or it is private: "
            f"set HF_TOKEN). Use a BLIP retrieval model such as {EXAMPLES}."
        )
    if name == "GatedRepoError":
        return ModelLoadError(f"{repo} is gated on the Hugging Face hub: accept its terms on huggingface.co and set HF_TOKEN")
    if name == "LocalEntryNotFoundError" or (isinstance(e, (ConnectionError, TimeoutError)) or "connect" in str(e).lower()):
        return _offline_error(repo, cache_dir, "the hub could not be reached")
    return ModelLoadError(f"could not fetch {repo} from the Hugging Face hub ({name}: {e}); retry, or pass --rerank PATH to a local copy")


# ---- what the checkpoint is --------------------------------------------------------------
def read_config(d: Path) -> dict[str, Any]:
    try:
        return json.loads((d / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {d / 'config.json'}: {e}") from e


def check_retrieval_config(config: dict[str, Any], ref: str) -> None:
    """ConfigError unless ``config`` (a config.json) is a BLIP image-text retrieval model."""
    model_type = config.get("model_type")
    archs = [str(a) for a in config.get("architectures") or []]
    listed = f" ({', '.join(archs)})" if archs else ""
    if model_type != "blip":
        raise ConfigError(
            f"{ref} is not a BLIP retrieval model: its config.json says model_type {model_type!r}{listed}. "
            f"--rerank takes a BLIP image-text retrieval checkpoint such as {EXAMPLES}, a directory saved from one, "
            "or a directory written by `mmr train-reranker`."
        )
    if archs and RETRIEVAL_ARCHITECTURE not in archs:
        raise ConfigError(
            f"{ref} is a BLIP model{listed} without the image-text matching head; the reranker needs a "
            f"{RETRIEVAL_ARCHITECTURE} checkpoint such as {EXAMPLES}."
        )


def _weight_files(d: Path) -> list[Path]:
    safe = sorted(d.glob("*.safetensors"))
    return safe or sorted(d.glob("pytorch_model*.bin"))


def checkpoint_digest(d: Path) -> str:
    """Identity of a checkpoint directory: its config files and weights (keys the token cache)."""
    h = hashlib.sha256()
    for name in ("config.json", "preprocessor_config.json", "processor_config.json"):
        if (d / name).is_file():
            h.update(name.encode() + b"\0" + (d / name).read_bytes())
    for w in _weight_files(d):
        h.update(w.name.encode() + b"\0" + file_digest(w).encode())
    return h.hexdigest()


# ---- loading -----------------------------------------------------------------------------
@dataclass
class LoadedBlip:
    """A BLIP retrieval model ready to run, with its tokenizer and image preprocessing config."""

    model: Any  # BlipForImageTextRetrieval, eval mode, on the device
    tokenizer: Any  # a fast BERT tokenizer (word ids and offsets for attention maps)
    image_processor: Any  # BlipImageProcessor: size, mean, std, resample
    directory: Path


def load_blip(d: Path, *, ref: str, device: str) -> LoadedBlip:
    """Load model, tokenizer and image processor from a resolved checkpoint directory."""
    require_transformers()
    from transformers import AutoTokenizer, BlipForImageTextRetrieval, BlipImageProcessor

    weights = _weight_files(d)
    if not weights:
        raise ModelLoadError(f"{ref}: {d} has a config.json but no weights (model.safetensors)")
    safetensors = weights[0].suffix == ".safetensors"
    if not safetensors:
        for w in weights:
            check_tensor_checkpoint(w)
    try:
        with _quiet_loading():
            model, info = BlipForImageTextRetrieval.from_pretrained(
                d, local_files_only=True, use_safetensors=safetensors, output_loading_info=True
            )
        tokenizer = AutoTokenizer.from_pretrained(d, local_files_only=True, use_fast=True)
        processor = BlipImageProcessor.from_pretrained(d, local_files_only=True)
    except (ConfigError, ModelLoadError):
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot load the BLIP checkpoint {ref} from {d}: {type(e).__name__}: {e}") from e
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelLoadError(
            f"{ref}: the weights lack {len(missing)} tensors the retrieval model needs (e.g. {missing[0]}); "
            f"is it a {RETRIEVAL_ARCHITECTURE} checkpoint?"
        )
    if not getattr(model.text_encoder.config, "is_decoder", False):
        raise ConfigError(f"{ref}: text_config.is_decoder is false, so its text encoder has no cross-attention layers")
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"{ref}: no fast tokenizer (tokenizer.json or vocab.txt) could be built from {d}")
    model.eval()
    return LoadedBlip(model=model.to(device), tokenizer=tokenizer, image_processor=processor, directory=d)


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No "Loading weights" progress bar on stderr (every `mmr search --rerank` loads the model)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
