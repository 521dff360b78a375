"""Devices and precision: one rule (mm_retrieval.devices) for every stage, option and benchmark."""

from __future__ import annotations

import pytest

from mm_retrieval import registry
from mm_retrieval.cli import main
from mm_retrieval.devices import autocast, autocast_dtype, check_device, resolve_device
from mm_retrieval.errors import ConfigError


def test_device_forms():
    for ok in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert check_device(ok) == ok
    for bad in ("gpu", "cuda:", "cuda:-1", "cuda:x", "CUDA", "cpu:0", ""):
        with pytest.raises(ConfigError, match="auto, cpu, cuda or cuda:N"):
            check_device(bad)


def test_cuda_without_cuda_is_a_clear_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine's GPUs: none
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="CUDA is not available; use --device cpu or auto"):
            resolve_device(device)


def test_a_gpu_index_beyond_the_gpus_there_are_names_them(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # stands in for a 2-GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("auto") == "cuda"
    with pytest.raises(ConfigError, match=r"'cuda:2' requested but this machine has 2 CUDA devices \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


def test_precision_rule():
    import torch

    assert autocast_dtype("cpu", "auto") is None and autocast_dtype("cpu", "fp32") is None
    assert autocast_dtype("cpu", "bf16") is torch.bfloat16 and autocast_dtype("cpu", "fp16") is torch.float16
    assert autocast_dtype("cuda:1", "fp32") is None and autocast_dtype("cuda", "fp16") is torch.float16
    with pytest.raises(ConfigError, match="unknown precision 'half'; use auto, fp32, bf16, fp16"):
        autocast_dtype("cpu", "half")
    with autocast("cpu", None):
        pass
    with autocast("cpu", torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")


def test_stage_configs_check_device_and_precision():
    for kind, name in (("encoder", "open_clip"), ("reranker", "cross_attention"), ("reranker", "blip_itm")):
        cls = registry.get(kind, name)
        assert cls({"device": "cuda:3"}).config.device == "cuda:3"  # checked against the GPUs when it loads
        with pytest.raises(ConfigError, match="device 'gpu:0' is not a device"):
            cls({"device": "gpu:0"})
        with pytest.raises(ConfigError, match="unknown precision"):
            cls({"precision": "fp8"})


def test_device_option_takes_cuda_n_and_refuses_other_forms(tmp_path, capsys):
    assert main(["search", "a dog", "--db", str(tmp_path / "none.db"), "--device", "cuda:1"]) == 2
    assert "does not exist" in capsys.readouterr().err  # the option took it: the missing collection is what stops the search
    assert main(["search", "a dog", "--db", str(tmp_path / "none.db"), "--device", "gpu1"]) == 2
    assert "--device 'gpu1' is not a device; use auto, cpu, cuda or cuda:N" in capsys.readouterr().err
