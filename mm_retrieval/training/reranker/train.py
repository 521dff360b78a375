"""``train_reranker``: read the table, encode it once, split it, run the loop, write the checkpoint."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mm_retrieval.training.reranker.config import DEFAULTS, RerankerTrainConfig
from mm_retrieval.training.reranker.state import STATE_FILE

if TYPE_CHECKING:
    from mm_retrieval.stages.encoders.open_clip import OpenClipEncoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RerankerTrainResult:
    """What :func:`train_reranker` produced.

    ``val`` has ``first_stage`` and ``reranked`` metric dicts (``R@1``, ``R@5``, ``R@10``, ``MRR``
    over the val captions, and ``contrast`` -- own image above its twins' -- where captions have
    twins; ``reranked`` is the shipped model's) plus ``queries``, ``images`` and
    ``depth`` (candidates reranked per caption). ``history`` has one dict per epoch, starting with
    epoch 0 (the untrained model, ``loss`` None): ``epoch``, ``loss`` (mean training loss) and the
    reranked val metrics. ``best_epoch`` 0 means the shipped model is the initial one, which ranks
    exactly like the first stage.
    """

    out_dir: Path
    epochs_run: int
    best_epoch: int
    val: dict[str, Any]
    seconds: float
    n_train: int
    n_val: int
    history: tuple[dict[str, Any], ...] = ()

    @property
    def epoch_losses(self) -> tuple[float, ...]:
        """Mean training loss of each trained epoch (1, 2, ...)."""
        return tuple(h["loss"] for h in self.history if h["loss"] is not None)


def train_reranker(
    table: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    model: str | None = None,
    pretrained: str | None = None,
    device: str = "auto",
    reranker_config: dict[str, Any] | None = None,
    epochs: int = DEFAULTS.epochs,
    batch_size: int = DEFAULTS.batch_size,
    lr: float = DEFAULTS.lr,
    weight_decay: float = DEFAULTS.weight_decay,
    negatives: int = DEFAULTS.negatives,
    hard_pool: int = DEFAULTS.hard_pool,
    val_fraction: float = DEFAULTS.val_fraction,
    patience: int = DEFAULTS.patience,
    seed: int = DEFAULTS.seed,
    resume: bool = False,
    keep_state: bool = False,
    progress: bool = True,
    workers: int = 2,
    encoder: OpenClipEncoder | None = None,
    split_by: Sequence[str] = DEFAULTS.split_by,
    objective: str = DEFAULTS.objective,
    binding: bool = DEFAULTS.binding,
) -> RerankerTrainResult:
    """Train a cross-attention reranker on ``table`` over a frozen dual encoder; write it to ``out_dir``.

    See :mod:`mm_retrieval.training.reranker` for the recipe and
    :class:`~mm_retrieval.training.reranker.config.RerankerTrainConfig` for why each default is
    what it is (``mmr train-reranker`` shares them).

    Args:
        table: ``.csv``/``.parquet``/``.jsonl`` with ``path`` and ``caption`` columns (and optionally
            ``group``: rows of one group never straddle the train/val split).
        out_dir: checkpoint directory, written by
            :func:`~mm_retrieval.stages.rerankers.cross_attention.checkpoint.save_reranker`.
        model, pretrained: the encoder (as for the ``open_clip`` encoder stage) when ``encoder`` is
            not given; ``model=None`` is ``ViT-B-32``.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:N``; used for the reranker,
            and for the encoder when it is built here.
        reranker_config: overrides for
            :class:`~mm_retrieval.stages.rerankers.cross_attention.model.RerankerConfig` (``width``,
            ``depth``, ``heads``, ``kv_heads``, ``memory_dim``, ...). ``text_dim``, ``image_dim``
            come from the encoder and ``retrieval_scale_init`` defaults to its CLIP logit scale.
        epochs: the last epoch to train (counting epochs of a resumed run too).
        batch_size: training rows (captions) per step; each brings ``1 + negatives`` candidates.
        lr, weight_decay: AdamW; weight decay only on matrices (it pulls the head toward zero, i.e.
            toward the first stage).
        negatives: hard negatives per caption per step, drawn from its ``hard_pool`` best-ranked
            non-relevant images (both capped by the training gallery).
        val_fraction: share of split units held out for validation, in (0, 1).
        patience: stop after this many epochs without a better val R@1.
        seed: seeds the split, the initial weights and the sampling; CPU runs are deterministic.
        resume: continue from ``out_dir/_train_state.pt`` (left by an interrupted run, or by
            ``keep_state=True``); without one, training starts from scratch.
        keep_state: keep ``_train_state.pt`` after success so a later ``resume=True`` call with
            more ``epochs`` can extend the run.
        progress: tqdm progress bars on stderr.
        workers: image-decoding processes when the encoder is built here.
        encoder: an already-built ``OpenClipEncoder`` to use instead of ``model``/``pretrained``.
        split_by: columns whose shared values keep rows on one side of the train/val split
            (``group`` is skipped when absent). For the compositional set, ``("group",
            "combination")`` validates on attribute combinations training never saw, which is
            what the held-out test measures; by group alone, val shares combinations with train
            and rewards memorising them.
        objective: ``separate`` (the head ranks on its own; the first stage's weight is fitted on
            val) or ``residual`` (the head learns corrections on top of the first stage's scores).

    Raises:
        InputError: missing/unreadable table, no ``caption`` column, no usable rows, too few images
            or groups to split.
        ConfigError: invalid hyper-parameters or ``reranker_config``.
        IncompatibleError: ``resume=True`` with a state from a different table/encoder/settings.
        ModelLoadError: the encoder could not be loaded.
    """
    import torch

    from mm_retrieval.devices import resolve_device
    from mm_retrieval.training.reranker import data, split
    from mm_retrieval.training.reranker.loop import TrainLoop
    from mm_retrieval.training.reranker.state import check_signature, read_state, write_state

    started = time.monotonic()
    recipe = RerankerTrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, negatives=negatives,
        hard_pool=hard_pool, val_fraction=val_fraction, patience=patience, seed=seed,
        split_by=tuple(split_by), objective=objective, binding=binding,
    )  # ConfigError before any work
    table = Path(table).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    rows = data.read_rows(table, recipe.split_by)

    if encoder is None:
        encoder = _build_encoder(model, pretrained, device, workers)
    signature = {
        "table": str(table),
        "encoder_fingerprint": encoder.fingerprint,
        "seed": recipe.seed,
        "batch_size": recipe.batch_size,
        "lr": float(recipe.lr),
        "weight_decay": float(recipe.weight_decay),
        "val_fraction": float(recipe.val_fraction),
        "n_rows": len(rows),
        "split_by": list(recipe.split_by),
        "objective": recipe.objective,
        "binding": recipe.binding,
    }
    state_path = out_dir / STATE_FILE
    state = None
    if resume and state_path.is_file():  # check it before spending minutes on encoding
        state = read_state(state_path)
        check_signature(state_path, state, signature)
    encoder.warm_up()
    run_device = torch.device(resolve_device(device))

    feats = data.encode(encoder, rows, progress)
    binding_stats = None
    if recipe.binding:
        from mm_retrieval.training.reranker.binding import add_binding_negatives

        binding_stats = add_binding_negatives(feats, encoder, feats.captions)
    train, val = split.split(feats, recipe.val_fraction, recipe.seed)
    model_cfg = data.model_config(encoder, feats, reranker_config)
    if model_cfg.local_channels:
        from mm_retrieval.training.reranker.binding import load_pixels

        feats.pixels = load_pixels(encoder, feats.image_paths)
    n_neg, pool = split.negative_counts(train, recipe.negatives, recipe.hard_pool)
    train_pool = split.hard_pools(train, pool)
    logger.info(
        "train-reranker: %d train rows (%d images), %d val rows (%d images); %d hard negatives "
        "per caption from the top %d",
        len(train.row_query), len(train.images), len(val.row_query), len(val.images), n_neg, pool,
    )

    # What a resumed run must share with the one that wrote the state.
    signature.update(config=model_cfg.to_dict(), negatives=n_neg, hard_pool=pool)
    with torch.random.fork_rng(devices=[]):  # seed locally; leave the caller's RNG untouched
        torch.manual_seed(recipe.seed)
        loop = TrainLoop(model_cfg, feats, train, train_pool, val, n_neg, run_device, recipe)
        if state is not None:
            check_signature(state_path, state, signature)
            loop.load_state(state)
            logger.info("train-reranker: resuming after epoch %d from %s", loop.epoch, state_path)
        else:
            if resume:
                logger.info("train-reranker: no %s in %s; starting from scratch", STATE_FILE, out_dir)
            loop.evaluate_initial()
        loop.run(recipe.epochs, recipe.patience, progress,
                 lambda: write_state(state_path, loop.state(), signature))

    best = loop.best_model()
    first_stage = dict(loop.first_stage_metrics)
    if "contrast" in loop.history[0]:  # epoch 0 ranks exactly like the first stage
        first_stage["contrast"] = loop.history[0]["contrast"]
    val_report = {
        "first_stage": first_stage,
        "reranked": loop.best_metrics,
        "queries": len(val.queries),
        "images": len(val.images),
        "depth": loop.depth,
    }
    info = encoder.info()
    extra = {
        "table": str(table),
        "val": val_report,
        "epochs_run": loop.epoch,
        "best_epoch": loop.best_epoch,
        "history": loop.history,
        "encoder": {"model": info.get("model"), "pretrained": info.get("pretrained")},
        "negatives": n_neg,
        "hard_pool": pool,
        "batch_size": recipe.batch_size,
        "lr": float(recipe.lr),
        "weight_decay": float(recipe.weight_decay),
        "seed": recipe.seed,
        "n_train": len(train.row_query),
        "n_val": len(val.row_query),
        "split_by": list(recipe.split_by),
        "objective": recipe.objective,
        "binding": binding_stats,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    from mm_retrieval.stages.rerankers.cross_attention.checkpoint import save_reranker

    save_reranker(best, out_dir, encoder_fingerprint=encoder.fingerprint, extra=extra)
    if not keep_state:
        state_path.unlink(missing_ok=True)
    first, reranked = val_report["first_stage"]["R@1"], val_report["reranked"]["R@1"]
    logger.info(
        "train-reranker: val R@1 %.3f (first stage %.3f), best epoch %d of %d; wrote %s",
        reranked, first, loop.best_epoch, loop.epoch, out_dir,
    )
    return RerankerTrainResult(
        out_dir=out_dir,
        epochs_run=loop.epoch,
        best_epoch=loop.best_epoch,
        val=val_report,
        seconds=time.monotonic() - started,
        n_train=len(train.row_query),
        n_val=len(val.row_query),
        history=tuple(loop.history),
    )


def _build_encoder(model: str | None, pretrained: str | None, device: str, workers: int) -> OpenClipEncoder:
    from mm_retrieval.stages.encoders.open_clip import DEFAULT_MODEL, OpenClipEncoder

    config = {"model": model or DEFAULT_MODEL, "device": device, "workers": workers}
    if pretrained is not None:
        config["pretrained"] = pretrained
    return OpenClipEncoder(config)
