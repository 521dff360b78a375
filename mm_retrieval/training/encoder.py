"""Train (or fine-tune) a CLIP-style dual encoder on one of our image-caption tables.

:func:`train_encoder` wraps ``open_clip_train`` (shipped with open-clip-torch) and runs it as a
child process, so its logging setup, global seeds and distributed initialisation never touch the
caller. It

1. reads the table (``.csv``, ``.parquet`` or ``.jsonl`` with ``path`` and ``caption`` columns),
   drops rows whose image is missing and writes the tab-separated CSV open_clip_train reads to
   ``OUT/_work/train.tsv``;
2. runs ``open_clip_train.main`` through :func:`_launch`, a small launcher that registers our model
   configs (``mmr-tiny``, ``mmr-small``, a user's JSON file) in the child and records the exact
   model config and preprocessing the child built;
3. converts the last ``epoch_N.pt`` into the layout open_clip loads with ``local-dir:OUT``::

       OUT/open_clip_config.json        {"model_cfg": ..., "preprocess_cfg": ...}
       OUT/open_clip_model.safetensors  the state dict
       OUT/mmr_encoder.json             provenance (format "mm_retrieval.encoder/1")
       OUT/train.log                    open_clip_train's log of the run

   and removes ``OUT/_work`` (checkpoints included) unless ``keep_work=True``.
"""

from __future__ import annotations

import collections
import difflib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from mm_retrieval.devices import resolve_device
from mm_retrieval.errors import ConfigError, InputError, ModelLoadError, StageError

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

FORMAT = "mm_retrieval.encoder/1"
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
PROVENANCE_NAME = "mmr_encoder.json"
STAGE = "train-encoder"

_WORK = "_work"
_RUN_NAME = "run"  # open_clip_train's --name: logs and checkpoints go to _work/run/
_RECORD_NAME = "model_record.json"
_TABLE_READERS = {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl"}
# Variables that would make open_clip_train join a distributed job the caller is part of.
_DISTRIBUTED_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID")
_LOSS_RE = re.compile(r"Train Epoch: (\d+) .*?(?<![\w])Loss: (\S+) \((\S+)\)")
_TAIL_LINES = 40
_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")  # as open_clip's hub export
# Relayed at INFO with progress on; the per-batch "Train Epoch" lines are summed up per epoch instead.
_PROGRESS_MARKERS = ("resume checkpoint", "=> resuming")


@dataclass(frozen=True)
class EncoderTrainConfig:
    """Hyper-parameters of :func:`train_encoder`; invalid values raise ConfigError.

    ``mmr train-encoder`` takes its option defaults from ``DEFAULTS``, so the library and the
    command line train the same way unless told otherwise. Torch-free: ``--help`` shows them cheaply.
    """

    # Passes over the table: enough for a from-scratch tiny model on a few thousand pairs; a
    # pretrained start usually needs fewer. A checkpoint is saved after each (``resume``).
    epochs: int = 10
    # Pairs per step; in a contrastive loss every other pair of the batch is a negative.
    batch_size: int = 64
    # Peak rate (cosine schedule after warm-up), the demo's recipe for models trained from scratch;
    # fine-tuning pretrained weights wants a much smaller one (~1e-5).
    lr: float = 1e-3
    # AdamW weight decay (open_clip_train leaves gains, biases and the logit scale undecayed).
    wd: float = 0.1
    # Data-loading processes of open_clip_train.
    workers: int = 2
    # Seeds open_clip_train: initial weights and the order of the data.
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr >= 0 or not self.wd >= 0:  # `not >=` also rejects NaN
            raise ConfigError(f"lr and wd must be >= 0, got {self.lr!r} and {self.wd!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ConfigError(f"workers must be an integer >= 0, got {self.workers!r}")


DEFAULTS = EncoderTrainConfig()


@dataclass(frozen=True)
class EncoderTrainResult:
    """What :func:`train_encoder` produced.

    ``final_loss`` is the contrastive loss of the last logged batch and ``epoch_losses`` the
    per-epoch mean of the logged batches (open_clip_train logs every few steps), both ``None`` /
    empty when nothing was trained in this call (e.g. resuming a run that had already finished).
    """

    out_dir: Path
    model_name: str
    epochs: int
    n_pairs: int
    final_loss: float | None
    epoch_losses: tuple[float, ...]
    seconds: float


def train_encoder(
    table: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    model: str = "mmr-tiny",
    pretrained: str | None = None,
    epochs: int = DEFAULTS.epochs,
    batch_size: int = DEFAULTS.batch_size,
    lr: float = DEFAULTS.lr,
    image_size: int | None = None,
    workers: int = DEFAULTS.workers,
    device: str = "auto",
    seed: int = DEFAULTS.seed,
    warmup: int | None = None,
    wd: float = DEFAULTS.wd,
    progress: bool = True,
    extra_args: Sequence[str] = (),
    resume: bool = False,
    keep_work: bool = False,
) -> EncoderTrainResult:
    """Train an open_clip dual encoder on ``table`` and write it to ``out_dir``.

    Args:
        table: ``.csv``/``.parquet``/``.jsonl`` with ``path`` (absolute or relative to the table's
            folder) and ``caption`` columns. Rows whose image file is missing are skipped.
        out_dir: where the encoder is written (see the module docstring for the layout).
        model: an open_clip architecture name (``mmr-tiny``, ``ViT-B-32``, ...) or the path of an
            open_clip model-config JSON file (its file name, minus ``.json``, becomes its name).
        pretrained: an open_clip pretrained tag (downloaded; needs internet) or the path of a local
            checkpoint (``.pt``/``.bin``/``.safetensors``, e.g. a previous ``OUT/open_clip_model
            .safetensors``) to start from; ``None`` trains from scratch.
        epochs, batch_size, lr, wd, workers, seed: passed to open_clip_train (defaults and why:
            :class:`EncoderTrainConfig`). ``batch_size`` is capped at the number of pairs
            (open_clip_train drops the last partial batch).
        image_size: overrides the architecture's image size (``--force-image-size``).
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
            Mixed precision (``amp``) is used on CUDA, fp32 elsewhere.
        warmup: learning-rate warmup steps; ``None`` means 10% of all training steps.
        progress: log open_clip_train's progress lines at INFO (else at DEBUG).
        extra_args: more open_clip_train flags, appended last so they win (e.g.
            ``["--lock-image", "--precision", "bf16"]``).
        resume: continue from the newest checkpoint a previous, interrupted call with the same
            ``out_dir`` left in ``OUT/_work`` (open_clip_train's ``--resume latest``).
        keep_work: keep ``OUT/_work`` (the CSV, raw ``epoch_N.pt`` checkpoints, logs).

    Raises:
        InputError: bad table (missing, unsupported type, no ``caption``/``path`` column, no
            usable rows) or a missing pretrained checkpoint file.
        ConfigError: an invalid hyper-parameter, unknown model name or pretrained tag, an invalid
            model-config file, or a device that is unknown or unavailable (``cuda`` without CUDA).
        ModelLoadError: pretrained weights could not be downloaded.
        StageError: open_clip_train failed; the message carries the tail of its log.
    """
    started = time.monotonic()
    EncoderTrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, wd=wd, workers=workers, seed=seed)  # ConfigError first
    table = Path(table).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()

    pairs = load_pairs(table)
    arch, model_arg, config_files = _resolve_model(model)
    pretrained_arg = _resolve_pretrained(pretrained, arch)
    device = resolve_device(device)  # ConfigError now, not a failed subprocess later

    work = out_dir / _WORK
    run_dir = work / _RUN_NAME
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)  # open_clip_train refuses to reuse an experiment name
    work.mkdir(parents=True, exist_ok=True)
    csv_path = work / "train.tsv"
    pairs.to_csv(csv_path, sep="\t", index=False)

    n_pairs = len(pairs)
    if batch_size > n_pairs:
        logger.warning("batch size %d > %d pairs; using %d", batch_size, n_pairs, n_pairs)
        batch_size = n_pairs
    steps_per_epoch = n_pairs // batch_size
    if warmup is None:
        warmup = (steps_per_epoch * epochs) // 10

    argv = [
        "--train-data", str(csv_path),
        "--dataset-type", "csv",
        "--csv-separator", "\t",
        "--csv-img-key", "path",
        "--csv-caption-key", "caption",
        "--model", model_arg,
        "--epochs", str(epochs),
        "--batch-size", str(batch_size),
        "--lr", str(lr),
        "--wd", str(wd),
        "--warmup", str(warmup),
        "--workers", str(workers),
        "--seed", str(seed),
        "--device", device,
        "--precision", "amp" if device.startswith("cuda") else "fp32",
        "--logs", str(work),
        "--name", _RUN_NAME,
        "--save-frequency", "1",  # every epoch, so an interrupted run can resume
        "--delete-previous-checkpoint",  # ...keeping only the newest one on disk
        "--log-every-n-steps", str(max(1, min(100, steps_per_epoch // 10))),
        "--report-to", "",
    ]
    if pretrained_arg:
        argv += ["--pretrained", pretrained_arg]
    if image_size is not None:
        argv += ["--force-image-size", str(image_size)]
    if resume:
        argv += ["--resume", "latest"]
    argv += [str(a) for a in extra_args]

    record_path = work / _RECORD_NAME
    record_path.unlink(missing_ok=True)
    logger.info(
        "training %s on %d pairs from %s: %d epochs, batch %d, device %s",
        arch, n_pairs, table, epochs, batch_size, device,
    )
    final_loss, epoch_losses = _run_open_clip_train(
        argv, {"configs": config_files, "record": str(record_path)}, progress, pretrained,
        run_dir / "out.log",
    )

    checkpoint = run_dir / "checkpoints" / f"epoch_{epochs}.pt"
    if not checkpoint.is_file():
        raise StageError(STAGE, f"open_clip_train finished but wrote no {checkpoint}")
    _export(checkpoint, json.loads(record_path.read_text()), out_dir)
    provenance = {
        "format": FORMAT,
        "base_model": arch,
        "model_config_file": config_files[0] if config_files else None,
        "pretrained": pretrained_arg or None,
        "epochs": epochs,
        "table": str(table),
        "n_pairs": n_pairs,
        "image_size": image_size,
        "final_loss": final_loss,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out_dir / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n")
    log_file = run_dir / "out.log"
    if log_file.is_file():
        shutil.copyfile(log_file, out_dir / "train.log")
    if not keep_work:
        shutil.rmtree(work)

    seconds = time.monotonic() - started
    logger.info("encoder written to %s in %.1fs (final loss %s)", out_dir, seconds, final_loss)
    return EncoderTrainResult(
        out_dir=out_dir,
        model_name=arch,
        epochs=epochs,
        n_pairs=n_pairs,
        final_loss=final_loss,
        epoch_losses=epoch_losses,
        seconds=seconds,
    )


def load_pairs(table: Path) -> pd.DataFrame:
    """Read ``table`` into a DataFrame of ``path`` (absolute) and ``caption`` for usable rows."""
    import pandas as pd

    if not table.is_file():
        raise InputError(f"table not found: {table}")
    kind = _TABLE_READERS.get(table.suffix.lower())
    if kind is None:
        raise InputError(
            f"unsupported table type {table.suffix!r} ({table}); use .csv, .parquet or .jsonl"
        )
    try:
        if kind == "csv":
            df = pd.read_csv(table)
        elif kind == "parquet":
            df = pd.read_parquet(table)
        else:
            df = pd.read_json(table, lines=True)
    except Exception as e:  # pandas/pyarrow raise many types for unreadable files
        raise InputError(f"could not read table {table}: {e}") from e

    if "caption" not in df.columns:
        raise InputError(
            f"table {table} has no 'caption' column (columns: {', '.join(map(str, df.columns))}); "
            "a table without captions can't train an encoder; add a caption column"
        )
    if "path" not in df.columns:
        raise InputError(f"table {table} has no 'path' column with the image files")

    total = len(df)
    df = df[["path", "caption"]].dropna()
    df = df.assign(caption=df["caption"].astype(str).str.strip())
    df = df[df["caption"] != ""]
    no_caption = total - len(df)
    paths = [Path(p).expanduser() for p in df["path"].astype(str)]
    paths = [p if p.is_absolute() else table.parent / p for p in paths]
    exists = [p.is_file() for p in paths]
    missing = [str(p) for p, ok in zip(paths, exists) if not ok]
    pairs = pd.DataFrame(
        {"path": [str(p) for p, ok in zip(paths, exists) if ok],
         "caption": [c for c, ok in zip(df["caption"], exists) if ok]}
    )
    if no_caption:
        logger.warning("skipped %d of %d rows without a caption or path", no_caption, total)
    if missing:
        logger.warning(
            "skipped %d of %d rows whose image file is missing (first: %s)",
            len(missing), total, missing[0],
        )
    if len(pairs) < 2:
        raise InputError(
            f"table {table} has {len(pairs)} usable rows (of {total}; {len(missing)} with a "
            "missing image file); contrastive training needs at least 2 image-caption pairs"
        )
    return pairs


def _resolve_model(model: str) -> tuple[str, str, list[str]]:
    """Return (architecture name, ``--model`` value, config files the child must register)."""
    import open_clip

    from mm_retrieval.models.tiny import register_tiny_configs

    path = Path(model).expanduser()
    if path.suffix.lower() == ".json":  # open_clip only registers *.json config files
        if not path.is_file():
            raise InputError(f"model config file not found: {path}")
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"could not read model config {path}: {e}") from e
        if not isinstance(cfg, dict) or not all(k in cfg for k in _CONFIG_KEYS):
            raise ConfigError(
                f"{path} is not an open_clip model config: it needs 'embed_dim', 'vision_cfg' "
                "and 'text_cfg' (see mm_retrieval/models/configs/mmr-tiny.json)"
            )
        return path.stem, path.stem, [str(path.resolve())]

    register_tiny_configs()
    known = open_clip.list_models()
    if model not in known:
        close = difflib.get_close_matches(model, known, n=5, cutoff=0.5)
        examples = close or register_tiny_configs() + ["ViT-B-32", "ViT-B-16", "RN50"]
        raise ConfigError(
            f"unknown model {model!r}; use an open_clip architecture name such as "
            f"{', '.join(examples)} (all {len(known)}: open_clip.list_models()) "
            "or the path of an open_clip model-config JSON file"
        )
    return model, model, []


def _resolve_pretrained(pretrained: str | None, arch: str) -> str:
    """Validate ``pretrained`` (tag or file); return the ``--pretrained`` value ('' for none)."""
    import open_clip

    if not pretrained:
        return ""
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path.resolve())
    if open_clip.get_pretrained_cfg(arch, pretrained):
        return pretrained
    if os.sep in pretrained or path.suffix in (".pt", ".pth", ".bin", ".safetensors", ".npz"):
        raise InputError(f"pretrained checkpoint not found: {path}")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    raise ConfigError(
        f"unknown pretrained tag {pretrained!r} for {arch}; known tags: "
        f"{', '.join(tags) if tags else '(none)'}. Or pass the path of a local checkpoint."
    )


def _run_open_clip_train(
    argv: list[str], spec: dict[str, Any], progress: bool, pretrained: str | None, log_file: Path
) -> tuple[float | None, tuple[float, ...]]:
    """Run open_clip_train in a child process, relaying its log; return the parsed losses."""
    import mm_retrieval

    env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_ENV}
    package_root = str(Path(mm_retrieval.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [
        sys.executable, "-c",
        "from mm_retrieval.training.encoder import _launch; _launch()",
        json.dumps(spec), *argv,
    ]
    logger.debug("running %s", cmd)

    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    epoch_avg: dict[int, float] = {}
    final_loss = None
    epochs = int(argv[argv.index("--epochs") + 1])
    started = time.monotonic()
    done: set[int] = set()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        errors="replace", bufsize=1,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            match = _LOSS_RE.search(line)
            if match:
                final_loss = float(match.group(2))
                epoch_avg[int(match.group(1))] = float(match.group(3))
            logger.log(_level_of(line, progress), "open_clip_train: %s", line)
            started_epoch = _started_epoch(line)  # a new epoch starts: the ones before it are done
            for e in sorted(e for e in epoch_avg if e not in done and e < started_epoch):
                done.add(e)
                _log_epoch(e, epochs, epoch_avg[e], started, len(done), progress)
        rc = proc.wait()
        for e in sorted(set(epoch_avg) - done) if rc == 0 else ():  # the last epoch
            done.add(e)
            _log_epoch(e, epochs, epoch_avg[e], started, len(done), progress)
    finally:
        if proc.poll() is None:  # interrupted (e.g. KeyboardInterrupt): don't leave it running
            proc.terminate()
            proc.wait()

    if rc != 0:
        log = "\n".join(tail)
        cause = next((ln for ln in reversed(tail) if "Failed to download weights" in ln), None)
        if cause:
            raise ModelLoadError(
                f"pretrained weights {pretrained!r} could not be fetched (no internet, or the hub "
                "is unreachable). Download them on a connected machine and pass "
                f"--pretrained PATH to the local checkpoint. Cause: {cause.split('| ')[-1]}"
            )
        raise StageError(
            STAGE, f"open_clip_train failed (exit code {rc}; full log: {log_file}). "
            f"Its last lines:\n{log}"
        )
    return final_loss, tuple(epoch_avg[e] for e in sorted(epoch_avg))


def _started_epoch(line: str) -> int:
    match = re.search(r"Start epoch (\d+)", line)
    return int(match.group(1)) if match else -1


def _log_epoch(epoch: int, epochs: int, loss: float, started: float, n_done: int, progress: bool) -> None:
    """One progress line per finished epoch: its mean loss, time so far and an estimate of the rest."""
    elapsed = time.monotonic() - started
    eta = elapsed / n_done * max(0, epochs - epoch - 1)
    logger.log(logging.INFO if progress else logging.DEBUG,
               "train-encoder: epoch %d/%d loss %.4f (%.0fs so far, ~%.0fs left)", epoch + 1, epochs, loss, elapsed, eta)


def _level_of(line: str, progress: bool) -> int:
    """The level at which to relay one line of open_clip_train's output."""
    if ("| ERROR |" in line or "| WARNING |" in line) and "initialized randomly" not in line:
        return logging.WARNING
    if progress and any(marker in line for marker in _PROGRESS_MARKERS):
        return logging.INFO
    return logging.DEBUG


def _export(checkpoint: Path, record: dict[str, Any], out_dir: Path) -> None:
    """Write ``checkpoint`` (an open_clip_train ``epoch_N.pt``) as an open_clip ``local-dir``."""
    import torch
    from safetensors.torch import save_file

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = ckpt["state_dict"] if "state_dict" in ckpt else ckpt
    state = {k.removeprefix("module."): v for k, v in state.items()}
    seen: set[int] = set()
    tensors = {}
    for key, tensor in state.items():
        # safetensors refuses tensors sharing memory (tied weights): give those their own copy.
        ptr = tensor.untyped_storage().data_ptr()
        tensors[key] = tensor.clone().contiguous() if ptr in seen else tensor.contiguous()
        seen.add(ptr)

    pp = record["preprocess_cfg"]
    config = {
        "model_cfg": record["model_cfg"],
        "preprocess_cfg": {k: pp[k] for k in _PREPROCESS_KEYS if k in pp},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out_dir / WEIGHTS_NAME)
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def _launch() -> None:
    """Entry point of the child process: ``python -c ... SPEC_JSON OPEN_CLIP_TRAIN_ARGS...``.

    Registers the model configs (open_clip_train resolves ``--model`` by name, in its own
    process), records the model config and preprocessing the trainer really built (after every
    ``--force-*`` flag) to ``spec["record"]``, then runs ``open_clip_train.main.main``.
    """
    spec = json.loads(sys.argv[1])
    argv = sys.argv[2:]

    import open_clip
    import open_clip_train.main as trainer

    from mm_retrieval.models.tiny import register_tiny_configs

    register_tiny_configs()
    for path in spec["configs"]:
        open_clip.add_model_config(path)

    create = trainer.create_model_and_transforms

    def create_and_record(model_name, pretrained=None, **kwargs):
        result = create(model_name, pretrained, **kwargs)
        if not os.path.exists(spec["record"]):  # the first call builds the trained model
            cfg = open_clip.get_model_config(model_name)
            if kwargs.get("force_quick_gelu"):
                cfg["quick_gelu"] = True
            if kwargs.get("force_custom_text"):
                cfg["custom_text"] = True
            for flag, section, key in (
                ("force_image_size", "vision_cfg", "image_size"),
                ("force_patch_dropout", "vision_cfg", "patch_dropout"),
                ("force_context_length", "text_cfg", "context_length"),
            ):
                if kwargs.get(flag) is not None:
                    cfg[section][key] = kwargs[flag]
            for key in ("init_logit_scale", "init_logit_bias"):  # set by --siglip
                if key in kwargs:
                    cfg[key] = float(kwargs[key])
            preprocess_cfg = open_clip.get_model_preprocess_cfg(result[0])
            with open(spec["record"], "w") as f:
                json.dump({"model_cfg": cfg, "preprocess_cfg": preprocess_cfg}, f, indent=2)
        return result

    trainer.create_model_and_transforms = create_and_record
    rc = trainer.main(argv)
    sys.exit(1 if rc == -1 else 0)  # main() returns -1 (after printing why) on some errors
