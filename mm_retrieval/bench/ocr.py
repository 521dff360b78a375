"""Suite ``ocr``: text in images (``--ocr``), on images made here.

* **Recall of the words.** Photo-like scenes with a sign of 2-3 words rendered onto them in the
  DejaVu faces at 18-48 px, level or turned by 6-20 degrees, plus phone-shaped screenshots of
  12 short lines at 14-20 px (:func:`~mm_retrieval.testing.text_images.make_ocr_set`), indexed with
  ``--ocr``. For each image, ``--mode ocr`` searches its longest word (the exact word) and its
  first two words (the phrase). Words repeat across images, as real words do, so each query is
  judged against every image that bears it: recall (the share of those found), R-precision (the
  share of the top R hits that bear it, R being how many do: a word found inside another, or a
  phrase's words apart, count against it) and top1 (the image the query came from ranks first, ties
  included). Broken down by kind, size and angle.
* **OCR time per image** (the reader alone, models loaded).
* **Index throughput with OCR on vs off**: the same images indexed by the tiny model into a new
  collection with and without ``--ocr``; with a real model the encoder's share grows and the
  ratio rises, as OCR's cost per image stays.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from .timing import figure, summary


def run(root: Path, device: str, *, quick: bool = False) -> dict[str, Any]:
    from ..ocr import shared_reader
    from ..pipeline import Pipeline
    from ..testing.text_images import make_ocr_set

    n_signs, n_screens = (8, 2) if quick else (40, 10)
    work = root / "ocr"
    folder = work / f"set-{n_signs}-{n_screens}"
    truth = make_ocr_set(folder, n_signs, n_screens, seed=7)
    reader = shared_reader()
    reader.warm_up()

    runs = {}
    shutil.rmtree(work / "db", ignore_errors=True)  # each run indexes into a new collection
    for ocr in (False, True):
        db = work / "db" / f"index-{'on' if ocr else 'off'}" / "mmr.db"
        db.parent.mkdir(parents=True)
        pipe = Pipeline(db=str(db), collection="ocr_bench", encoder={"model": "mmr-tiny", "pretrained": "none", "workers": 0,
                                                                     "device": device})
        pipe.encoder.warm_up()
        t = time.perf_counter()
        report = pipe.index(folder, progress=False, ocr=ocr)
        runs[ocr] = (time.perf_counter() - t, report, pipe)
    seconds_off, _, off_pipe = runs[False]
    seconds_on, report, pipe = runs[True]
    off_pipe.close()
    n = len(truth)

    per_image = []
    for it in truth[: 10 if quick else 20]:
        res, _ = reader.read_file(it["path"])
        if res is not None:
            per_image.append(res.seconds)

    rows = []
    for it in truth:
        words = [w.lower() for w in it["words"]]
        word = max(words, key=len)  # the longest (short words also occur inside others)
        phrase = words[:2]
        rows.append({**{k: it[k] for k in ("kind", "font_px", "angle")},
                     "word": _judge(pipe, [word], it["path"], truth, n), "phrase": _judge(pipe, phrase, it["path"], truth, n)})
    pipe.close()

    def block(sel: list[dict[str, Any]]) -> dict[str, Any]:
        if not sel:
            return {"n": 0}
        out: dict[str, Any] = {"n": len(sel)}
        for q in ("word", "phrase"):
            for m in ("recall", "r_precision", "top1"):
                out[f"{q}_{m}"] = round(sum(r[q][m] for r in sel) / len(sel), 3)
        return out

    return {
        "images": n, "signs": n_signs, "screenshots": n_screens, "model": "mmr-tiny (index throughput)",
        "recall": {
            "all": block(rows),
            "signs": block([r for r in rows if r["kind"] == "sign"]),
            "screenshots": block([r for r in rows if r["kind"] == "screenshot"]),
            "signs_small_text_18_26px": block([r for r in rows if r["kind"] == "sign" and r["font_px"] <= 26]),
            "signs_large_text_36_48px": block([r for r in rows if r["kind"] == "sign" and r["font_px"] >= 36]),
            "signs_level": block([r for r in rows if r["kind"] == "sign" and r["angle"] == 0]),
            "signs_turned": block([r for r in rows if r["kind"] == "sign" and r["angle"] != 0]),
        },
        "ocr_per_image": summary(per_image),
        "index_ocr_on_vs_off": figure(n / seconds_on, "images/s", "the same index run without --ocr", n / seconds_off),
        "with_text": report.ocr["with_text"], "ocr_failed": len(report.ocr["failed"]),
        "median_ocr_s": round(statistics.median(per_image), 3) if per_image else None,
    }


def _judge(pipe: Any, words: list[str], path: str, truth: list[dict[str, Any]], n: int) -> dict[str, float]:
    """``--mode ocr`` for ``words`` (one word, or a phrase) against what is written: ``recall``,
    the share of the images that bear it (the phrase: those words in a row on one line) that are
    found at all; ``r_precision``, the share of the top R hits that bear it, R being how many do
    (hits are every image holding any query word, so a phrase's must rank first); ``top1``, whether
    the image the query was taken from is first or tied with the first."""
    hits = pipe.search(" ".join(words), mode="ocr", k=n, rerank=False).hits
    bears = {Path(t["path"]).name for t in truth if _written(words, t)}
    found = {Path(h.path).name for h in hits}
    first = [Path(h.path).name for h in hits if hits and h.score == hits[0].score]
    top_r = {Path(h.path).name for h in hits[: len(bears)]}
    return {"recall": len(found & bears) / len(bears), "r_precision": len(top_r & bears) / len(bears),
            "top1": float(Path(path).name in first)}


def _written(words: list[str], item: dict[str, Any]) -> bool:
    """Whether ``words`` are written in a row on ``item`` (a screenshot: within one line of 3)."""
    seq = [w.lower() for w in item["all_words"]]
    lines = [seq[i : i + 3] for i in range(0, len(seq), 3)] if item["kind"] == "screenshot" else [seq]
    return any(line[i : i + len(words)] == words for line in lines for i in range(len(line) - len(words) + 1))


def summary_lines(p: dict[str, Any]) -> list[str]:
    """The suite's lines in ``mmr bench``'s summary."""
    a = p["recall"]["all"]
    r = p["index_ocr_on_vs_off"]
    return [
        f"ocr     --mode ocr on {p['images']} made images ({p['signs']} signs, {p['screenshots']} screenshots): exact word recall "
        f"{a['word_recall']} (R-precision {a['word_r_precision']}), phrase recall {a['phrase_recall']} (R-precision {a['phrase_r_precision']}, "
        f"source image first {a['phrase_top1']})",
        f"        OCR {p['ocr_per_image'].get('p50_ms', 0) / 1000:.2f} s per image (p50); index {r['value']:.2f} images/s with --ocr vs "
        f"{r['against_value']:.2f} without (ratio {r['ratio']:.3f}, {p['model']})",
    ]
