"""Named weights through the Hugging Face cache: found offline, and a clear way out when they are not there."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys

import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError

import cvt
from cvt.checkpoint import config_to_hf, cvt_to_hf
from cvt.config import CvTConfig
from cvt.model import CvT

TINY = CvTConfig(dims=(16, 32, 48), depths=(1, 2, 3), heads=(1, 2, 3), num_classes=10)
TINY_ARCH = dict(dims=TINY.dims, depths=TINY.depths, heads=TINY.heads)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_cache(cache, repo_id: str, model: CvT, weights: str = "model.safetensors") -> None:
    """Lay out one hub repository the way huggingface_hub's cache does: refs/main -> snapshots/<commit>/."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (snapshot / "config.json").write_text(json.dumps(config_to_hf(model.cfg)))
    state = cvt_to_hf(model.state_dict())
    if weights == "model.safetensors":
        from safetensors.torch import save_file

        save_file(state, snapshot / weights, metadata={"format": "pt"})
    else:
        torch.save(state, snapshot / weights)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def test_named_weights_load_offline_from_the_cache(hub_cache):
    source = CvT(TINY)
    fill_cache(hub_cache, "microsoft/cvt-13", source)
    model = cvt.create_model("cvt_13", pretrained=True, **TINY_ARCH)
    expected, loaded = source.state_dict(), model.state_dict()
    assert list(expected) == list(loaded) and all(torch.equal(expected[k], loaded[k]) for k in expected)
    assert model.model_name == "cvt_13-custom" and model.data_config.input_size == (224, 224)  # tiny, not in1k
    assert model.num_classes == 10 and model.cfg.act == "quick_gelu"
    # resolve_model: a registered name that is not a path gets its released weights
    assert cvt.resolve_model("cvt_13", **TINY_ARCH).model_name == "cvt_13-custom"


def test_tagged_weights_and_pytorch_bin_fallback(hub_cache):
    source = CvT(TINY)
    fill_cache(hub_cache, "microsoft/cvt-21-384-22k", source, weights="pytorch_model.bin")
    model = cvt.create_model("cvt_21.in22k_ft_384", pretrained=True, num_classes=4, **TINY_ARCH)
    assert model.model_name == "cvt_21-custom" and model.data_config.input_size == (384, 384)
    assert model.head.weight.shape == (4, 48)
    assert torch.equal(model.stages[2].cls_token, source.stages[2].cls_token)


def test_offline_without_cache_says_what_to_do(hub_cache):
    with pytest.raises(FileNotFoundError) as err:
        cvt.create_model("cvt_13.in1k_384", pretrained=True)
    message = str(err.value)
    assert "microsoft/cvt-13-384" in message and "HF_HUB_OFFLINE is set" in message
    assert "CvT-13-384x384-IN-1k.pth" in message and "pretrained=" in message


def test_unreachable_hub_without_cache_says_what_to_do(hub_cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("cvt.hub._hub_unreachable", lambda endpoint: None)  # the probe connects; the download fails
    calls = []

    def no_network(repo_id, filename, *, local_files_only, **kwargs):
        calls.append(local_files_only)
        raise LocalEntryNotFoundError("Connection error, and the file is not in the cache")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_network)
    with pytest.raises(FileNotFoundError, match="could not provide them .*CvT-w24-384x384-IN-22k.pth"):
        cvt.create_model("cvt_w24", pretrained=True)
    assert calls == [True, False]  # the cache first, then the network


def test_no_network_fails_at_once_without_the_hubs_retries(hub_cache, monkeypatch, caplog):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    calls, probes = [], []

    def no_dns(address, timeout):
        probes.append((address, timeout))
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def download(repo_id, filename, *, local_files_only, **kwargs):
        calls.append(local_files_only)
        if local_files_only:
            raise LocalEntryNotFoundError("not in the cache")
        raise AssertionError("went to the network: huggingface_hub would retry for ~25 s")

    monkeypatch.setattr(socket, "create_connection", no_dns)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    with pytest.raises(FileNotFoundError, match=r"the hub huggingface.co:443 cannot be reached \(Name or service"):
        cvt.create_model("cvt_13", pretrained=True)
    assert calls == [True] and probes == [(("huggingface.co", 443), 3.0)]  # the cache, then one probe
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_hub_warnings_are_printed_once_by_the_command_line():
    # huggingface_hub has its own stderr handler and also propagates to the root logger the CLI configures
    code = (
        "import logging; from cvt.cli import main; main(['configs']); import huggingface_hub.file_download; "
        "logging.getLogger('huggingface_hub.file_download').warning('Retrying in 1s [Retry 1/5].')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stderr.count("Retrying in 1s") == 1, done.stderr
