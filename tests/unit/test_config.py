from dataclasses import dataclass

import pytest

from mm_retrieval.config import PipelineConfig, SearchConfig, StageSpec, config_from_dict, config_to_dict
from mm_retrieval.errors import ConfigError
from mm_retrieval.stages.encoders.open_clip import OpenClipConfig
from mm_retrieval.stages.stores.milvus import MilvusConfig


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        config_from_dict(OpenClipConfig, {"modle": "ViT-B-32"})
    msg = str(e.value)
    assert "'modle'" in msg and "model" in msg and "pretrained" in msg


def test_wrong_type_is_an_error_naming_key():
    with pytest.raises(ConfigError, match="batch_size must be int"):
        config_from_dict(OpenClipConfig, {"batch_size": "64"})
    with pytest.raises(ConfigError, match="batch_size must be int"):
        config_from_dict(OpenClipConfig, {"batch_size": True})


def test_round_trip_and_int_accepted_for_float():
    cfg = config_from_dict(MilvusConfig, {"uri": "x.db", "timeout": 5, "index_params": {"M": 8}})
    assert cfg.timeout == 5
    assert config_from_dict(MilvusConfig, config_to_dict(cfg)) == cfg


def test_stage_overrides_prune_none_so_unset_flags_keep_file_values():
    from mm_retrieval.stages.encoders.open_clip import OpenClipEncoder

    enc = OpenClipEncoder(OpenClipConfig(model="file-model", batch_size=8), model=None, batch_size=0)
    assert enc.config.model == "file-model" and enc.config.batch_size == 0  # 0 is a value, not "unset"
    assert StageSpec("encoder", "open_clip", {"model": "m"}).with_params({"model": None, "seed": 0}).params == {"model": "m", "seed": 0}


def test_pipeline_file_and_precedence(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text(
        '[encoder]\nmodel = "mmr-tiny"\npretrained = "none"\n'
        '[store]\nuri = "a.db"\ncollection = "c1"\n'
        '[reranker]\ncheckpoint = "ck"\n'
        "[search]\nk = 3\ncandidates = 50\n"
    )
    cfg = PipelineConfig.load(f)
    assert cfg.encoder == StageSpec("encoder", "open_clip", {"model": "mmr-tiny", "pretrained": "none"})
    assert cfg.reranker.params == {"checkpoint": "ck"}
    assert cfg.search == SearchConfig(k=3, candidates=50)
    assert PipelineConfig.from_dict(cfg.to_dict()) == cfg

    from mm_retrieval import Pipeline

    p = Pipeline(f, db="b.db", model=None)
    assert p.config.store.params["uri"] == "b.db"  # flag beats file
    assert p.config.store.params["collection"] == "c1"  # file kept
    assert p.config.encoder.params["model"] == "mmr-tiny"  # unset flag does not clobber


@pytest.mark.parametrize(
    "text, match",
    [
        ("[encoder\nmodel=1", "not valid TOML"),
        ("[bogus]\nx=1", "unknown section"),
        ("[search]\nk = 'ten'", "k must be int"),
        ("[search]\nkk = 1", "unknown key"),
        ("encoder = 3", "must be a table"),
    ],
)
def test_bad_pipeline_files(tmp_path, text, match):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        PipelineConfig.load(f)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        PipelineConfig.load(tmp_path / "nope.toml")


def test_stage_validates_its_params():
    from mm_retrieval import registry

    with pytest.raises(ConfigError, match="valid keys"):
        registry.create("store", "milvus", {"url": "x"})


@dataclass(frozen=True)
class _Opt:
    a: int | None = None


def test_optional_fields_accept_none():
    assert config_from_dict(_Opt, {"a": None}).a is None
