"""``train_reranker``: the ALBEF/BLIP recipe over a frozen tiny CLIP, on the compositional set.

One module fixture generates the set (400 training images in contrast groups of four), trains an
``mmr-tiny`` first stage on it with open_clip_train, and trains a small reranker for 3 epochs; the
other tests reuse them. Everything runs on CPU and is deterministic for a given seed.
"""

from __future__ import annotations

import logging
import math

import pandas as pd
import pytest
import torch

from mm_retrieval.datasets.compositional import generate_compositional
from mm_retrieval.errors import ConfigError, IncompatibleError, InputError
from mm_retrieval.stages.rerankers.cross_attention.checkpoint import load_reranker
from mm_retrieval.stages.encoders.open_clip import OpenClipEncoder
from mm_retrieval.training import RerankerTrainResult, train_encoder, train_reranker
from mm_retrieval.training.reranker import STATE_FILE, RerankerTrainConfig
from mm_retrieval.training.reranker.data import split_units

pytestmark = pytest.mark.slow  # the module fixtures train a first stage and a reranker

SMALL = {"width": 64, "depth": 2, "heads": 2, "kv_heads": 1, "memory_dim": 32}
# One recipe for every run here, so a resumed run can be compared with the fixture's straight one.
RUN = dict(
    epochs=3, patience=3, batch_size=32, negatives=15, hard_pool=32, lr=1e-3, seed=0,
    reranker_config=SMALL, device="cpu", progress=False,
)  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_compositional(tmp_path_factory.mktemp("compositional"), n_train=400, n_test=100)


@pytest.fixture(scope="module")
def encoder(data, tmp_path_factory) -> OpenClipEncoder:
    """A first stage trained on the set (briefly: it stays weak, which leaves room to rerank)."""
    out = tmp_path_factory.mktemp("encoder")
    train_encoder(data.train_table, out, model="mmr-tiny", epochs=2, batch_size=64, workers=0,
                  device="cpu", progress=False)  # fmt: skip
    enc = OpenClipEncoder({"model": str(out), "workers": 0, "device": "cpu"})
    enc.warm_up()
    return enc


@pytest.fixture(scope="module")
def trained(data, encoder, tmp_path_factory) -> RerankerTrainResult:
    return train_reranker(data.train_table, tmp_path_factory.mktemp("reranker"), encoder=encoder, **RUN)


def test_checkpoint_is_tied_to_its_encoder(trained, encoder, data):
    out = trained.out_dir
    assert not (out / STATE_FILE).exists()  # removed after a successful run
    model, meta = load_reranker(out, expected_encoder_fingerprint=encoder.fingerprint)
    assert meta["encoder_fingerprint"] == encoder.fingerprint
    cfg = model.config
    assert (cfg.text_dim, cfg.image_dim) == (64, 64)  # mmr-tiny's token widths
    assert {k: getattr(cfg, k) for k in SMALL} == SMALL
    # The first stage's own temperature: scale * cosine are CLIP's logits.
    assert cfg.retrieval_scale_init == pytest.approx(float(encoder.model.logit_scale.detach().exp()))

    extra = meta["extra"]
    assert extra["table"] == str(data.train_table.resolve())
    assert extra["val"] == trained.val
    assert (extra["epochs_run"], extra["best_epoch"]) == (trained.epochs_run, trained.best_epoch)
    assert extra["encoder"]["model"] == encoder.config.model
    assert extra["negatives"] == 15
    assert extra["created"]

    with pytest.raises(IncompatibleError, match="trained on encoder"):
        load_reranker(out, expected_encoder_fingerprint="0123456789abcdef")


def test_split_and_val_metrics(trained):
    # Split by contrast group: 100 groups of 4 images, 10 groups held out.
    assert (trained.n_train, trained.n_val) == (360, 40)
    val = trained.val
    # Val captions search the whole table's 400 images, as they would in a collection.
    assert (val["queries"], val["images"], val["depth"]) == (40, 400, 100)
    for side in ("first_stage", "reranked"):
        # contrast: own image above its contrast-group twins' (binding negatives, the default)
        assert set(val[side]) == {"R@1", "R@5", "R@10", "MRR", "contrast"}
        assert all(0.0 <= v <= 1.0 for v in val[side].values())
    # Epoch 0 is the untrained model, whose zero head ranks exactly like the first stage.
    assert trained.history[0]["epoch"] == 0 and trained.history[0]["loss"] is None
    assert {k: trained.history[0][k] for k in val["first_stage"]} == val["first_stage"]
    # Keep-best: the shipped model is the best epoch's, never worse than the first stage on val.
    best = trained.history[trained.best_epoch]
    assert {k: best[k] for k in val["reranked"]} == val["reranked"]
    assert val["reranked"]["R@1"] >= val["first_stage"]["R@1"]
    assert best["R@1"] == max(h["R@1"] for h in trained.history)


def test_training_loss_goes_down(trained):
    # The default objective scores with the head alone, which starts at zero: the listwise loss
    # starts at chance over 16 candidates (ln 16 = 2.77); epoch means then drop (seed 0: 2.86 ->
    # 2.35 -> 1.61; seeds 1 and 2 end at 1.62 and 1.58), far beyond rounding.
    assert trained.epochs_run == 3
    assert len(trained.epoch_losses) == 3
    assert trained.epoch_losses[-1] < trained.epoch_losses[0]


def test_a_run_that_never_improves_ships_the_initial_model(data, encoder, tmp_path):
    # lr=0: every epoch ranks like epoch 0, so nothing is strictly better and patience=1 stops
    # after one epoch. The shipped head is the initial all-zero one: pure first stage.
    useless = {**RUN, "lr": 0.0, "patience": 1}
    result = train_reranker(data.train_table, tmp_path, encoder=encoder, **useless)
    assert (result.epochs_run, result.best_epoch) == (1, 0)
    assert result.val["reranked"] == result.val["first_stage"]
    model, _ = load_reranker(tmp_path, expected_encoder_fingerprint=encoder.fingerprint)
    assert torch.count_nonzero(model.head[-1].weight) == 0
    assert torch.count_nonzero(model.head[-1].bias) == 0
    clip_scale = float(encoder.model.logit_scale.detach().exp())
    assert float(model.retrieval_scale.detach()) == pytest.approx(clip_scale)


def test_resume_continues_exactly_where_it_stopped(data, encoder, trained, tmp_path, caplog):
    table = data.train_table
    first = train_reranker(table, tmp_path, encoder=encoder, keep_state=True, **{**RUN, "epochs": 1})
    assert first.epochs_run == 1
    assert (tmp_path / STATE_FILE).is_file()

    with pytest.raises(IncompatibleError, match=r"cannot resume.*lr: saved 0\.001, now 0\.002"):
        train_reranker(table, tmp_path, encoder=encoder, resume=True, **{**RUN, "lr": 2e-3})

    with caplog.at_level(logging.INFO, logger="mm_retrieval.training.reranker"):
        second = train_reranker(table, tmp_path, encoder=encoder, resume=True, **{**RUN, "epochs": 2})
    assert "resuming after epoch 1" in caplog.text
    assert second.epochs_run == 2
    assert len(second.epoch_losses) == 2
    assert not (tmp_path / STATE_FILE).exists()
    # Model, optimiser and RNG states round-trip: the numbers of the uninterrupted run (bit-identical
    # on one machine; approx only so a BLAS change can't fail it).
    assert len(second.history) == 3
    assert second.history[0] == trained.history[0]  # epoch 0: no loss yet
    for resumed, straight in zip(second.history[1:], trained.history[1:]):
        assert resumed == pytest.approx(straight, rel=1e-6)


def test_separate_objective_fits_the_first_stage_weight_on_val(trained, encoder):
    # The head ranks on its own; the first stage's weight is a grid value chosen on val:
    # CLIP's temperature x 2^(k/3), k in -18..18.
    model, meta = load_reranker(trained.out_dir, expected_encoder_fingerprint=encoder.fingerprint)
    assert meta["extra"]["objective"] == "separate"
    k = 3 * math.log2(float(model.retrieval_scale.detach()) / model.config.retrieval_scale_init)
    assert abs(k - round(k)) < 1e-3 and -18 <= round(k) <= 18


def test_binding_negatives_and_a_local_image_side(data, encoder, tmp_path, caplog):
    # Twins (contrast-group mates) in every caption's image set, rewritten captions on the text
    # side, and a conv image side over the pixels trained with the head.
    run = {**RUN, "epochs": 1, "binding": True, "reranker_config": {**SMALL, "local_channels": 16}}
    with caplog.at_level(logging.INFO, logger="mm_retrieval.training.reranker"):
        result = train_reranker(data.train_table, tmp_path, encoder=encoder, **run)
    model, meta = load_reranker(tmp_path, expected_encoder_fingerprint=encoder.fingerprint)
    stats = meta["extra"]["binding"]
    assert stats["with_twins"] == stats["captions"] and stats["with_rewrites"] == stats["captions"]
    assert "have twins" in caplog.text
    assert all("contrast" in h for h in result.history)  # val binding accuracy, every epoch
    assert 0.0 <= result.history[-1]["contrast"] <= 1.0
    assert model.needs_pixels and model.config.image_size == 64 and model.config.local_channels == 16
    pixels = torch.zeros(2, 3, 64, 64)
    tokens = torch.zeros(2, model.config.num_patches, model.config.image_dim)
    assert model.image_memory(tokens, pixels).shape == (2, model.config.num_patches, model.config.memory_dim)
    with pytest.raises(InputError, match="own image side"):
        model.image_memory(tokens)


def test_binding_without_a_group_column_and_without_rewrites(data, encoder, tmp_path, caplog):
    df = pd.read_csv(data.train_table)
    df["path"] = [str(data.root / p) for p in df["path"]]  # the tables below live elsewhere
    no_group = tmp_path / "no_group.csv"
    df.drop(columns=["group"]).to_csv(no_group, index=False)
    run = {**RUN, "epochs": 1, "binding": True, "split_by": ()}
    result = train_reranker(no_group, tmp_path / "a", encoder=encoder, **run)
    _, meta = load_reranker(result.out_dir)
    stats = meta["extra"]["binding"]  # twins by word permutation alone, and rewrites
    assert stats["with_twins"] > 0.9 * stats["captions"] and stats["with_rewrites"] == stats["captions"]
    # Captions with one noun phrase and no kind words: no twins, no rewrites; trains as before.
    plain = tmp_path / "plain.csv"
    df.assign(group=None, caption=[f"picture number {i}" for i in range(len(df))]).to_csv(plain, index=False)
    with caplog.at_level(logging.INFO, logger="mm_retrieval.training.reranker"):
        result = train_reranker(plain, tmp_path / "b", encoder=encoder, **run)
    _, meta = load_reranker(result.out_dir)
    assert meta["extra"]["binding"]["neither"] == meta["extra"]["binding"]["captions"]
    assert "have neither and train on image-side negatives only" in caplog.text
    assert result.epochs_run == 1


def test_split_by_keeps_linked_rows_together(tmp_path):
    # Rows sharing a group or a combination (or an image) form one unit: a-b share a group, b-c a
    # combination, d stands alone, e shares d's image; f has no values and is its own unit.
    df = pd.DataFrame({
        "path": ["1.png", "2.png", "3.png", "4.png", "4.png", "5.png"],
        "group": ["g1", "g1", "g2", "g3", "g4", None],
        "combination": ["x", "y", "y", "z", "w", None],
    })  # fmt: skip
    units = split_units(df, list(df["path"]), ("group", "combination"), tmp_path / "t.csv")
    assert units[0] == units[1] == units[2]
    assert units[3] == units[4] and units[3] != units[0]
    assert len(set(units)) == 3
    by_group = split_units(df, list(df["path"]), ("group",), tmp_path / "t.csv")
    assert by_group[0] == by_group[1] != by_group[2]
    with pytest.raises(InputError, match=r"split_by column\(s\) \['scene'\] are not in"):
        split_units(df, list(df["path"]), ("group", "scene"), tmp_path / "t.csv")


def test_residual_objective_learns_corrections_on_top_of_the_first_stage(data, encoder, tmp_path):
    run = {**RUN, "epochs": 2, "objective": "residual", "split_by": ("group", "combination")}
    result = train_reranker(data.train_table, tmp_path, encoder=encoder, **run)
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    model, meta = load_reranker(tmp_path, expected_encoder_fingerprint=encoder.fingerprint)
    assert meta["extra"]["objective"] == "residual"
    assert meta["extra"]["split_by"] == ["group", "combination"]
    assert result.n_val != 40  # whole colour-swap classes are held out, not 10 groups


def test_cli_and_function_share_one_set_of_defaults():
    # `mmr train-reranker` with no options trains exactly as train_reranker() does.
    import dataclasses
    import inspect

    from mm_retrieval.cli import cli

    signature = inspect.signature(train_reranker).parameters
    options = {p.name: p.default for p in cli.commands["train-reranker"].params}
    recipe = RerankerTrainConfig()
    for field in dataclasses.fields(RerankerTrainConfig):
        default = getattr(recipe, field.name)
        assert signature[field.name].default == default, field.name
        cli_default = options[field.name]
        if field.name == "split_by":
            cli_default = tuple(cli_default.split(","))
        assert cli_default == default, field.name


# --- errors -------------------------------------------------------------------------------


def test_missing_table(encoder, tmp_path):
    with pytest.raises(InputError, match="table not found"):
        train_reranker(tmp_path / "nope.csv", tmp_path / "out", encoder=encoder, progress=False)


def test_table_without_captions(data, encoder, tmp_path):
    table = tmp_path / "paths.csv"
    pd.read_csv(data.train_table)[["path"]].to_csv(table, index=False)
    with pytest.raises(InputError, match="can't train a reranker; add a caption column"):
        train_reranker(table, tmp_path / "out", encoder=encoder, progress=False)


def test_empty_table(encoder, tmp_path):
    table = tmp_path / "empty.csv"
    table.write_text("path,caption\n")
    with pytest.raises(InputError, match="is empty"):
        train_reranker(table, tmp_path / "out", encoder=encoder, progress=False)


@pytest.mark.parametrize(
    "bad, match",
    [({"val_fraction": 0.0}, "val_fraction"), ({"negatives": 0}, "negatives"), ({"epochs": 0}, "epochs"),
     ({"objective": "pairwise"}, "objective must be one of separate, residual")],
)
def test_bad_settings(data, encoder, tmp_path, bad, match):
    with pytest.raises(ConfigError, match=match):
        train_reranker(data.train_table, tmp_path / "out", encoder=encoder, progress=False, **bad)
