"""``train_encoder``: open_clip_train on a tiny generated table, exported as an open_clip local-dir.

Trains ``mmr-tiny`` on CPU twice (a CSV table, then a parquet table with a model-config JSON
file), a few seconds of training each plus the child process's start-up.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import click
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

import open_clip
from mm_retrieval.errors import ConfigError, InputError, ModelLoadError, StageError
from mm_retrieval.models.tiny import CONFIG_DIR, register_tiny_configs
from mm_retrieval.training import EncoderTrainResult, train_encoder
from mm_retrieval.training.encoder import EncoderTrainConfig

COLOURS = {
    "red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220),
    "yellow": (230, 230, 30), "purple": (140, 30, 160), "orange": (250, 140, 0),
    "white": (250, 250, 250), "black": (10, 10, 10),
}
FAST = dict(batch_size=16, workers=0, device="cpu", progress=False)


def make_images(folder: Path) -> list[dict[str, str]]:
    """64 PNGs (8 colours x 2 shapes x 4 sizes); rows with paths relative to ``folder``."""
    (folder / "img").mkdir(parents=True)
    rows = []
    for colour, rgb in COLOURS.items():
        for shape in ("square", "circle"):
            for k in range(4):
                image = Image.new("RGB", (64, 64), (128, 128, 128))
                draw = ImageDraw.Draw(image)
                box = (6 + 3 * k, 6 + 3 * k, 58 - 3 * k, 58 - 3 * k)
                (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=rgb)
                rel = f"img/{len(rows):03d}.png"
                image.save(folder / rel)
                rows.append({"path": rel, "caption": f"a {colour} {shape}", "split": "train"})
    return rows


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pairs")
    rows = make_images(folder)
    missing = [{"path": "img/gone.png", "caption": "a lost image", "split": "train"}] * 2
    # Absolute paths in the CSV, relative ones in the parquet: both must work.
    csv_rows = [{**r, "path": str(folder / r["path"])} for r in rows] + missing
    pd.DataFrame(csv_rows).to_csv(folder / "pairs.csv", index=False)
    pd.DataFrame(rows).to_parquet(folder / "pairs.parquet")
    return folder


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> tuple[EncoderTrainResult, Path]:
    out = tmp_path_factory.mktemp("encoder")
    result = train_encoder(data_dir / "pairs.csv", out, epochs=2, keep_work=True, **FAST)
    return result, out


@pytest.mark.slow  # open_clip_train in a subprocess
def test_output_dir_has_the_contract_files(trained, data_dir):
    result, out = trained
    assert result.out_dir == out.resolve()
    assert (result.model_name, result.epochs, result.n_pairs) == ("mmr-tiny", 2, 64)
    assert {"open_clip_config.json", "open_clip_model.safetensors", "mmr_encoder.json"} <= {
        p.name for p in out.iterdir()
    }
    config = json.loads((out / "open_clip_config.json").read_text())
    register_tiny_configs()
    assert config["model_cfg"] == open_clip.get_model_config("mmr-tiny")
    assert set(config["preprocess_cfg"]) == {"mean", "std", "interpolation", "resize_mode"}

    provenance = json.loads((out / "mmr_encoder.json").read_text())
    assert provenance["format"] == "mm_retrieval.encoder/1"
    assert provenance["base_model"] == "mmr-tiny"
    assert provenance["pretrained"] is None
    assert provenance["epochs"] == 2
    assert provenance["n_pairs"] == 64
    assert provenance["table"] == str((data_dir / "pairs.csv").resolve())
    assert provenance["created"]
    assert (out / "_work" / "run" / "checkpoints" / "epoch_2.pt").is_file()  # keep_work=True


def test_skipped_rows_are_reported(data_dir, caplog):
    from mm_retrieval.training.encoder import load_pairs

    with caplog.at_level(logging.WARNING, logger="mm_retrieval.training.encoder"):
        pairs = load_pairs(data_dir / "pairs.csv")
    assert len(pairs) == 64
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in pairs["path"])
    assert "skipped 2 of 66 rows whose image file is missing" in caplog.text


@pytest.mark.slow  # open_clip_train in a subprocess
def test_loss_is_reported_and_went_down(trained):
    # Deterministic for a given seed (fixed at 0); the drop is far larger than any
    # platform-dependent rounding (seeds 1-3 gave drops of 0.30-0.69 over these two epochs).
    result, _ = trained
    assert len(result.epoch_losses) == 2
    assert result.final_loss is not None and result.final_loss > 0
    assert result.epoch_losses[-1] < result.epoch_losses[0]


@pytest.mark.slow  # open_clip_train in a subprocess
def test_local_dir_loads_and_matches_the_raw_checkpoint(trained, data_dir):
    _, out = trained
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()

    register_tiny_configs()
    reference = open_clip.create_model("mmr-tiny")
    raw = torch.load(out / "_work/run/checkpoints/epoch_2.pt", map_location="cpu", weights_only=True)
    reference.load_state_dict({k.removeprefix("module."): v for k, v in raw["state_dict"].items()})
    reference.eval()

    images = torch.stack([preprocess(Image.open(p)) for p in sorted(data_dir.glob("img/*.png"))[:8]])
    assert images.shape == (8, 3, 64, 64)
    texts = tokenizer(["a red square", "a blue circle"])
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), reference.encode_image(images))
        assert torch.equal(model.encode_text(texts), reference.encode_text(texts))
    assert torch.equal(model.logit_scale, reference.logit_scale)


@pytest.mark.slow  # open_clip_train in a subprocess
def test_model_config_json_parquet_table_and_image_size(data_dir, tmp_path):
    config = tmp_path / "my-net.json"
    shutil.copyfile(CONFIG_DIR / "mmr-tiny.json", config)
    out = tmp_path / "enc"
    result = train_encoder(
        data_dir / "pairs.parquet", out, model=str(config), epochs=1, image_size=32, **FAST
    )
    assert result.model_name == "my-net"
    assert result.n_pairs == 64
    assert not (out / "_work").exists()  # removed after conversion by default
    provenance = json.loads((out / "mmr_encoder.json").read_text())
    assert provenance["base_model"] == "my-net"
    assert provenance["model_config_file"] == str(config)
    saved = json.loads((out / "open_clip_config.json").read_text())
    assert saved["model_cfg"]["vision_cfg"]["image_size"] == 32

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    image = preprocess(Image.open(next(data_dir.glob("img/*.png")))).unsqueeze(0)
    assert image.shape == (1, 3, 32, 32)
    with torch.no_grad():
        assert model.encode_image(image).shape == (1, 64)


def test_cli_and_function_share_one_set_of_defaults():
    # `mmr train-encoder` with no options trains exactly as train_encoder() does.
    import dataclasses
    import inspect

    from mm_retrieval.cli import cli

    signature = inspect.signature(train_encoder).parameters
    command = cli.commands["train-encoder"]
    options = {p.name: p.default for p in command.params}
    recipe = EncoderTrainConfig()
    for field in dataclasses.fields(EncoderTrainConfig):
        default = getattr(recipe, field.name)
        assert signature[field.name].default == default, field.name
        if field.name in options:  # wd is the library's only
            assert options[field.name] == default, field.name
    assert (recipe.epochs, recipe.lr) == (10, 1e-3)  # the command line's values won
    # every option of the command says what it does
    assert [p.name for p in command.params if isinstance(p, click.Option) and not p.help] == []


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(batch_size=-1), dict(lr=float("nan")), dict(workers=-1)])
def test_invalid_hyper_parameters_fail_before_any_work(data_dir, tmp_path, bad):
    with pytest.raises(ConfigError, match=f"{next(iter(bad))}"):
        train_encoder(data_dir / "pairs.csv", tmp_path / "out", **bad)
    assert not (tmp_path / "out").exists()


def test_missing_table(tmp_path):
    with pytest.raises(InputError, match="table not found"):
        train_encoder(tmp_path / "nope.csv", tmp_path / "out")


def test_unsupported_table_type(tmp_path):
    table = tmp_path / "pairs.txt"
    table.write_text("path,caption\n")
    with pytest.raises(InputError, match=r"unsupported table type.*\.csv, \.parquet or \.jsonl"):
        train_encoder(table, tmp_path / "out")


def test_table_without_captions(data_dir, tmp_path):
    table = tmp_path / "pairs.jsonl"
    paths = pd.read_csv(data_dir / "pairs.csv")[["path"]]
    paths.to_json(table, orient="records", lines=True)
    with pytest.raises(InputError, match="without captions can't train an encoder") as info:
        train_encoder(table, tmp_path / "out")
    assert "add a caption column" in str(info.value)


def test_table_without_usable_rows(tmp_path):
    table = tmp_path / "pairs.csv"
    pd.DataFrame({"path": ["a.png", "b.png"], "caption": ["x", "y"]}).to_csv(table, index=False)
    with pytest.raises(InputError, match="0 usable rows.*2 with a missing image file"):
        train_encoder(table, tmp_path / "out")


def test_unknown_model_name(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown model 'mmr-tinny'") as info:
        train_encoder(data_dir / "pairs.csv", tmp_path / "out", model="mmr-tinny")
    assert "mmr-tiny" in str(info.value)  # suggests close names
    assert "model-config JSON" in str(info.value)


def test_invalid_model_config_file(data_dir, tmp_path):
    config = tmp_path / "broken.json"
    config.write_text(json.dumps({"embed_dim": 64}))
    with pytest.raises(ConfigError, match="not an open_clip model config"):
        train_encoder(data_dir / "pairs.csv", tmp_path / "out", model=str(config))


def test_unknown_pretrained_tag(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown pretrained tag 'laion2b'.*local checkpoint"):
        train_encoder(data_dir / "pairs.csv", tmp_path / "out", pretrained="laion2b")


def test_unknown_device_fails_before_training(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="device 'tpu' is not a device; use auto, cpu, cuda or cuda:N"):
        train_encoder(data_dir / "pairs.csv", tmp_path / "out", device="tpu")
    assert not (tmp_path / "out").exists()  # nothing written, no trainer started


def test_missing_pretrained_checkpoint(data_dir, tmp_path):
    with pytest.raises(InputError, match="pretrained checkpoint not found"):
        train_encoder(data_dir / "pairs.csv", tmp_path / "out", pretrained=str(tmp_path / "w.pt"))


def test_pretrained_tag_offline_says_to_pass_a_local_checkpoint(data_dir, tmp_path, monkeypatch):
    # A known tag whose weights are not cached, with the hub forced offline: the child fails
    # before building the model, and the error tells the user what to do.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="could not be fetched") as info:
        train_encoder(
            data_dir / "pairs.csv", tmp_path / "out", model="RN50", pretrained="openai", **FAST
        )
    assert "--pretrained PATH" in str(info.value)


@pytest.mark.slow  # open_clip_train in a subprocess
def test_trainer_failure_raises_stage_error_with_its_log(data_dir, tmp_path):
    with pytest.raises(StageError, match="open_clip_train failed") as info:
        train_encoder(data_dir / "pairs.csv", tmp_path / "out", extra_args=["--no-such-flag"], **FAST)
    assert "unrecognized arguments: --no-such-flag" in str(info.value)
