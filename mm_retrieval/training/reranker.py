"""Train the cross-attention reranker (:mod:`mm_retrieval.models.reranker`) on an image-caption table.

The recipe is ALBEF/BLIP's image-text matching with hard negatives from a frozen first stage:

1. **Features, once.** The dual encoder is frozen. Every unique image is encoded once (patch tokens,
   kept in fp16, plus its embedding) and every unique caption once (token features, padding mask,
   embedding); all of it stays in memory as CPU tensors.
2. **Split.** Rows are split into train/val by unit: rows sharing an image or a value of any
   ``split_by`` column (default the contrast ``group``, when the table has it: the four images of a
   group share their caption words, so splitting inside a group would leak) form one unit. Seeded.
3. **Candidates.** The first stage is the cosine similarity over the split's own gallery. A
   caption's relevant images are its row's image and every image whose row has the identical
   caption; its *hard pool* is the ``hard_pool`` best-ranked images that are not relevant.
4. **Loss.** Per training row, ``negatives`` images drawn uniformly (without replacement) from the
   hard pool plus the positive are scored exactly as at inference (``retrieval_scale * cosine +
   head(text tokens x image memory)``, memory computed inside the forward so gradients reach the
   image projection) and a listwise cross-entropy puts the positive first. ALBEF draws negatives in
   proportion to the similarity softmax; with CLIP's logit scale that distribution is so peaked it
   keeps drawing the same few images, and the top of the first stage is already hard, so uniform
   over the pool is both simpler and more varied. Because the scoring is residual and the head
   starts at zero, the initial loss *is* the first stage's own softmax loss on these candidates.
5. **Model selection.** Before training (epoch 0) the reranker ranks exactly like the first stage;
   that is recorded as the baseline. After each epoch the val split is reranked (the first stage's
   top ``min(100, gallery)`` per caption); the best state by val R@1 (ties: MRR) is kept, and
   training stops after ``patience`` epochs without improvement. If nothing beats epoch 0 the
   initial, first-stage-equivalent weights are shipped: a reranker never loses to doing nothing on
   val.
6. **Resumable.** After every epoch ``OUT/_train_state.pt`` holds the model, optimiser, best state,
   history and RNG states (plain tensors and containers, read back with ``weights_only=True``);
   ``resume=True`` continues from it. The learning rate is a short warm-up then constant, so it does
   not depend on ``epochs`` and a finished run can be extended (``keep_state=True``, then
   ``resume=True`` with more epochs) exactly as if it had run longer in one go.

The output directory is a reranker checkpoint (:func:`mm_retrieval.reranking.checkpoint.save_reranker`)
tied to the encoder's fingerprint.

This module imports torch lazily so that ``import mm_retrieval.training`` stays cheap.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mm_retrieval.errors import ConfigError, IncompatibleError, InputError, ModelLoadError

if TYPE_CHECKING:
    import torch

    from mm_retrieval.models.reranker import Reranker, RerankerConfig
    from mm_retrieval.stages.encoders.open_clip import OpenClipEncoder

logger = logging.getLogger(__name__)

__all__ = ["RerankerTrainResult", "train_reranker", "STATE_FILE"]

STATE_FILE = "_train_state.pt"
STATE_FORMAT = "mm_retrieval.reranker-train-state/1"
EVAL_DEPTH = 100  # val: rerank the first stage's top 100, the usual inference depth
WARMUP_STEPS = 50  # linear warm-up, capped at one epoch; then the learning rate is constant
GRAD_CLIP = 1.0
EVAL_PAIRS = 4096  # (caption, image) pairs scored per forward at validation
RECALL_AT = (1, 5, 10)
OBJECTIVES = ("separate", "residual")


@dataclass(frozen=True)
class RerankerTrainResult:
    """What :func:`train_reranker` produced.

    ``val`` has ``first_stage`` and ``reranked`` metric dicts (``R@1``, ``R@5``, ``R@10``, ``MRR``
    over the val captions; ``reranked`` is the shipped model's) plus ``queries``, ``images`` and
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


# ----------------------------------------------------------------------------------------------
# Public entry point


def train_reranker(
    table: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    model: str | None = None,
    pretrained: str | None = None,
    device: str = "auto",
    reranker_config: dict[str, Any] | None = None,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 3e-4,
    weight_decay: float = 0.01,
    negatives: int = 15,
    hard_pool: int = 32,
    val_fraction: float = 0.1,
    patience: int = 3,
    seed: int = 0,
    resume: bool = False,
    keep_state: bool = False,
    progress: bool = True,
    workers: int = 2,
    encoder: OpenClipEncoder | None = None,
    split_by: Sequence[str] = ("group",),
    objective: str = "separate",
) -> RerankerTrainResult:
    """Train a cross-attention reranker on ``table`` over a frozen dual encoder; write it to ``out_dir``.

    See the module docstring for the recipe.

    Args:
        table: ``.csv``/``.parquet``/``.jsonl`` with ``path`` and ``caption`` columns (and optionally
            ``group``: rows of one group never straddle the train/val split).
        out_dir: checkpoint directory written by :func:`~mm_retrieval.reranking.checkpoint.save_reranker`.
        model, pretrained: the encoder (as for the ``open_clip`` encoder stage) when ``encoder`` is
            not given; ``model=None`` is ``ViT-B-32``.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:N``; used for the reranker,
            and for the encoder when it is built here.
        reranker_config: overrides for :class:`~mm_retrieval.models.reranker.RerankerConfig`
            (``width``, ``depth``, ``heads``, ``kv_heads``, ``memory_dim``, ...). ``text_dim``,
            ``image_dim`` come from the encoder and ``retrieval_scale_init`` defaults to its CLIP
            logit scale.
        epochs: the last epoch to train (counting epochs of a resumed run too).
        batch_size: training rows (captions) per step; each brings ``1 + negatives`` candidates.
        lr, weight_decay: AdamW; weight decay only on matrices (it pulls the head toward zero, i.e.
            toward the first stage).
        negatives: hard negatives per caption per step, drawn from its ``hard_pool`` best-ranked
            non-relevant images (both capped by the training gallery).
        val_fraction: share of groups (or images) held out for validation, in (0, 1).
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

    Raises:
        InputError: missing/unreadable table, no ``caption`` column, no usable rows, too few images
            or groups to split.
        ConfigError: invalid hyper-parameters or ``reranker_config``.
        IncompatibleError: ``resume=True`` with a state from a different table/encoder/settings.
        ModelLoadError: the encoder could not be loaded.
    """
    import torch

    started = time.monotonic()
    _check_hparams(epochs, batch_size, lr, weight_decay, negatives, hard_pool, val_fraction, patience)
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    table = Path(table).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    rows = _read_rows(table, split_by)

    if encoder is None:
        encoder = _build_encoder(model, pretrained, device, workers)
    signature = {
        "table": str(table),
        "encoder_fingerprint": encoder.fingerprint,
        "seed": seed,
        "batch_size": batch_size,
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "val_fraction": float(val_fraction),
        "n_rows": len(rows),
        "split_by": list(split_by),
        "objective": objective,
    }
    state_path = out_dir / STATE_FILE
    state = None
    if resume and state_path.is_file():  # check it before spending minutes on encoding
        state = _read_state(state_path)
        _check_signature(state_path, state, signature)
    encoder.warm_up()
    from mm_retrieval.stages.encoders.open_clip import resolve_device

    run_device = torch.device(resolve_device(device))

    feats = _encode(encoder, rows, progress)
    train, val = _split(feats, val_fraction, seed)
    cfg = _make_config(encoder, feats, reranker_config)
    n_neg, pool = _negative_counts(train, negatives, hard_pool)
    train_pool = _hard_pools(train, pool)
    logger.info(
        "train-reranker: %d train rows (%d images), %d val rows (%d images); %d hard negatives "
        "per caption from the top %d",
        len(train.row_query), len(train.images), len(val.row_query), len(val.images), n_neg, pool,
    )

    # What a resumed run must share with the one that wrote the state.
    signature.update(config=cfg.to_dict(), negatives=n_neg, hard_pool=pool)
    with torch.random.fork_rng(devices=[]):  # seed locally; leave the caller's RNG untouched
        torch.manual_seed(seed)
        loop = _TrainLoop(cfg, feats, train, train_pool, val, n_neg, run_device,
                          batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
                          objective=objective)
        if state is not None:
            _check_signature(state_path, state, signature)
            loop.load_state(state)
            logger.info("train-reranker: resuming after epoch %d from %s", loop.epoch, state_path)
        else:
            if resume:
                logger.info("train-reranker: no %s in %s; starting from scratch", STATE_FILE, out_dir)
            loop.evaluate_initial()
        loop.run(epochs, patience, progress, lambda: _write_state(state_path, loop, signature))

    best = loop.best_model()
    val_report = {
        "first_stage": loop.first_stage_metrics,
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
        "batch_size": batch_size,
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "seed": seed,
        "n_train": len(train.row_query),
        "n_val": len(val.row_query),
        "split_by": list(split_by),
        "objective": objective,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    from mm_retrieval.reranking.checkpoint import save_reranker

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


# ----------------------------------------------------------------------------------------------
# Inputs: arguments, table, encoder


def _check_hparams(epochs, batch_size, lr, weight_decay, negatives, hard_pool, val_fraction, patience):
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("negatives", negatives),
                        ("hard_pool", hard_pool), ("patience", patience)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if not lr >= 0 or not weight_decay >= 0:
        raise ConfigError(f"lr and weight_decay must be >= 0, got {lr!r} and {weight_decay!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(
            f"val_fraction must be in (0, 1), got {val_fraction!r}: the validation split picks the "
            "best epoch and guards against shipping a reranker worse than the first stage"
        )


def _read_rows(table: Path, split_by: Sequence[str] = ("group",)):
    """The table's unique (image path, caption, unit) rows as a DataFrame; errors say how to fix."""
    import pandas as pd

    from mm_retrieval.tables import read_table, resolve_path

    df = read_table(table)  # InputError for missing / unsupported / no path column
    if "caption" not in df.columns:
        raise InputError(
            f"table {table} has no 'caption' column (columns: {', '.join(map(str, df.columns))}): "
            "a table without captions can't train a reranker; add a caption column"
        )
    if df.empty:
        raise InputError(f"table {table} is empty: a reranker needs image-caption rows to train on")
    captions = df["caption"].astype("string").str.strip()
    keep = (captions.notna() & (captions != "")).fillna(False).astype(bool) & df["path"].notna()
    if not keep.all():
        logger.warning("train-reranker: skipped %d of %d rows without a caption or path",
                       int((~keep).sum()), len(df))
    if not keep.any():
        raise InputError(f"table {table} has no row with both a path and a caption")
    rows = df.loc[keep, ["path"]].copy()
    rows["path"] = [str(resolve_path(table, p)) for p in rows["path"]]
    rows["caption"] = captions[keep].astype(str)
    rows["unit"] = _split_units(df.loc[keep], rows["path"], split_by, table)
    return rows.drop_duplicates(["path", "caption"]).reset_index(drop=True)


def _split_units(df, paths, split_by: Sequence[str], table: Path) -> list[str]:
    """One split unit per row: rows that share an image, or a value in any ``split_by`` column,
    land on the same side (connected components), so near-duplicates never straddle the split."""
    import pandas as pd

    missing = [c for c in split_by if c not in df.columns and c != "group"]
    if missing:
        raise InputError(
            f"split_by column(s) {missing} are not in {table} (columns: {', '.join(map(str, df.columns))}); "
            "name existing columns or leave the option out"
        )
    parent = list(range(len(paths)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for key, column in [("path", list(paths))] + [(c, list(df[c])) for c in split_by if c in df.columns]:
        first: dict[str, int] = {}
        for i, value in enumerate(column):
            if value is None or (not isinstance(value, str) and pd.isna(value)):
                continue  # a row without a value is not linked by this column
            j = first.setdefault(f"{value}", i)
            parent[find(i)] = find(j)
    return [f"u{find(i)}" for i in range(len(paths))]


def _build_encoder(model, pretrained, device, workers):
    from mm_retrieval.stages.encoders.open_clip import DEFAULT_MODEL, OpenClipEncoder

    config = {"model": model or DEFAULT_MODEL, "device": device, "workers": workers}
    if pretrained is not None:
        config["pretrained"] = pretrained
    return OpenClipEncoder(config)


# ----------------------------------------------------------------------------------------------
# Features (frozen encoder, computed once)


@dataclass
class _Features:
    """Everything the frozen encoder produced, as CPU tensors, indexed by image / caption id."""

    image_emb: torch.Tensor  # [I, D] float32, L2-normalised
    image_tokens: torch.Tensor  # [I, P, Di] float16 patch tokens
    text_emb: torch.Tensor  # [C, D] float32, L2-normalised
    text_tokens: torch.Tensor  # [C, L, Dt] float32, trimmed to the longest caption
    text_mask: torch.Tensor  # [C, L] bool
    row_image: torch.Tensor  # [R] long: image id of each usable row
    row_caption: torch.Tensor  # [R] long: caption id of each usable row
    row_unit: list[str]  # [R] split unit (group or image) of each row


def _encode(encoder, rows, progress: bool) -> _Features:
    """Encode each unique image and caption once; drop rows whose image can't be decoded."""
    import torch

    paths = list(dict.fromkeys(rows["path"]))
    image_emb, image_tokens = _encode_images(encoder, paths, progress)
    decoded = {p: i for i, p in enumerate(paths) if i in image_emb}
    keep = rows["path"].map(lambda p: p in decoded).to_numpy()
    if not keep.all():
        logger.warning("train-reranker: dropped %d of %d rows whose image could not be read",
                       int((~keep).sum()), len(rows))
    rows = rows[keep].reset_index(drop=True)
    if rows.empty:
        raise InputError("no image in the table could be read (see the warnings above); check the paths")

    # Renumber the decoded images 0..I-1 in table order.
    order = sorted(image_emb)
    new_id = {old: new for new, old in enumerate(order)}
    row_image = torch.tensor([new_id[decoded[p]] for p in rows["path"]], dtype=torch.long)
    captions = list(dict.fromkeys(rows["caption"]))
    cap_id = {c: i for i, c in enumerate(captions)}
    row_caption = torch.tensor([cap_id[c] for c in rows["caption"]], dtype=torch.long)
    text_emb, text_tokens, text_mask = _encode_captions(encoder, captions)
    return _Features(
        image_emb=torch.stack([image_emb[i] for i in order]),
        image_tokens=torch.stack([image_tokens[i] for i in order]),
        text_emb=text_emb,
        text_tokens=text_tokens,
        text_mask=text_mask,
        row_image=row_image,
        row_caption=row_caption,
        row_unit=list(rows["unit"]),
    )


def _encode_images(encoder, paths: list[str], progress: bool):
    """{position: embedding [D]}, {position: patch tokens [P, Di] fp16} for the decodable files."""
    import torch
    from tqdm.auto import tqdm

    from mm_retrieval.stages.base import encode_files

    embs: dict[int, torch.Tensor] = {}
    tokens: dict[int, torch.Tensor] = {}
    failed = 0
    with tqdm(total=len(paths), desc="encoding images", unit="img", disable=not progress,
              file=sys.stderr, leave=False) as bar:
        for items, emb, tok in encode_files(encoder, paths, with_tokens=True):
            j = 0
            for item in items:
                if item.decoded:
                    embs[item.pos] = torch.from_numpy(emb[j]).float()
                    tokens[item.pos] = torch.from_numpy(tok[j]).half()
                    j += 1
                elif item.error:
                    failed += 1
                    if failed <= 5:
                        logger.warning("train-reranker: skipping %s: %s", item.path, item.error)
            bar.update(len(items))
    if failed > 5:
        logger.warning("train-reranker: skipped %d unreadable images in all", failed)
    return embs, tokens


def _encode_captions(encoder, captions: list[str]):
    """(emb [C, D], tokens [C, L, Dt] float32, mask [C, L]) with L trimmed to the longest caption."""
    import torch

    step = max(1, int(getattr(encoder.config, "batch_size", 64)))
    embs, toks, masks = [], [], []
    for s in range(0, len(captions), step):
        emb, tok, mask = encoder.encode_text_tokens(captions[s : s + step])
        embs.append(emb.float().cpu())
        toks.append(tok.float().cpu())
        masks.append(mask.bool().cpu())
    mask = torch.cat(masks)
    # Padding never changes the reranker's output; trimming it saves most of the memory.
    used = int(mask.any(0).nonzero().max()) + 1
    return torch.cat(embs), torch.cat(toks)[:, :used].contiguous(), mask[:, :used].contiguous()


def _make_config(encoder, feats: _Features, overrides: dict[str, Any] | None) -> RerankerConfig:
    from mm_retrieval.models.reranker import RerankerConfig

    overrides = dict(overrides or {})
    dims = {"text_dim": int(feats.text_tokens.shape[-1]), "image_dim": int(feats.image_tokens.shape[-1])}
    # A learned position per patch: relations ("left of") need where a patch is, which deep ViT
    # tokens keep only faintly. ``num_patches=0`` in the overrides turns it off.
    overrides.setdefault("num_patches", int(feats.image_tokens.shape[1]))
    for key, value in dims.items():
        if key in overrides and overrides[key] != value:
            raise ConfigError(
                f"reranker_config {key}={overrides[key]!r} does not match the encoder's token width "
                f"{value}; leave it out, it is taken from the encoder"
            )
    scale = getattr(getattr(encoder, "model", None), "logit_scale", None)
    # The first stage's own softmax temperature: scale * cosine are CLIP's logits, so the listwise
    # loss starts calibrated.
    base = {**dims, "retrieval_scale_init": float(scale.detach().exp()) if scale is not None else 100.0}
    return RerankerConfig.from_dict({**base, **overrides})  # ConfigError lists the valid keys


# ----------------------------------------------------------------------------------------------
# Split, first stage, hard negatives


@dataclass
class _Split:
    """One side of the split: its gallery, its unique captions and the first stage over them."""

    images: torch.Tensor  # [n] global image ids (the gallery)
    queries: torch.Tensor  # [q] global caption ids (each unique caption once)
    relevant: torch.Tensor  # [q, n] bool: caption i describes gallery image j (identical captions)
    sims: torch.Tensor  # [q, n] first-stage cosine similarity
    row_query: torch.Tensor  # [r] local query index of each row
    row_image: torch.Tensor  # [r] local gallery index of each row


def _split(feats: _Features, val_fraction: float, seed: int) -> tuple[_Split, _Split]:
    """Seeded train/val split by unit (group or image); each side gets its own gallery."""
    import numpy as np
    import torch

    units = sorted(set(feats.row_unit))
    if len(units) < 2:
        raise InputError(
            f"only {len(units)} image/group in the table: a reranker needs at least 2 to hold one "
            "out for validation (and many more to learn anything)"
        )
    n_val = min(len(units) - 1, max(1, round(val_fraction * len(units))))
    perm = np.random.default_rng(seed).permutation(len(units))
    val_units = {units[i] for i in perm[:n_val]}
    is_val = torch.tensor([u in val_units for u in feats.row_unit])
    # Val captions search the whole table's images, as at inference: a val gallery of its own few
    # images would be far easier than a collection, and would not show whether the reranker fixes
    # the first stage's mistakes against images it was trained on.
    return _side(feats, ~is_val), _side(feats, is_val, gallery=feats.row_image)


def _side(feats: _Features, rows: torch.Tensor, gallery: torch.Tensor | None = None) -> _Split:
    """The split of ``rows``; its gallery is their images, or the images in ``gallery``."""
    import torch

    r_img, r_cap = feats.row_image[rows], feats.row_caption[rows]
    if gallery is None:
        images, row_image = torch.unique(r_img, return_inverse=True)
    else:
        images = torch.unique(gallery)
        row_image = torch.searchsorted(images, r_img)
    queries, row_query = torch.unique(r_cap, return_inverse=True)
    relevant = torch.zeros(len(queries), len(images), dtype=torch.bool)
    relevant[row_query, row_image] = True
    if gallery is not None:  # an identical caption on a gallery image outside ``rows`` counts too
        same = torch.isin(feats.row_caption, queries)  # queries and images are sorted (torch.unique)
        relevant[torch.searchsorted(queries, feats.row_caption[same]),
                 torch.searchsorted(images, feats.row_image[same])] = True
    sims = feats.text_emb[queries] @ feats.image_emb[images].T
    return _Split(images, queries, relevant, sims, row_query, row_image)


def _negative_counts(train: _Split, negatives: int, hard_pool: int) -> tuple[int, int]:
    """(negatives, pool) capped so that every training caption has that many non-relevant images."""
    available = len(train.images) - int(train.relevant.sum(1).max())
    if available < 1:
        raise InputError(
            "the training split has no negative images (every image matches every caption); "
            "a reranker needs captions that describe different images"
        )
    pool = min(hard_pool, available)
    n_neg = min(negatives, pool)
    if n_neg < negatives:
        logger.warning("train-reranker: only %d negatives per caption available (asked for %d)",
                       n_neg, negatives)
    return n_neg, pool


def _hard_pools(split: _Split, pool: int) -> torch.Tensor:
    """[q, pool] gallery indices of each caption's best-ranked non-relevant images."""
    import torch

    masked = split.sims.masked_fill(split.relevant, float("-inf"))
    return torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :pool].contiguous()


def _recall(ranking: torch.Tensor, relevant: torch.Tensor) -> dict[str, float]:
    """R@k and MRR from rankings [q, n] (gallery indices, best first) and relevance [q, n]."""
    import torch

    hit = relevant.gather(1, ranking)  # [q, n] bool in rank order
    first = hit.to(torch.uint8).argmax(1).double()  # every val caption has a relevant image
    out = {f"R@{k}": float((first < k).double().mean()) for k in RECALL_AT}
    out["MRR"] = float((1.0 / (first + 1)).mean())
    return out


# ----------------------------------------------------------------------------------------------
# Training loop


class _TrainLoop:
    """Model, optimiser, sampling and model selection; state round-trips through plain tensors."""

    def __init__(self, cfg, feats, train, train_pool, val, n_neg, device, *, batch_size, lr,
                 weight_decay, seed, objective="separate"):
        import torch

        from mm_retrieval.models.reranker import Reranker

        self.cfg, self.feats, self.train, self.train_pool, self.val = cfg, feats, train, train_pool, val
        self.n_neg, self.device, self.batch_size, self.lr = n_neg, device, batch_size, lr
        self.objective = objective
        self.model = Reranker(cfg).to(device)
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        other = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
            lr=lr,
        )
        self.generator = torch.Generator().manual_seed(seed)  # shuffling + negative sampling
        self.steps_per_epoch = math.ceil(len(train.row_query) / batch_size)
        self.warmup = max(1, min(WARMUP_STEPS, self.steps_per_epoch))

        # Val: the first stage's ranking and top candidates never change; compute them once.
        self.val_order = torch.sort(val.sims, dim=1, descending=True, stable=True).indices
        self.depth = min(EVAL_DEPTH, len(val.images))
        self.first_stage_metrics = _recall(self.val_order, val.relevant)

        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best_epoch = 0
        self.best_key: tuple[float, float] = (-1.0, -1.0)
        self.best_metrics: dict[str, float] = {}
        self.best_state: dict[str, torch.Tensor] = {}
        self.bad_epochs = 0

    # -- model selection ----------------------------------------------------------------------

    def evaluate_initial(self) -> None:
        """Epoch 0: the untrained model ranks like the first stage; it is the baseline to beat."""
        metrics = self.evaluate()
        self._record(None, metrics)

    def _record(self, loss: float | None, metrics: dict[str, float]) -> None:
        self.history.append({"epoch": self.epoch, "loss": loss, **metrics})
        key = (metrics["R@1"], metrics["MRR"])
        if key > self.best_key:  # strictly better: ties keep the earlier (simpler) model
            self.best_key, self.best_epoch, self.best_metrics = key, self.epoch, metrics
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1

    def best_model(self) -> Reranker:
        from mm_retrieval.models.reranker import Reranker

        model = Reranker(self.cfg)
        model.load_state_dict(self.best_state)
        return model.eval()

    def evaluate(self, fit_scale: bool = True) -> dict[str, float]:
        """Rerank each val caption's first-stage top ``depth``; metrics over the whole gallery.

        With the ``separate`` objective and ``fit_scale``, the first-stage weight is first set to
        the value that ranks val best (see :meth:`_fit_scale`).
        """
        import torch

        model, val, feats, K = self.model, self.val, self.feats, self.depth
        model.eval()
        top = self.val_order[:, :K]  # [q, K] gallery indices
        first = val.sims.gather(1, top)  # [q, K] first-stage cosines
        with torch.no_grad():
            used = top.unique()  # only the candidates' images need a memory
            memory = model.image_memory(feats.image_tokens[val.images[used]].to(self.device).float())
            slot = torch.full((len(val.images),), -1, dtype=torch.long)
            slot[used] = torch.arange(memory.shape[0])
            per = max(1, EVAL_PAIRS // K)
            heads = []
            for s in range(0, len(val.queries), per):
                cand = top[s : s + per]  # [b, K]
                b = cand.shape[0]
                caps = val.queries[s : s + b].repeat_interleave(K)
                out = model(  # a zero first-stage score leaves the head's own logits
                    feats.text_tokens[caps].to(self.device), feats.text_mask[caps].to(self.device),
                    memory[slot[cand.reshape(-1)].to(self.device)],
                    torch.zeros(b * K), pairs=True, chunk_size=1024,
                )
                heads.append(out.view(b, K).cpu())
            head = torch.cat(heads)
            if fit_scale and self.objective == "separate":
                self._fit_scale(first, head, top)
            scale = float(model.retrieval_scale)
        return self._rank(scale * first + head, top)

    def _rank(self, logits: torch.Tensor, top: torch.Tensor) -> dict[str, float]:
        import torch

        rerank = torch.sort(logits, dim=1, descending=True, stable=True).indices
        ranking = torch.cat([top.gather(1, rerank), self.val_order[:, top.shape[1]:]], dim=1)
        return _recall(ranking, self.val.relevant)

    def _fit_scale(self, first: torch.Tensor, head: torch.Tensor, top: torch.Tensor) -> None:
        """Set the first-stage weight to the grid value whose val ranking is best (R@1, then MRR).

        The head was trained to rank on its own; how much the first stage should still count is one
        number, chosen on held-out captions like any other hyper-parameter. The grid spans the
        encoder's own temperature / 64 to x 64, so the head alone and the first stage alone are
        both (nearly) within reach.
        """
        import torch

        base = self.cfg.retrieval_scale_init
        best_key, best_scale = None, base
        grid = [base * 2.0**k for k in torch.linspace(-6, 6, 37).tolist()]
        for scale in sorted(grid, key=lambda g: abs(math.log(g / base))):  # ties keep the nearest
            m = self._rank(scale * first + head, top)
            key = (m["R@1"], m["MRR"])
            if best_key is None or key > best_key:
                best_key, best_scale = key, scale
        self.model.log_retrieval_scale.data.fill_(math.log(best_scale))

    # -- training -----------------------------------------------------------------------------

    def run(self, epochs: int, patience: int, progress: bool, save_state) -> None:
        """Train epochs ``self.epoch + 1 .. epochs``, evaluating and saving state after each."""
        from tqdm.auto import tqdm

        remaining = max(0, epochs - self.epoch)
        if self.bad_epochs >= patience and remaining:
            logger.info("train-reranker: already stopped early at epoch %d", self.epoch)
            return
        bar = tqdm(total=remaining * self.steps_per_epoch, desc="train-reranker", unit="step",
                   disable=not progress, file=sys.stderr)
        with bar:
            while self.epoch < epochs:
                self.epoch += 1
                loss = self._train_epoch(bar)
                metrics = self.evaluate()
                self._record(loss, metrics)
                self._postfix(bar, loss)
                logger.info(
                    "train-reranker: epoch %d loss %.4f val R@1 %.3f (first stage %.3f, best %.3f "
                    "at epoch %d)", self.epoch, loss, metrics["R@1"],
                    self.first_stage_metrics["R@1"], self.best_key[0], self.best_epoch,
                )
                save_state()
                if self.bad_epochs >= patience:
                    logger.info("train-reranker: no val improvement for %d epochs; stopping", patience)
                    break

    def _postfix(self, bar, loss: float) -> None:
        last = self.history[-1]["R@1"] if self.history else float("nan")
        bar.set_postfix(loss=f"{loss:.3f}", val_r1=f"{last:.3f}", best=f"{self.best_key[0]:.3f}")

    def _train_epoch(self, bar) -> float:
        import torch

        self.model.train()
        order = torch.randperm(len(self.train.row_query), generator=self.generator)
        total, count = 0.0, 0
        for s in range(0, len(order), self.batch_size):
            rows = order[s : s + self.batch_size]
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr * min(1.0, (self.step + 1) / self.warmup)
            loss = self._loss(rows)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
            self.optimizer.step()
            self.step += 1
            total += float(loss.detach()) * len(rows)
            count += len(rows)
            bar.update(1)
            self._postfix(bar, float(loss.detach()))
        return total / count

    def _loss(self, rows: torch.Tensor) -> torch.Tensor:
        """Listwise cross-entropy: each row's positive against its sampled hard negatives."""
        import torch
        import torch.nn.functional as F

        train, feats, dev = self.train, self.feats, self.device
        q, pos = train.row_query[rows], train.row_image[rows]  # [B]
        pool = self.train_pool[q]  # [B, pool]
        pick = torch.rand(pool.shape, generator=self.generator).argsort(1)[:, : self.n_neg]
        cands = torch.cat([pos[:, None], pool.gather(1, pick)], 1)  # [B, 1 + n_neg], positive first
        B, C = cands.shape
        score = train.sims[q[:, None], cands].reshape(-1)  # the first stage's cosine of each pair
        if self.objective == "separate":  # the head learns to rank on its own (see the module doc)
            score = torch.zeros_like(score)
        # Memory inside the graph so gradients reach image_in. Computed per pair rather than per
        # distinct image: sharing it would make backward a scatter-add, which is not deterministic.
        memory = self.model.image_memory(feats.image_tokens[train.images[cands].reshape(-1)].to(dev).float())
        caps = train.queries[q].repeat_interleave(C)
        logits = self.model(
            feats.text_tokens[caps].to(dev), feats.text_mask[caps].to(dev),
            memory, score, pairs=True, chunk_size=B * C,
        ).view(B, C)
        return F.cross_entropy(logits, torch.zeros(B, dtype=torch.long, device=logits.device))

    # -- resumable state ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        import torch

        return {
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "best": {"epoch": self.best_epoch, "key": list(self.best_key),
                     "metrics": self.best_metrics, "state": self.best_state},
            "bad_epochs": self.bad_epochs,
            "rng": {"torch": torch.get_rng_state(), "sampler": self.generator.get_state()},
        }

    def load_state(self, state: dict[str, Any]) -> None:
        import torch

        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state["history"])
        best = state["best"]
        self.best_epoch, self.best_key = int(best["epoch"]), tuple(best["key"])
        self.best_metrics, self.best_state = dict(best["metrics"]), dict(best["state"])
        self.bad_epochs = int(state["bad_epochs"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["sampler"])


def _write_state(path: Path, loop: _TrainLoop, signature: dict[str, Any]) -> None:
    """torch.save via a temp file + os.replace: an interruption never leaves half a state file."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"format": STATE_FORMAT, "signature": signature, **loop.state()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_state(path: Path) -> dict[str, Any]:
    """Load ``_train_state.pt``: tensors and plain containers only (``weights_only=True``)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise ModelLoadError(
            f"cannot read the training state {path} ({type(e).__name__}: {e}); delete it and "
            "train again without resume"
        ) from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ModelLoadError(f"{path} is not a reranker training state ({STATE_FORMAT}); delete it "
                             "and train again without resume")
    return state


def _check_signature(path: Path, state: dict[str, Any], signature: dict[str, Any]) -> None:
    """The state must come from the same table, encoder and settings (those known so far)."""
    saved = state.get("signature", {})
    diff = sorted(k for k in signature if saved.get(k) != signature[k])
    if diff:
        details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {signature[k]!r}" for k in diff)
        raise IncompatibleError(
            f"cannot resume from {path}: it belongs to a different run ({details}). Use the same "
            "table, encoder and settings, or train again without resume"
        )
