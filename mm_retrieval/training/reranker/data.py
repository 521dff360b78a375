"""Inputs of reranker training: the table's rows, their split units, and the frozen encoder's features.

Every unique image is encoded once (patch tokens kept in fp16, plus its embedding) and every unique
caption once (token features, padding mask, embedding); all of it stays in memory as CPU tensors.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mm_retrieval.errors import ConfigError, InputError
from mm_retrieval.training.reranker.config import PHRASE_DIM

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from mm_retrieval.stages.rerankers.cross_attention.model import RerankerConfig
    from mm_retrieval.stages.encoders.open_clip import OpenClipEncoder

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Table


def read_rows(table: Path, split_by: Sequence[str] = ("group",)) -> pd.DataFrame:
    """The table's unique (image path, caption, unit) rows; errors say how to fix the table."""
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
    rows["unit"] = split_units(df.loc[keep], rows["path"], split_by, table)
    if "group" in df.columns:  # contrast groups: their rows are each other's twins (.binding)
        rows["group"] = df.loc[keep, "group"]
    return rows.drop_duplicates(["path", "caption"]).reset_index(drop=True)


def split_units(df: pd.DataFrame, paths: Sequence[str], split_by: Sequence[str], table: Path) -> list[str]:
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

    for column in [list(paths)] + [list(df[c]) for c in split_by if c in df.columns]:
        first: dict[str, int] = {}
        for i, value in enumerate(column):
            if value is None or (not isinstance(value, str) and pd.isna(value)):
                continue  # a row without a value is not linked by this column
            j = first.setdefault(f"{value}", i)
            parent[find(i)] = find(j)
    return [f"u{find(i)}" for i in range(len(paths))]


# ----------------------------------------------------------------------------------------------
# Features (frozen encoder, computed once)


@dataclass
class Features:
    """Everything the frozen encoder produced, as CPU tensors, indexed by image / caption id."""

    image_emb: torch.Tensor  # [I, D] float32, L2-normalised
    image_tokens: torch.Tensor  # [I, P, Di] float16 patch tokens
    text_emb: torch.Tensor  # [C, D] float32, L2-normalised
    text_tokens: torch.Tensor  # [C, L, Dt] float32, trimmed to the longest caption
    text_mask: torch.Tensor  # [C, L] bool
    row_image: torch.Tensor  # [R] long: image id of each usable row
    row_caption: torch.Tensor  # [R] long: caption id of each usable row
    row_unit: list[str]  # [R] split unit (group or image) of each row
    # Binding negatives (:mod:`.binding`), when enabled: the encoder's preprocessed pixels of each
    # image (for a reranker with its own image side), each caption's twins (caption ids) and its
    # rewritten captions (caption ids appended after the table's captions).
    row_group: list | None = None  # [R] the table's ``group`` value of each row, if it has one
    # [C, L] int8 token roles for a phrase head (subject / object / relation words: .phrases)
    text_roles: torch.Tensor | None = None
    image_paths: list[str] | None = None  # [I] each image's file
    captions: list[str] | None = None  # [C] each caption's text
    pixels: torch.Tensor | None = None  # [I, 3, S, S] float16
    caption_twins: list[list[int]] | None = None
    caption_rewrites: list[list[int]] | None = None


def encode(encoder: OpenClipEncoder, rows: pd.DataFrame, progress: bool) -> Features:
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
    return Features(
        text_roles=caption_roles(encoder, captions, text_mask),
        image_emb=torch.stack([image_emb[i] for i in order]),
        image_tokens=torch.stack([image_tokens[i] for i in order]),
        text_emb=text_emb,
        text_tokens=text_tokens,
        text_mask=text_mask,
        row_image=row_image,
        row_caption=row_caption,
        row_unit=list(rows["unit"]),
        row_group=list(rows["group"]) if "group" in rows.columns else None,
        image_paths=[paths[i] for i in order],
        captions=captions,
    )


def _encode_images(encoder: OpenClipEncoder, paths: list[str], progress: bool):
    """{position: embedding [D]}, {position: patch tokens [P, Di] fp16} for the decodable files."""
    import torch
    from tqdm.auto import tqdm

    from mm_retrieval.encoding import ImageEncoding, encode_files

    embs: dict[int, torch.Tensor] = {}
    tokens: dict[int, torch.Tensor] = {}
    failed = 0
    with tqdm(total=len(paths), desc="encoding images", unit="img", disable=not progress,
              file=sys.stderr, leave=False) as bar:
        for batch in encode_files(ImageEncoding(encoder, tokens=True), paths):
            for item, emb, tok in batch:
                if item.decoded:
                    embs[item.pos] = torch.from_numpy(emb).float()
                    tokens[item.pos] = torch.from_numpy(tok).half()
                elif item.error:
                    failed += 1
                    if failed <= 5:
                        logger.warning("train-reranker: skipping %s: %s", item.path, item.error)
            bar.update(len(batch))
    if failed > 5:
        logger.warning("train-reranker: skipped %d unreadable images in all", failed)
    return embs, tokens


def _encode_captions(encoder: OpenClipEncoder, captions: list[str]):
    """(emb [C, D], tokens [C, L, Dt] float32, mask [C, L]) with L trimmed to the longest caption."""
    import torch

    step = max(1, encoder.batch_size)
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


def caption_roles(encoder: OpenClipEncoder, captions: list[str], mask: torch.Tensor) -> torch.Tensor:
    """[C, L] int8 token roles of ``captions`` (:func:`~mm_retrieval.stages.rerankers.cross_attention.phrases.token_roles`),
    aligned with their token ``mask`` [C, L]."""
    import torch

    from mm_retrieval.stages.rerankers.cross_attention.phrases import token_roles

    return torch.from_numpy(token_roles(encoder.tokenizer, captions, mask.numpy()))


def model_config(encoder: OpenClipEncoder, feats: Features, overrides: dict[str, Any] | None) -> RerankerConfig:
    """The reranker's architecture: token widths from the encoder, the rest from ``overrides``."""
    from mm_retrieval.stages.rerankers.cross_attention.model import RerankerConfig

    overrides = dict(overrides or {})
    dims = {"text_dim": int(feats.text_tokens.shape[-1]), "image_dim": int(feats.image_tokens.shape[-1])}
    # A learned position per patch: relations ("left of") need where a patch is, which deep ViT
    # tokens keep only faintly. ``num_patches=0`` in the overrides turns it off.
    overrides.setdefault("num_patches", int(feats.image_tokens.shape[1]))
    grid = math.isqrt(overrides["num_patches"])
    if overrides["num_patches"] and grid * grid == overrides["num_patches"]:  # where a phrase is found needs a grid
        overrides.setdefault("phrase_dim", PHRASE_DIM)
    if overrides.get("local_channels"):  # a local image side reads the encoder's input pixels
        size = encoder.image_size
        if size is None:
            raise ConfigError(f"local_channels needs an encoder with a fixed input size; {encoder.label} does not say its own")
        overrides.setdefault("image_size", size)
    for key, value in dims.items():
        if key in overrides and overrides[key] != value:
            raise ConfigError(
                f"reranker_config {key}={overrides[key]!r} does not match the encoder's token width "
                f"{value}; leave it out, it is taken from the encoder"
            )
    scale = encoder.logit_scale
    # The first stage's own softmax temperature: scale * cosine are CLIP's logits. The residual
    # objective's listwise loss therefore starts calibrated; the separate one fits the weight on
    # val, on a grid centred here.
    base = {**dims, "retrieval_scale_init": scale if scale is not None else 100.0}
    return RerankerConfig.from_dict({**base, **overrides})  # ConfigError lists the valid keys
