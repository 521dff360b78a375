"""The offline demo (``mmr demo``): the whole product on a machine without internet.

1. generate a compositional image-caption set (scenes of coloured shapes; held-out combinations);
2. get a first stage: the small CLIP shipped with the package (``mm_retrieval/models/demo``), or
   with ``--train`` one trained here on the training captions (``train_encoder``), or the weights
   given with ``--model``/``--pretrained`` (e.g. ViT-B-32 from LAION, online);
3. get the cross-attention reranker: shipped, or trained on the training split
   (``train_reranker``, hard negatives from the first stage);
4. index every image into Milvus Lite, caching the reranker's image memory;
5. evaluate first stage vs reranked on the held-out captions (image mode), and show the first few
   held-out queries before and after reranking.

The shipped weights are what ``mmr demo --train --export DIR`` writes (:func:`train_models` with
the default :class:`DemoSizes`): they match the data step 1 generates (seeded), so the default run
only indexes and evaluates. Every step is skipped when its output already exists, so a second run
is quick.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

# The shipped encoder and reranker (package data), made by `mmr demo --train --export` (docs/demo.md).
SHIPPED = Path(__file__).resolve().parent / "models" / "demo"
ENCODER_FILES = ("open_clip_config.json", "open_clip_model.safetensors", "mmr_encoder.json")
RERANKER_FILES = ("reranker.json", "model.safetensors")
SHIPPED_MARK = "shipped.json"  # beside the copies of the shipped weights: their digests when copied
EXAMPLE_K = 3  # hits shown per list in the before/after examples


@dataclass(frozen=True)
class DemoSizes:
    n_train: int = 2000
    n_test: int = 500
    encoder_epochs: int = 45
    reranker_epochs: int = 10


QUICK = DemoSizes(n_train=240, n_test=60, encoder_epochs=2, reranker_epochs=1)

# How the demo trains the encoder (train_encoder's keywords; model mmr-tiny from scratch).
ENCODER_RECIPE: dict[str, Any] = {"model": "mmr-tiny", "batch_size": 64, "lr": 1e-3, "seed": 0}

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


@dataclass(frozen=True)
class Layout:
    """Where one kind of demo run keeps its models and its collection (under the demo folder)."""

    data: Path
    encoder: Path
    reranker: Path
    db: Path
    collection: str


def run_demo(
    workdir: str | Path = "mmr-demo",
    *,
    model: str | None = None,
    pretrained: str | None = None,
    sizes: DemoSizes = DemoSizes(),
    train: bool = False,
    export: str | Path | None = None,
    show: int = 3,
    say: Callable[[str], None] = print,
    progress: bool | None = None,
    show_result: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the demo in ``workdir``; returns the evaluation document (also written to
    ``workdir/eval.json``; ``workdir/quick/eval.json`` for ``QUICK``). ``say`` receives the
    human-readable narration (the steps), ``show_result`` (default: ``say``) the results: the
    Recall@K table, the example queries and a command to try (`mmr demo` prints them on stdout).

    By default the shipped encoder and reranker are used (copied into ``workdir/models``);
    ``train=True`` trains both here (``workdir/trained``), ``model`` uses that first stage and
    trains a reranker for it. Sizes other than the default (``QUICK``) always train: the shipped
    weights only fit the default data. ``export``: after training, copy the two models there in
    the shipped layout (how the package's weights are remade).
    """
    from .datasets import generate_compositional
    from .evaluation import evaluate
    from .pipeline import Pipeline

    quick = sizes != DemoSizes()
    if not (train or quick or model is not None or _shipped_available()):
        say(f"(this install has no shipped demo weights in {SHIPPED}: training them here, as `mmr demo --train`)")
        train = True
    train = train or quick or model is not None
    if export is not None and (model is not None or quick or not train):
        raise _config_error("--export needs --train (without --model or --quick): it writes the demo's own trained models")
    root = Path(workdir).expanduser().resolve()
    t0 = time.perf_counter()
    lay = _layout(root, sizes=sizes, train=train, model=model, pretrained=pretrained)
    if quick:
        say(f"(--quick: a tiny run, {sizes.n_train} images, {sizes.encoder_epochs} encoder and {sizes.reranker_epochs} "
            "reranker epochs, to check the setup: its numbers mean nothing)")

    if not (lay.data / "all.csv").exists():
        say(f"[1/5] generating {sizes.n_train} training + {sizes.n_test} held-out images in {lay.data}")
        generate_compositional(lay.data, n_train=sizes.n_train, n_test=sizes.n_test)
    else:
        say(f"[1/5] using the images in {lay.data}")

    if not train and model is None:
        _refresh_shipped_copies(lay, say)
    if model is not None:
        say(f"[2/5] using the encoder {model} {pretrained or ''}".rstrip())
        encoder: dict[str, Any] = {"model": model, **({"pretrained": pretrained} if pretrained else {})}
    elif (lay.encoder / "open_clip_config.json").exists():
        say(f"[2/5] using the encoder in {lay.encoder}")
        encoder = {"model": str(lay.encoder)}
    elif train:
        say(f"[2/5] training a small CLIP (mmr-tiny) on the training captions, {sizes.encoder_epochs} epochs on CPU "
            "(no internet needed; a tiny model trained on synthetic data in minutes)")
        train_demo_encoder(lay.data, lay.encoder, sizes)
        encoder = {"model": str(lay.encoder)}
    else:
        _copy_shipped(lay)
        say(f"[2/5] using the shipped encoder (mmr-tiny trained {sizes.encoder_epochs} epochs on these training captions "
            f"by `mmr demo --train`; copied to {lay.encoder}). `mmr demo --train` retrains it here (~50 min on 2 CPU cores)")
        encoder = {"model": str(lay.encoder)}

    base = Pipeline(db=str(lay.db), collection=lay.collection, encoder=encoder)
    if not _reranker_fits(lay.reranker, base):
        say(f"[3/5] training the cross-attention reranker on the training split ({sizes.reranker_epochs} epochs, "
            "hard negatives from the first stage)")
        train_demo_reranker(lay.data, lay.reranker, base.encoder, sizes, progress=progress)
    elif train or model is not None:
        say(f"[3/5] using the reranker in {lay.reranker}")
    else:
        say(f"[3/5] using the shipped cross-attention reranker (trained by `mmr demo --train` on the shipped encoder's "
            f"hard negatives{_training_note(lay.reranker)}; copied to {lay.reranker})")
    if export is not None:
        out = export_models(lay, Path(export), sizes)
        say(f"      exported the encoder and reranker to {out} (the package's shipped layout)")

    pipe = Pipeline(db=str(lay.db), collection=lay.collection, encoder=base.encoder, reranker=str(lay.reranker))
    _fresh_collection(pipe, say)
    say(f"[4/5] indexing {lay.data / 'all.csv'} into {lay.db} (collection {lay.collection!r})")
    report = pipe.index(lay.data / "all.csv", progress=progress)
    say(f"      indexed {report.indexed}, unchanged {report.unchanged}, skipped {report.skipped}")

    say("[5/5] held-out compositional captions (attribute combinations never seen in training) as queries, "
        "the whole collection as gallery")
    say("      image mode: the first stage ranks images by the cosine of query and image vectors; "
        "the reranker rescores its top 100")
    doc = evaluate(pipe, lay.data / "test.csv", candidates=100, rerank=True, index=False, progress=progress, mode="image")
    (lay.db.parent / "eval.json").write_text(json.dumps(doc, indent=2))
    result = say if show_result is None else show_result
    result(f"{doc['n_queries']} held-out queries, {doc['gallery']} images, image mode; Recall@K = share of queries whose image is in the top K")
    result("             R@1    R@5   R@10")
    for name, label in (("first_stage", "first stage"), ("reranked", "reranked")):
        result(f"{label:<11} " + " ".join(f"{v:6.3f}" for v in doc[name].values()))
    # The reranker's measured effect, whatever its sign: it is what the demo exists to show.
    result("gain        " + " ".join(f"{doc['reranked'][k] - v:+6.3f}" for k, v in doc["first_stage"].items()))
    if quick:
        result("(--quick: tiny models trained for seconds; these numbers mean nothing)")

    examples = _show_examples(pipe, lay.data / "test.csv", show, result)
    say(f"\ndone in {time.perf_counter() - t0:.0f}s.")
    result("\nTry your own queries, e.g.:")
    result(_suggestion(examples, doc, lay))
    return doc


# ---- training (``--train``; how the shipped weights are made) ------------------------------------
def train_demo_encoder(data: Path, out: Path, sizes: DemoSizes) -> None:
    """Train the demo's first stage on ``data/train.csv`` and store its weights in fp16.

    fp16 halves the package (the token embedding is most of mmr-tiny) and costs no recall; the
    reranker is trained afterwards on these fp16 weights, so it fits exactly what is shipped."""
    from .training import train_encoder

    train_encoder(data / "train.csv", out, epochs=sizes.encoder_epochs, **ENCODER_RECIPE)
    _to_fp16(out / "open_clip_model.safetensors")
    (out / "train.log").unlink(missing_ok=True)  # open_clip_train's raw log: megabytes, not needed to load


def train_demo_reranker(data: Path, out: Path, encoder: Any, sizes: DemoSizes, *, progress: bool | None) -> None:
    """Train the demo's reranker on ``data/train.csv`` over ``encoder`` (frozen)."""
    from .training.reranker import train_reranker

    encoder.warm_up()
    bars = sys.stderr.isatty() if progress is None else progress
    train_reranker(data / "train.csv", out, encoder=encoder, epochs=sizes.reranker_epochs, progress=bars, **RERANKER_RECIPE)


def export_models(lay: Layout, out: Path, sizes: DemoSizes) -> Path:
    """Copy the trained encoder and reranker to ``out/encoder`` and ``out/reranker`` (the layout
    of ``mm_retrieval/models/demo``) with ``out/recipe.json`` saying how they were made."""
    out = out.expanduser().resolve()
    _copy_files(lay.encoder, out / "encoder", ENCODER_FILES)
    _copy_files(lay.reranker, out / "reranker", RERANKER_FILES)
    recipe = {
        "made_by": "mmr demo --train --export DIR",
        "data": {"generator": "mm_retrieval.datasets.generate_compositional", "n_train": sizes.n_train,
                 "n_test": sizes.n_test, "seed": 0},
        "encoder": {**ENCODER_RECIPE, "epochs": sizes.encoder_epochs, "storage": "fp16"},
        "reranker": {**RERANKER_RECIPE, "epochs": sizes.reranker_epochs},
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return out


def _to_fp16(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(path), metadata={"format": "pt"})


# ---- layout ---------------------------------------------------------------------------------------
def _layout(root: Path, *, sizes: DemoSizes, train: bool, model: str | None, pretrained: str | None) -> Layout:
    """Each kind of run has its own models and collection, so switching kinds never mixes them."""
    if sizes != DemoSizes():
        base = root / "quick" if sizes == QUICK else root / f"sizes-{_digest(asdict(sizes))}"
        return Layout(base / "data", base / "encoder", base / "reranker", base / "mmr.db", "demo")
    data, db = root / "data", root / "mmr.db"
    if model is not None:
        tag = _digest([model, pretrained])
        return Layout(data, root / f"model-{tag}", root / f"model-{tag}" / "reranker", db, f"demo_model_{tag}")
    if train:
        return Layout(data, root / "trained" / "encoder", root / "trained" / "reranker", db, "demo_trained")
    return Layout(data, root / "models" / "encoder", root / "models" / "reranker", db, "demo")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]


def _shipped_available() -> bool:
    return all((SHIPPED / "encoder" / f).is_file() for f in ENCODER_FILES) and all(
        (SHIPPED / "reranker" / f).is_file() for f in RERANKER_FILES)


def _refresh_shipped_copies(lay: Layout, say: Callable[[str], None]) -> None:
    """Copy the shipped weights again where a demo folder holds untouched copies of older ones (a
    newer package ships others). Copies changed since (a reranker retrained here) are left alone;
    :data:`SHIPPED_MARK` records what was copied."""
    mark = lay.encoder.parent / SHIPPED_MARK
    try:
        copied = json.loads(mark.read_text()) if mark.is_file() else None
    except ValueError:
        copied = {}
    pairs = [(SHIPPED / part / n, lay.encoder.parent / part / n) for part, names in
             (("encoder", ENCODER_FILES), ("reranker", RERANKER_FILES)) for n in names]
    present = {dst: (src, _sha256(dst)) for src, dst in pairs if dst.is_file()}  # each copy read once
    if not present or all(src.is_file() and _sha256(src) == digest for src, digest in present.values()):
        return
    if copied is not None and any(copied.get(f"{dst.parent.name}/{dst.name}") != digest
                                  for dst, (_, digest) in present.items()):
        return  # changed since they were copied: the user's own
    _copy_shipped(lay)
    say(f"      (this package ships other weights than the copies in {lay.encoder.parent}: copied them again)")


def _copy_shipped(lay: Layout) -> None:
    """Copy the shipped encoder and reranker into the demo folder, recording what was copied."""
    _copy_files(SHIPPED / "encoder", lay.encoder, ENCODER_FILES)
    _copy_files(SHIPPED / "reranker", lay.reranker, RERANKER_FILES)
    digests = {f"{d.name}/{n}": _sha256(d / n) for d, names in ((lay.encoder, ENCODER_FILES), (lay.reranker, RERANKER_FILES))
               for n in names if (d / n).is_file()}
    (lay.encoder.parent / SHIPPED_MARK).write_text(json.dumps(digests, indent=1) + "\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy_files(src: Path, dst: Path, names: tuple[str, ...]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _reranker_fits(path: Path, pipe: Any) -> bool:
    """Whether ``path`` holds a reranker trained on this pipeline's encoder."""
    meta = path / "reranker.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text())["encoder_fingerprint"] == pipe.encoder.fingerprint
    except (ValueError, KeyError, TypeError):
        return False


def _training_note(path: Path) -> str:
    """How long the reranker at ``path`` trained and which epoch it kept (early stopping)."""
    try:
        extra = json.loads((path / "reranker.json").read_text())["extra"]
        return f": stopped after epoch {extra['epochs_run']}, kept epoch {extra['best_epoch']}, the best on validation"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _fresh_collection(pipe: Any, say: Callable[[str], None]) -> None:
    """Drop the demo's collection if other weights built it (e.g. a previous version's demo) or
    it was indexed for another reranker."""
    from .errors import IncompatibleError

    from .tokencache import cache_path

    try:
        pipe.store.check_compatible(pipe.encoder.info())
    except IncompatibleError:
        say("      (the demo's collection was built with other weights: rebuilding it)")
        pipe.store.drop()
        return
    # Indexed for another reranker (e.g. one retrained since): its image memory is not cached, and
    # rebuilding the demo's collection takes seconds.
    if pipe.store.count() and not cache_path(pipe.store.cache_dir(), pipe.reranker.memory_fingerprint).exists():
        say("      (the demo's collection holds no image memory for this reranker: rebuilding it)")
        pipe.store.drop()


def _config_error(message: str) -> Exception:
    from .errors import ConfigError

    return ConfigError(message)


# ---- examples ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    query: str
    first_right: bool  # the first stage's top hit is a right image
    reranked_right: bool  # the reranker's top hit is a right image


def _show_examples(pipe: Any, table: Path, n: int, say: Callable[[str], None]) -> list[Example]:
    """The first ``n`` held-out queries (the table's order; no picking), in image mode as the table
    above: the first stage's top hits and the reranked ones."""
    from .evaluation import load_queries

    if n <= 0:
        return []
    queries = list(load_queries(table).items())[:n]
    say(f"\nThe first {len(queries)} held-out queries of test.csv (no picking), in image mode as the table, top {EXAMPLE_K}:")
    say("  ✓ marks an image the query caption was generated for (the right answer)")
    say("  first stage: cosine of query and image vectors (-1..1); reranked: the reranker's score (a logit, higher = better)")
    examples = []
    for caption, relevant in queries:
        before = pipe.search(caption, k=EXAMPLE_K, mode="image", rerank=False).hits
        after = pipe.search(caption, k=EXAMPLE_K, mode="image", rerank=True).hits
        say(f"\nquery: {caption!r}")
        for label, score_name, hits in (("first stage", "cosine", before), ("reranked", "reranker score", after)):
            say(f"  {label} ({score_name}):")
            for h in hits:
                mark = "✓" if h.id in relevant else " "
                say(f"    {mark} {h.rank}. {h.score:8.3f}  {h.caption}")
        examples.append(Example(caption, bool(before) and before[0].id in relevant,
                                bool(after) and after[0].id in relevant))
    return examples


def _suggestion(examples: list[Example], doc: dict[str, Any], lay: Layout) -> str:
    """A command to try: a query shown above whose reranked top hit was right, or the first one
    with what to expect."""
    shown = next((e for e in examples if e.reranked_right), None)
    pick = shown or (examples[0] if examples else None)
    query = pick.query if pick else "a small red circle left of a large blue square"
    cmd = f'  mmr search "{query}" --mode image --db {lay.db} --collection {lay.collection} --rerank {lay.reranker}'
    if shown:
        return cmd + "\n  (shown above: the reranker puts the right image first)"
    r1, r10 = doc["reranked"]["R@1"], doc["reranked"]["R@10"]
    return (cmd + f"\n  (none of the queries above had the right image first after reranking; over all held-out "
            f"queries it is first {r1:.0%} of the time and in the top 10 {r10:.0%})")
