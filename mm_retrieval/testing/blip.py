"""A tiny random BLIP image-text retrieval checkpoint, for tests (no download).

:func:`make_tiny_blip` writes what ``BlipForImageTextRetrieval.save_pretrained`` and
``BlipProcessor.save_pretrained`` write for a hub model (config, safetensors weights, tokenizer,
preprocessor config), so the reranker loads it through its real loading path. The weights are
random but seeded, with a large ``initializer_range`` so that different images and queries get
clearly different ITM scores (with the default 0.02 every pair scores about the same).
:func:`install_in_hub_cache` places such a directory in a Hugging Face cache folder under a hub
name, which exercises the hub-name path offline.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# Word pieces ("##s", "##ing") let tests check that attention maps merge them back into words.
VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]",
    "a", "an", "the", "of", "on", "in", "and", "with", "photo", "picture", "image",
    "red", "green", "blue", "yellow", "purple", "orange", "black", "white",
    "dog", "cat", "car", "tree", "house", "ball", "square", "circle", "big", "small",
    "run", "sit", "##s", "##ing", "##er", ".", ",",
    *"bcdefghijklmnopqrstuvwxyz",
]

#: What :func:`make_tiny_blip` builds (tests size their checks from it).
TINY_BLIP = {
    "image_size": 32,  # pixels; patch 8 -> a 4 x 4 grid, 17 tokens with CLS
    "patch_size": 8,
    "vision_width": 48,  # differs from the text width, as in BLIP-large (1024 vs 768)
    "text_width": 32,
    "layers": 2,
    "heads": 2,
}


def make_tiny_blip(directory: str | Path, *, seed: int = 0, initializer_range: float = 0.4,
                   architecture: str = "BlipForImageTextRetrieval") -> Path:
    """Write a tiny random BLIP checkpoint (model + processor) to ``directory``; returns it.

    ``architecture`` other than ``BlipForImageTextRetrieval`` (e.g. ``BlipForConditionalGeneration``)
    writes that model instead, for tests of what the reranker refuses.
    """
    import torch
    import transformers
    from transformers import BertTokenizerFast, BlipConfig, BlipImageProcessor, BlipProcessor

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    t = TINY_BLIP
    config = BlipConfig(
        text_config={
            "vocab_size": len(VOCAB),
            "hidden_size": t["text_width"],
            "intermediate_size": 2 * t["text_width"],
            "num_hidden_layers": t["layers"],
            "num_attention_heads": t["heads"],
            "max_position_embeddings": 512,
            "is_decoder": True,  # without it the text encoder has no cross-attention layers
            "bos_token_id": VOCAB.index("[DEC]"),
            "pad_token_id": VOCAB.index("[PAD]"),
            "sep_token_id": VOCAB.index("[SEP]"),
            "initializer_range": initializer_range,
        },
        vision_config={
            "hidden_size": t["vision_width"],
            "intermediate_size": 2 * t["vision_width"],
            "num_hidden_layers": t["layers"],
            "num_attention_heads": t["heads"],
            "image_size": t["image_size"],
            "patch_size": t["patch_size"],
            "initializer_range": initializer_range,
        },
        projection_dim=16,
        image_text_hidden_size=16,
        initializer_range=initializer_range,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, architecture)(config)
    model.eval()
    model.save_pretrained(out)  # safetensors

    vocab_dir = out / "_vocab"
    vocab_dir.mkdir(exist_ok=True)
    (vocab_dir / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(
        vocab_dir, model_max_length=512, bos_token="[DEC]", additional_special_tokens=["[ENC]"]
    )
    shutil.rmtree(vocab_dir)
    image_processor = BlipImageProcessor(size={"height": t["image_size"], "width": t["image_size"]})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def install_in_hub_cache(checkpoint: str | Path, cache_dir: str | Path, repo_id: str,
                         revision: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Copy a checkpoint directory into a Hugging Face hub cache folder as ``repo_id`` (the
    layout ``huggingface_hub`` reads with ``local_files_only``); returns the snapshot folder."""
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(checkpoint, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def cache_blip_tokens(reranker, store) -> int:
    """Write BLIP tokens for every image item of ``store`` through ``reranker``'s own image side
    and token writer (what an index run with the reranker does); returns how many were written.
    Files are read and decoded exactly as the indexer does."""
    import torch

    from ..decode import decode_image, read_regular_file

    rows = [r for r in store.iter_rows(("id", "path")) if r.get("path")]
    side, writer = reranker.image_side(), reranker.token_writer()
    for start in range(0, len(rows), 16):
        chunk = rows[start : start + 16]
        pixels = torch.stack([side.transform(decode_image(read_regular_file(r["path"]))) for r in chunk])
        for r, tokens in zip(chunk, side.encode(pixels)):
            writer.add(r["id"], tokens)
        writer.commit()
    writer.cache.close()
    return len(rows)
