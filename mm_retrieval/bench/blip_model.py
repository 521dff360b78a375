"""Random BLIP retrieval checkpoints for the ``blip`` suite when no real one is given (no download).

:func:`random_checkpoint` writes what ``save_pretrained`` writes for a hub model (config,
safetensors weights, tokenizer, preprocessor config), so the reranker loads it through its real
loading path and the bench times exactly what ``--rerank Salesforce/blip-itm-base-coco`` runs:

* ``base``: BLIP-base's dimensions (ViT-B/16 at 384 px, 577 tokens of width 768; BERT-base with
  cross-attention: 12 layers, 12 heads, 30524-token vocabulary), seeded random weights:
  transformers' ``BlipConfig()`` with the text side's 12 heads of the hub checkpoints (its
  default is 8; the folded cross-attention's cost grows with the head count). Its tokenizer knows only a few dozen real words (the BERT vocabulary is not
  available offline; the rest are ``[unused]`` fillers), which is enough to give the bench query
  as many tokens as bert-base-uncased does. Timing only: its scores mean nothing.
* ``tiny``: :func:`mm_retrieval.testing.blip.make_tiny_blip` (32 px, 17 tokens): seconds, for
  ``--quick`` and tests.
"""

from __future__ import annotations

import shutil
from pathlib import Path

KINDS = ("base", "tiny")
BASE_VOCAB = 30524  # bert-base-uncased's 30522 + BLIP's [DEC] and [ENC]
BASE_TEXT = {"num_attention_heads": 12, "is_decoder": True}  # BLIP's med_config (bert-base); transformers' default is 8 heads


def random_checkpoint(directory: str | Path, kind: str = "base", *, seed: int = 0) -> Path:
    """Write a random BLIP retrieval checkpoint of size ``kind`` to ``directory`` (reused when
    already complete); returns the directory."""
    from ..testing.blip import make_tiny_blip

    out = Path(directory)
    done = out / ".complete"
    if done.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    if kind == "tiny":
        make_tiny_blip(out, seed=seed)
    elif kind == "base":
        _base(out, seed)
    else:
        raise ValueError(f"unknown random BLIP size {kind!r}; one of {KINDS}")
    done.touch()
    return out


def _base(out: Path, seed: int) -> None:
    import torch
    from transformers import BertTokenizerFast, BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

    config = BlipConfig(text_config=BASE_TEXT)  # Salesforce/blip-itm-base-coco's dimensions
    assert config.text_config.vocab_size == BASE_VOCAB and config.vision_config.image_size == 384
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForImageTextRetrieval(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors, fp32 (~0.9 GB)
    del model

    vocab_dir = out / "_vocab"
    vocab_dir.mkdir(exist_ok=True)
    (vocab_dir / "vocab.txt").write_text("\n".join(_base_vocab()) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(vocab_dir, model_max_length=512, bos_token="[DEC]",
                                                  additional_special_tokens=["[ENC]"])
    shutil.rmtree(vocab_dir)
    size = config.vision_config.image_size
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": size, "width": size}), tokenizer=tokenizer).save_pretrained(out)


def _base_vocab() -> list[str]:
    """bert-base-uncased's layout ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103), the test
    vocabulary's words, ``[unused]`` fillers up to 30522, then BLIP's [DEC] and [ENC]."""
    from ..testing.blip import VOCAB

    special = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"}
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [w for w in VOCAB if w not in special]
    vocab += [f"[unused{i}]" for i in range(99, 99 + BASE_VOCAB - 2 - len(vocab))]
    return vocab + ["[DEC]", "[ENC]"]
