"""Hybrid results explain their scores: `mmr search` labels the fused, reranker, image and text
scores as separate columns, says which one orders the list, and each number is the hit's field."""

import json

import pandas as pd
import pytest

from mm_retrieval import Pipeline
from mm_retrieval.cli import main
from mm_retrieval.server.testing import COLORS, TINY_ENCODER, make_image, save_demo_reranker

TINY_ARGS = ["--model", "mmr-tiny", "--pretrained", "none"]


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """8 images (5 with captions), a text-only row, and a small reranker for the tiny encoder."""
    root = tmp_path_factory.mktemp("hybrid")
    rows = [{"path": str(make_image(root / "img" / f"{n}.png", rgb, seed=i)), "caption": f"a {n} picture" if i < 5 else None}
            for i, (n, rgb) in enumerate(COLORS.items())]
    rows.append({"path": None, "caption": "a recipe for red soup"})
    pd.DataFrame(rows).to_csv(root / "items.csv", index=False)
    pipe = Pipeline(db=str(root / "mmr.db"), encoder=TINY_ENCODER)
    pipe.index(root / "items.csv", progress=False)
    ckpt = save_demo_reranker(pipe, root / "reranker")
    args = ["--db", str(root / "mmr.db"), "--collection", pipe.store.name, *TINY_ARGS]
    pipe.close()
    return args, str(ckpt)


def mmr(capsys, *args):
    """`mmr ARGS`' stdout; run in this process (the table is what is tested, not the process: a new
    one would import torch again for each of these searches)."""
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    return out.out


def _shows(cell, value):
    """Whether a table cell shows ``value``: "-" for None, else the value rounded to the cell's
    decimals (3 at least; a column prints more where its rows would otherwise look alike)."""
    if value is None or cell == "-":
        return cell == "-" and value is None
    decimals = len(cell.partition(".")[2])
    return decimals >= 3 and abs(float(cell) - value) <= 0.5 * 10 ** -decimals + 1e-12


@pytest.mark.parametrize("rerank", [True, False])
def test_hybrid_table_labels_every_score(captioned, capsys, rerank):
    args, ckpt = captioned
    extra = ["--rerank", ckpt] if rerank else ["--no-rerank"]
    doc = json.loads(mmr(capsys, "search", "a red picture", "--k", "9", "--mode", "hybrid", *args, *extra, "--json"))
    lines = mmr(capsys, "search", "a red picture", "--k", "9", "--mode", "hybrid", *args, *extra).splitlines()
    assert doc["mode"] == "hybrid" and doc["reranked"] is rerank

    head, legend, columns, *rows = lines
    assert "hybrid mode" in head and head.endswith("ordered by fused")
    labels = ["fused", "reranker", "image", "text"] if rerank else ["fused", "image", "text"]
    assert columns.split()[1:-3] == labels  # "#.", the labels, "path / caption"
    for label in labels:
        assert f"{label}: " in legend
    assert "fusion of the reranker ranking" in legend if rerank else "fusion of the image ranking" in legend

    fields = ["score", "rerank_score", "image_score", "text_score"] if rerank else ["score", "image_score", "text_score"]
    assert len(rows) == len(doc["hits"])
    for line, hit in zip(rows, doc["hits"]):
        cells = line.split()
        assert cells[0] == f"{hit['rank']}."
        assert all(_shows(cell, hit.get(f)) for cell, f in zip(cells[1 : 1 + len(fields)], fields, strict=True)), line
    # the table is ordered by the fused score, and the text-only item has no image similarity
    assert [h["score"] for h in doc["hits"]] == sorted((h["score"] for h in doc["hits"]), reverse=True)
    text_items = [line for line, h in zip(rows, doc["hits"]) if h.get("has_image") is False]
    assert text_items or rerank  # the reranker scores images only; the first stage finds the recipe too
    for line in text_items:
        assert "(text item)" in line and line.split()[fields.index("image_score") + 1] == "-"


def test_image_mode_table_says_reranker_then_image_cosine(captioned, capsys):
    args, ckpt = captioned
    doc = json.loads(mmr(capsys, "search", "a red picture", "--k", "3", "--mode", "image", *args, "--rerank", ckpt, "--json"))
    head, legend, columns, *rows = mmr(capsys, "search", "a red picture", "--k", "3", "--mode", "image", *args, "--rerank",
                                       ckpt).splitlines()
    assert head.endswith("ordered by reranker") and columns.split()[1:3] == ["reranker", "image"]
    assert "image: cosine of the query and the image vectors" in legend
    for line, hit in zip(rows, doc["hits"]):
        assert _shows(line.split()[1], hit["score"]) and _shows(line.split()[2], hit["retrieval_score"]), line
