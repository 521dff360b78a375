"""The offline demo (``mmr demo``): the whole product on a machine without internet.

1. generate a compositional image-caption set (scenes of coloured shapes; held-out combinations);
2. get a first stage: train a small CLIP on the training captions with ``mmr train-encoder``,
   or use the weights given with ``--model``/``--pretrained`` (e.g. ViT-B-32 from LAION, online);
3. train the cross-attention reranker on the training split (``mmr train-reranker``);
4. index every image into Milvus Lite, caching the reranker's image memory;
5. evaluate first stage vs reranked on the held-out captions, and show a few queries before/after.

Every step is skipped when its output already exists, so a second run is quick.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSizes:
    n_train: int = 2000
    n_test: int = 500
    encoder_epochs: int = 45
    reranker_epochs: int = 10


QUICK = DemoSizes(n_train=240, n_test=60, encoder_epochs=2, reranker_epochs=1)

# How the demo and ``mmr bench --suite quality`` train the reranker on the compositional set.
# Validation holds out whole attribute combinations (split by group *and* combination), as the
# test split does, so keep-best picks the epoch that generalises, not the one that memorises.
RERANKER_RECIPE: dict[str, Any] = {
    "lr": 1e-3,
    "negatives": 7,
    "hard_pool": 100,
    "patience": 4,
    "split_by": ("group", "combination"),
    "reranker_config": {"width": 128, "heads": 2},
}


def run_demo(
    workdir: str | Path = "mmr-demo",
    *,
    model: str | None = None,
    pretrained: str | None = None,
    sizes: DemoSizes = DemoSizes(),
    show: int = 3,
    say: Callable[[str], None] = print,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run the demo in ``workdir``; returns the evaluation document (also written to
    ``workdir/eval.json``). ``say`` receives the human-readable narration."""
    from .datasets import generate_compositional
    from .evaluation import evaluate
    from .pipeline import Pipeline

    root = Path(workdir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    data = root / "data"
    if not (data / "all.csv").exists():
        say(f"[1/5] generating {sizes.n_train} training + {sizes.n_test} held-out images in {data}")
        generate_compositional(data, n_train=sizes.n_train, n_test=sizes.n_test)
    else:
        say(f"[1/5] using the images in {data}")

    if model is None:
        enc_dir = root / "encoder"
        if not (enc_dir / "open_clip_config.json").exists():
            from .training import train_encoder

            say(f"[2/5] training a small CLIP (mmr-tiny) on the training captions, {sizes.encoder_epochs} epochs on CPU "
                "(no internet needed; results come from a tiny model trained on synthetic data in minutes)")
            train_encoder(data / "train.csv", enc_dir, model="mmr-tiny", epochs=sizes.encoder_epochs, batch_size=64, lr=1e-3)
        else:
            say(f"[2/5] using the encoder in {enc_dir}")
        encoder = {"model": str(enc_dir)}
    else:
        say(f"[2/5] using the encoder {model} {pretrained or ''}".rstrip())
        encoder = {"model": model, **({"pretrained": pretrained} if pretrained else {})}

    rr_dir = root / "reranker"
    db = root / "mmr.db"
    base = Pipeline(db=str(db), collection="demo", encoder=encoder)
    if not (rr_dir / "reranker.json").exists():
        from .training.reranker import train_reranker

        say(f"[3/5] training the cross-attention reranker on the training split ({sizes.reranker_epochs} epochs, hard negatives from the first stage)")
        base.encoder.warm_up()
        train_reranker(data / "train.csv", rr_dir, encoder=base.encoder, epochs=sizes.reranker_epochs,
                       progress=progress, **RERANKER_RECIPE)
    else:
        say(f"[3/5] using the reranker in {rr_dir}")

    pipe = Pipeline(db=str(db), collection="demo", encoder=encoder, reranker=str(rr_dir))
    say(f"[4/5] indexing {data / 'all.csv'} into {db} (collection 'demo')")
    report = pipe.index(data / "all.csv", progress=progress)
    say(f"      indexed {report.indexed}, unchanged {report.unchanged}, skipped {report.skipped}")

    say(f"[5/5] held-out compositional captions (combinations never seen in training), whole collection as gallery")
    doc = evaluate(pipe, data / "test.csv", candidates=100, rerank=True, index=False, progress=progress)
    (root / "eval.json").write_text(json.dumps(doc, indent=2))
    say(f"      {doc['n_queries']} queries, {doc['gallery']} images")
    say("                 R@1    R@5   R@10")
    for name in ("first_stage", "reranked"):
        say(f"      {name:<10} " + " ".join(f"{v:6.3f}" for v in doc[name].values()))

    _show_examples(pipe, data / "test.csv", show, say)
    say(f"\ndone in {time.perf_counter() - t0:.0f}s. Try your own queries:")
    say(f'  mmr search "a small red circle left of a large blue square" --db {db} --collection demo --rerank {rr_dir}')
    return doc


def _show_examples(pipe: Any, table: Path, n: int, say: Callable[[str], None]) -> None:
    """A few held-out queries where reranking changed the top hit, before and after."""
    from .evaluation import load_queries

    queries = load_queries(table)
    shown = 0
    for caption, relevant in queries.items():
        if shown >= n:
            break
        before = pipe.search(caption, k=3, rerank=False).hits
        after = pipe.search(caption, k=3).hits
        if before[0].id == after[0].id:
            continue
        shown += 1
        say(f"\nquery: {caption!r}")
        for label, hits in (("first stage", before), ("reranked", after)):
            say(f"  {label}:")
            for h in hits:
                mark = "✓" if h.id in relevant else " "
                say(f"    {mark} {h.rank}. {h.score:8.3f}  {h.caption}")
