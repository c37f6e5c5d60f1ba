"""Checkpoint formats against the outside references: transformers' CvT, the spec's key layout and counts."""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import re

import numpy as np
import pytest
import torch
from transformers import CvtConfig as HFCvtConfig
from transformers import CvtForImageClassification, CvtModel

import cvt
from cvt.checkpoint import (
    CheckpointError,
    config_from_hf,
    cvt_to_hf,
    cvt_to_official,
    hf_to_cvt,
    official_to_cvt,
    read_checkpoint,
    read_training_checkpoint,
    save_model,
)
from cvt.cli import main
from cvt.config import CvTConfig, DataConfig
from cvt.factory import infer_config, load_model, resolve_model
from cvt.model import CvT
from cvt.variants import imagenet_classes, model_config

# transformers' CvT indexes its per-stage drop-path list by the stage number, so depth[i] must exceed i
TINY = CvTConfig(dims=(16, 32, 48), depths=(1, 2, 3), heads=(1, 2, 3), num_classes=10)
TINY_HF = dict(embed_dim=[16, 32, 48], depth=[1, 2, 3], num_heads=[1, 2, 3], num_labels=10)
TINY_ARCH = dict(dims=TINY.dims, depths=TINY.depths, heads=TINY.heads)  # what a file without a config needs


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random values in every parameter and buffer, BatchNorm running statistics included."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(int(torch.randint(1, 1000, (), generator=gen)))
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.3)
    return module.eval()


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny models: intra-op threads only add contention on a shared machine (2 threads: 50x slower here)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hf_model() -> CvtForImageClassification:
    return randomise(CvtForImageClassification(HFCvtConfig(**TINY_HF)), seed=2)


@pytest.fixture
def tiny() -> CvT:
    model = randomise(CvT(TINY), seed=3)
    model.class_names = [f"class {i}" for i in range(10)]
    model.data_config = DataConfig(input_size=(64, 64), crop_pct=0.9)
    model.model_name = "tiny"
    return model


# --- numerics against transformers ----------------------------------------------------------------------------


def test_hf_folder_gives_transformers_logits(hf_model, images, tmp_path):
    hf_model.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf", act="gelu")
    reference = logits(hf_model, images)
    assert (logits(ours, images) - reference).abs().max() < 1e-5
    assert ours.cfg.norm_eps == 1e-5 and ours.class_names is None
    # by default the authors' QuickGELU: measurably different from what transformers computes
    authors = load_model(tmp_path / "hf")
    assert authors.cfg.act == "quick_gelu"
    assert (logits(authors, images) - reference).abs().max() > 1e-3


def test_hf_base_model_without_head(images, tmp_path):
    base = randomise(CvtModel(HFCvtConfig(**TINY_HF), add_pooling_layer=False), seed=4)
    base.save_pretrained(tmp_path / "base")
    ours = load_model(tmp_path / "base", act="gelu")
    assert ours.num_classes == 0
    with torch.no_grad():
        maps = ours.forward_intermediates(images, intermediates_only=True)
        reference = base(images, output_hidden_states=True).hidden_states
    for mine, theirs in zip(maps, reference, strict=True):
        assert (mine - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "module_prefix", "legacy_pickle"])
def test_authors_layout_gives_transformers_logits(hf_model, images, tmp_path, wrap):
    ours = load_model(_save_hf(hf_model, tmp_path), act="gelu")
    # the authors' layout as the spec gives it: our leaf names with `stage{i}.` instead of `stages.{i}.`
    official = {re.sub(r"^stages\.(\d+)\.", r"stage\1.", k): v for k, v in ours.state_dict().items()}
    assert {"stage2.cls_token", "stage0.blocks.0.attn.conv_proj_q.bn.running_mean", "head.weight"} <= set(official)
    payload = {
        "bare": official,
        "state_dict": {"state_dict": official, "epoch": 299},
        "model": {"model": official, "optimizer": {"lr": 0.1}},
        "module_prefix": {f"module.{k}": v for k, v in official.items()},
        "legacy_pickle": official,
    }[wrap]
    path = tmp_path / "weights.pth"
    torch.save(payload, path, _use_new_zipfile_serialization=wrap != "legacy_pickle")
    loaded = load_model(path, act="gelu", heads=TINY.heads)
    assert read_checkpoint(path).format == "official"
    assert (logits(loaded, images) - logits(hf_model, images)).abs().max() < 1e-5
    named = cvt.create_model("cvt_13", pretrained=path, act="gelu", **TINY_ARCH)
    assert (logits(named, images) - logits(hf_model, images)).abs().max() < 1e-5


def _save_hf(hf_model, tmp_path):
    path = tmp_path / "hf"
    if not path.exists():
        hf_model.save_pretrained(path)
    return path


def test_our_hf_export_loads_in_transformers(tiny, images, tmp_path):
    model = randomise(CvT(dataclasses.replace(TINY, act="gelu")), seed=5)
    model.class_names = [f"class {i}" for i in range(10)]
    save_model(model, tmp_path / "hf", format="hf")
    theirs, info = CvtForImageClassification.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert (logits(theirs.eval(), images) - logits(model, images)).abs().max() < 1e-5
    assert theirs.config.id2label[3] == "class 3"


# --- lossless round trips --------------------------------------------------------------------------------------


def test_round_trip_own_format(tiny, tmp_path):
    save_model(tiny, tmp_path / "own")
    back = load_model(tmp_path / "own")
    assert_same_state(tiny.state_dict(), back.state_dict())
    assert back.cfg == tiny.cfg
    assert (back.class_names, back.data_config, back.model_name) == (tiny.class_names, tiny.data_config, "tiny")
    assert read_checkpoint(tmp_path / "own").format == "cvt"


def test_round_trip_hf(tiny, tmp_path):
    save_model(tiny, tmp_path / "hf", format="hf")
    back = load_model(tmp_path / "hf")
    assert_same_state(tiny.state_dict(), back.state_dict())
    assert back.cfg == tiny.cfg  # everything but the activation is in transformers' config; ours defaults to QuickGELU
    assert back.class_names == tiny.class_names


def test_round_trip_official(tiny, tmp_path):
    save_model(tiny, tmp_path / "tiny.pth", format="official")
    raw = torch.load(tmp_path / "tiny.pth", weights_only=True)
    assert all(re.match(r"(stage\d+\.|norm\.|head\.)", k) for k in raw)
    back = load_model(tmp_path / "tiny.pth", heads=TINY.heads)
    assert_same_state(tiny.state_dict(), back.state_dict())
    assert back.cfg == tiny.cfg


def test_round_trip_training_checkpoint(tiny, tmp_path):
    ema = randomise(CvT(TINY), seed=6)
    ckpt = {
        "format": "cvt.train",
        "version": 1,
        "model": tiny.state_dict(),
        "ema": ema.state_dict(),
        "model_name": "tiny-finetuned",
        "model_config": TINY.to_dict(),
        "data_config": tiny.data_config.to_dict(),
        "class_names": tiny.class_names,
        "optimizer": torch.optim.AdamW(tiny.parameters()).state_dict(),
        "rng": {
            "numpy": np.random.default_rng(0).integers(0, 2**32, 4, dtype=np.uint32),
            "torch": torch.get_rng_state(),
        },
        "epoch": 7,
    }
    torch.save(ckpt, tmp_path / "last.pt")
    back = load_model(tmp_path / "last.pt")
    assert_same_state(tiny.state_dict(), back.state_dict())
    assert (back.cfg, back.class_names, back.model_name) == (TINY, tiny.class_names, "tiny-finetuned")
    assert back.data_config == tiny.data_config
    assert_same_state(ema.state_dict(), load_model(tmp_path / "last.pt", ema=True).state_dict())


def test_training_checkpoint_reader_checks_format_version_and_resumability(tiny, tmp_path):
    # what best.pt holds: the weights and metadata, no state to resume from
    weights_only = {"format": "cvt.train", "version": 1, "model": tiny.state_dict(), "model_config": TINY.to_dict()}
    weights_only["optimizer"] = None
    torch.save(weights_only, tmp_path / "best.pt")
    assert read_training_checkpoint(tmp_path / "best.pt")["model_config"] == TINY.to_dict()
    needs_state = r"best\.pt is not a full training checkpoint, the state a resume needs \(format 'cvt\.train'\)"
    with pytest.raises(CheckpointError, match=needs_state):
        read_training_checkpoint(tmp_path / "best.pt", resumable=True)
    torch.save({**weights_only, "version": 2}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="'cvt.train' version 2 is not supported"):
        read_training_checkpoint(tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="'cvt.train' version 2 is not supported"):
        load_model(tmp_path / "future.pt")
    torch.save(tiny.state_dict(), tmp_path / "weights.pth")
    with pytest.raises(CheckpointError, match=r"weights\.pth is not a training checkpoint"):
        read_training_checkpoint(tmp_path / "weights.pth")


def test_pure_key_conversions_invert_each_other():
    with torch.device("meta"):
        state = CvT(model_config("cvt_13")).state_dict()
    assert list(official_to_cvt(cvt_to_official(state))) == list(state)
    assert list(hf_to_cvt(cvt_to_hf(state))) == list(state)


# --- the released architectures -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "entries"), [("cvt_13", 459), ("cvt_21", 731), ("cvt_w24", 833)])
def test_official_key_count_and_variant_inference(name, entries):
    with torch.device("meta"):
        state = CvT(model_config(name)).state_dict()
    official = cvt_to_official(state)
    assert len(official) == entries  # the spec's count for the authors' files
    cfg, inferred, guessed = infer_config(official_to_cvt(official))
    assert (cfg, inferred, guessed) == (model_config(name), name, False)


def test_transformers_full_size_keys_match_ours():
    with torch.device("meta"):
        theirs = CvtForImageClassification(HFCvtConfig(num_labels=1000)).state_dict()
        ours = CvT(model_config("cvt_13")).state_dict()
    mapped = hf_to_cvt(theirs)
    assert set(mapped) == set(ours)
    assert all(mapped[k].shape == ours[k].shape for k in ours)


def test_config_from_hf_matches_registry():
    assert config_from_hf(HFCvtConfig().to_dict()) == model_config("cvt_13")
    w24 = HFCvtConfig(
        embed_dim=[192, 768, 1024], depth=[2, 2, 20], num_heads=[3, 12, 16], drop_path_rate=[0.0, 0.0, 0.3]
    )
    assert config_from_hf(w24.to_dict()) == model_config("cvt_w24")
    assert HFCvtConfig().layer_norm_eps == 1e-12 and config_from_hf(HFCvtConfig().to_dict()).norm_eps == 1e-5


def test_what_the_weights_cannot_tell_is_asked_for(tiny, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="cvt"):
        save_model(tiny, tmp_path / "tiny.pth", format="official")
        assert load_model(tmp_path / "tiny.pth").cfg.heads == (1, 1, 1)
    assert "does not record the attention heads" in caplog.text
    avg = CvT(dataclasses.replace(TINY, qkv_method="avg"))
    save_model(avg, tmp_path / "avg.pth", format="official")
    with pytest.raises(CheckpointError, match="'avg' and 'linear' cannot be told apart"):
        load_model(tmp_path / "avg.pth")
    back = load_model(tmp_path / "avg.pth", qkv_method="avg", heads=TINY.heads)
    assert back.cfg == avg.cfg
    assert_same_state(avg.state_dict(), back.state_dict())


@pytest.mark.slow
def test_full_size_official_file_gets_name_preprocessing_and_imagenet_names(tmp_path):
    model = CvT(model_config("cvt_13"))
    save_model(model, tmp_path / "CvT-13-384x384-IN-1k.pth", format="official")
    loaded = load_model(tmp_path / "CvT-13-384x384-IN-1k.pth")
    assert loaded.model_name == "cvt_13.in1k_384" and loaded.data_config.input_size == (384, 384)
    assert loaded.cfg == model_config("cvt_13") and len(loaded.class_names) == 1000
    assert_same_state(model.state_dict(), loaded.state_dict())


def test_imagenet_classes():
    names = imagenet_classes()
    assert len(names) == 1000 and all(n.strip() == n and n for n in names)
    assert (names[0], names[1], names[207], names[281], names[999]) == (
        "tench",
        "goldfish",
        "golden retriever",
        "tabby",
        "toilet tissue",
    )


def test_hf_imagenet_labels_become_short_names(tmp_path):
    model = randomise(CvT(dataclasses.replace(TINY, num_classes=1000)), seed=7)
    save_model(model, tmp_path / "hf", format="hf", class_names=[f"{n}, long name" for n in imagenet_classes()])
    assert load_model(tmp_path / "hf").class_names == imagenet_classes()
    assert cvt.create_model("cvt_13", **TINY_ARCH).class_names is None


# --- fine-tuning and strictness --------------------------------------------------------------------------------


def test_new_num_classes_reinitialises_only_the_head(tiny, tmp_path, caplog):
    save_model(tiny, tmp_path / "own")
    with caplog.at_level(logging.INFO, logger="cvt"):
        model = load_model(tmp_path / "own", num_classes=5)
    assert "re-initialising the classifier head" in caplog.text
    assert model.head.weight.shape == (5, 48) and model.class_names is None
    state, original = model.state_dict(), tiny.state_dict()
    assert all(torch.equal(state[k], original[k]) for k in original if not k.startswith("head."))
    named = cvt.create_model("cvt_13", pretrained=tmp_path / "own", num_classes=3, **TINY_ARCH)
    assert named.head.weight.shape == (3, 48)


def test_mismatch_names_missing_unexpected_and_misshaped_keys(tiny, tmp_path):
    state = cvt_to_official(tiny.state_dict())
    del state["stage1.blocks.1.mlp.fc2.bias"]
    state["stage1.blocks.1.mlp.extra.weight"] = torch.zeros(3)
    state["stage2.blocks.0.attn.proj.weight"] = torch.zeros(48, 40)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "bad.pth", heads=TINY.heads)
    message = str(err.value)
    for fragment in (
        "bad.pth (official format)",
        "missing 1 ['stages.1.blocks.1.mlp.fc2.bias']",
        "unexpected 1 ['stages.1.blocks.1.mlp.extra.weight']",
        "stages.2.blocks.0.attn.proj.weight (48, 40) (model (48, 48))",
    ):
        assert fragment in message
    with pytest.raises(CheckpointError, match="missing .* unexpected .* mis-shaped"):
        cvt.create_model("cvt_13", pretrained=tmp_path / "bad.pth", dims=(16, 32, 64), depths=(1, 2, 3), heads=1)


def test_named_architecture_must_match_the_file(tiny, tmp_path):
    save_model(tiny, tmp_path / "own")
    with pytest.raises(CheckpointError, match=r"heads=\(1, 2, 3\) \(asked \(2, 2, 2\)\)"):
        cvt.create_model("cvt_13", pretrained=tmp_path / "own", dims=TINY.dims, depths=TINY.depths, heads=(2, 2, 2))


# --- safety and damaged files ----------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_pickle_with_code_is_refused_and_never_runs(tiny, tmp_path):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(str(probe))))
    assert probe.exists()  # the payload does run when unpickled naively

    marker = tmp_path / "pwned"
    state = {**tiny.state_dict(), "evil": _Payload(str(marker))}
    torch.save({"state_dict": state}, tmp_path / "zip.pth")
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump(state, f)
    for name, reason in (("zip.pth", r"global (builtins\.)?exec"), ("plain.pkl", "plain Python pickle")):
        with pytest.raises(CheckpointError, match=rf"refusing to load .*{name}: refused for safety.*{reason}"):
            load_model(tmp_path / name)
        assert not marker.exists()


@pytest.mark.parametrize("fmt", ["official", "cvt"])
def test_truncated_file_fails_naming_it(tiny, tmp_path, fmt):
    path = save_model(tiny, tmp_path / ("w.pth" if fmt == "official" else "own"), format=fmt)
    weights = path if fmt == "official" else path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(weights))}.*truncated or corrupt"):
        load_model(path, heads=TINY.heads) if fmt == "official" else load_model(path)


class _System:
    """Pickles as a call of os.system (posix.system), a module torch's weights-only unpickler blocks outright."""

    def __reduce__(self):
        return (os.system, ("true",))


def test_blocked_module_refusal_names_the_global(tmp_path):
    # torch 2.13 words this case "unsupported GLOBAL posix.system whose module posix is blocked", and its message
    # begins by suggesting weights_only=False: the reader must still call it a refusal, not a corrupt file
    torch.save({"model": _System()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "evil.pt")
    message = str(info.value)
    assert message.startswith(f"refusing to load {tmp_path / 'evil.pt'}: refused for safety")
    assert f"global {os.system.__module__}.system" in message
    assert "truncated" not in message and "weights_only" not in message


def test_garbage_and_missing_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth is not a checkpoint: not a PyTorch or safetensors file"):
        load_model(tmp_path / "junk.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pth is not a checkpoint: the file is empty \(0 bytes\)"):
        load_model(tmp_path / "empty.pth")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other.pth is not a checkpoint: it holds no state dict .*'weights'"):
        load_model(tmp_path / "other.pth")
    for name, obj, what in (("list.pt", [torch.ones(2)], "a list of 1 item"),
                            ("tensor.pt", torch.ones(3, 2), r"a bare tensor of shape \(3, 2\)"),
                            ("number.pt", 7, "an? int")):  # fmt: skip
        torch.save(obj, tmp_path / name)
        with pytest.raises(
            CheckpointError, match=rf"{re.escape(str(tmp_path / name))} is not a checkpoint: it holds {what}"
        ):
            load_model(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_model(tmp_path / "absent.pth")


# --- resolve_model and the CLI ---------------------------------------------------------------------------------


def test_resolve_model_takes_paths_and_rejects_unknown_names(tiny, tmp_path):
    save_model(tiny, tmp_path / "own")
    assert_same_state(tiny.state_dict(), resolve_model(str(tmp_path / "own")).state_dict())
    with pytest.raises(FileNotFoundError, match="neither an existing file or folder nor a registered model.*cvt_13"):
        resolve_model("cvt_99")


def test_cli_convert_chain_is_lossless(tiny, tmp_path, capsys):
    save_model(tiny, tmp_path / "own")
    assert main(["convert", str(tmp_path / "own"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "cvt"]) == 0
    assert main(["convert", str(tmp_path / "back"), str(tmp_path / "tiny.pth"), "--to", "official"]) == 0
    assert_same_state(tiny.state_dict(), load_model(tmp_path / "back").state_dict())
    assert_same_state(tiny.state_dict(), load_model(tmp_path / "tiny.pth", heads=TINY.heads).state_dict())
    (tmp_path / "bad.pth").write_bytes(b"\x80\x02garbage")
    assert main(["convert", str(tmp_path / "bad.pth"), str(tmp_path / "x"), "--to", "cvt"]) == 1
    assert "bad.pth" in capsys.readouterr().err
