"""Files and arguments that ask for something absurd are refused before they cost anything (issue 23, classes 2 and
7): every model configuration read from a file is checked for types, ranges and fit with the weights before a
tensor is made, with a message naming the file, the field and the value.

The hostile files run in a child process under an address-space limit (RLIMIT_AS) and a timeout, so that a
regression fails here instead of taking the machine's memory; the child reports how far its peak memory grew while
refusing each file, which must stay near the file's own size.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from cvt import CvTConfig
from cvt.checkpoint import save_model, write_training_checkpoint
from cvt.checkpoint.training import STATE_KEYS
from cvt.model import CvT, model_metadata
from cvt.shapes import MAX_PARAMS_ENV, check_size, count_parameters, state_dict_shapes
from cvt.variants import model_config

# the weights every hostile config below is paired with: 64-wide first stage, as in the report
SMALL = CvTConfig(dims=(64, 64, 128), depths=(1, 2, 3), heads=(1, 1, 2), num_classes=5)
ADDRESS_SPACE = 2 << 30  # what the child may map beyond `import cvt` (the files here are a few MB)


# --- the arithmetic: parameter count and state-dict shapes without building a model ---------------------------


@pytest.mark.parametrize(
    ("name", "params"),
    [("cvt_13", 19_997_480), ("cvt_21", 31_622_696), ("cvt_w24", 277_196_392)],  # SPEC.md, "params (exact)"
)
def test_parameter_count_from_the_config_matches_the_spec(name, params):
    assert count_parameters(model_config(name)) == params


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"qkv_method": "avg"},
        {"qkv_method": ("linear", "avg", "dw_bn"), "qkv_kernel": (1, 3, 5), "stride_q": (1, 2, 1)},
        {"pos_embed": True, "pos_embed_size": (64, 96), "embed_padding": (0, 0, 1)},
        {"qkv_bias": False, "num_classes": 0, "cls_token": True, "mlp_ratio": (2.5, 3, 1.3), "in_chans": 1},
    ],
)
def test_state_dict_shapes_and_count_match_the_built_model(fields):
    cfg = CvTConfig(**{"dims": (16, 32, 48), "depths": (1, 2, 3), "heads": (1, 2, 3), "num_classes": 7, **fields})
    with torch.device("meta"):
        model = CvT(cfg)
    assert state_dict_shapes(cfg) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())


def test_size_guard_refuses_before_allocating_and_the_environment_raises_it(monkeypatch):
    cfg = CvTConfig(dims=(2048, 2048, 2048), depths=(1, 1, 40), heads=32, num_classes=10)  # 2e9 parameters, 8 GB
    with pytest.raises(ValueError, match=rf"^the architecture has 2,193,729,546 parameters .* {MAX_PARAMS_ENV}=N"):
        CvT(cfg)
    assert check_size(cfg, limit=10**10) == count_parameters(cfg)
    monkeypatch.setenv(MAX_PARAMS_ENV, "1e10")
    with torch.device("meta"):  # allowed now; on the meta device it costs nothing
        assert sum(p.numel() for p in CvT(cfg).parameters()) == count_parameters(cfg)


# --- CvTConfig itself: types and ranges -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"depths": ("1", "2", "10")}, "depths[0] = '1': must be an int"),
        ({"depths": (1, -2, 10)}, "depths[1] = -2: is out of range"),
        ({"depths": (1, 2, 1_000_000)}, "depths[2] = 1000000: is out of range: must be from 1 to 1024"),
        ({"dims": (64, 192.0, 384)}, "dims[1] = 192.0: must be an int"),
        ({"dims": (64, True, 384)}, "dims[1] = True: must be an int"),
        ({"heads": (0, 3, 6)}, "heads[0] = 0: is out of range"),
        ({"heads": (1, 5, 6)}, "heads[1] = 5: stage 1's width 192 is not divisible by 5 heads"),
        ({"mlp_ratio": (4, 4, 1e5)}, "mlp_ratio[2] = 100000.0: is out of range: must be in (0, 64]"),
        ({"mlp_ratio": (4, 4, float("nan"))}, "mlp_ratio[2] = nan: must be a number"),
        ({"mlp_ratio": 0.001}, "mlp_ratio[0] = 0.001: gives stage 0 (width 64) an MLP of no units"),
        ({"embed_kernel": (7000, 3, 3)}, "embed_kernel[0] = 7000: is out of range"),
        ({"embed_padding": (2, 3, 1)}, "embed_padding[1] = 3: stage 1's token embedding pads at least its kernel"),
        ({"stride_kv": 0}, "stride_kv[0] = 0: is out of range"),
        ({"drop_path_rate": (0, 0, 1.5)}, "drop_path_rate[2] = 1.5: is out of range: must be in [0, 1)"),
        ({"norm_eps": 0}, "norm_eps = 0: is out of range"),
        ({"num_classes": -1}, "num_classes = -1: is out of range"),
        ({"in_chans": "3"}, "in_chans = '3': must be an int"),
        ({"cls_token": (0, 0, 1)}, "cls_token[0] = 0: must be true or false"),
        ({"dims": ()}, "dims has 0 entries: a model has 1 to 16 stages"),
        ({"depths": (1, 2)}, "depths has 2 entries but the model has 3 stages"),
        ({"pos_embed_size": (224, 224, 3)}, "pos_embed_size has 3 entries"),
    ],
)
def test_config_refuses_wrong_types_and_ranges_naming_field_and_value(fields, message):
    with pytest.raises(ValueError) as err:
        CvTConfig(**fields)
    assert str(err.value) == f"CvTConfig.{message}" or str(err.value).startswith(f"CvTConfig.{message}")


def test_config_keeps_numbers_it_accepts_as_plain_python_numbers():
    cfg = CvTConfig(dims=[np.int64(64), 192, 384], mlp_ratio=4)
    assert cfg == CvTConfig() and type(cfg.dims[0]) is int and type(cfg.mlp_ratio[0]) is float


# --- hostile files, refused in a child process under a memory limit ------------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, re, resource, sys
    import cvt

    # what `import cvt` mapped (torch's libraries: more with a CUDA build), plus the budget for reading the files
    mapped = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mapped + {budget}, mapped + {budget}))

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    report = {{}}
    for path in sys.argv[1:]:
        before = peak_mb()
        try:
            cvt.load_model(path)
            outcome = "loaded"
        except BaseException as err:  # MemoryError, the allocator's RuntimeError, ...: all a failure here
            outcome = f"{{type(err).__name__}}: {{err}}"
        report[path] = {{"outcome": outcome, "growth_mb": peak_mb() - before}}
    print(json.dumps(report))
    """
)


def _refuse_all(paths: list[Path]) -> dict[str, dict]:
    """load_model on each path in one child process (2 GB more address space, 2 minutes): {path: outcome, growth}."""
    code = _CHILD.format(budget=ADDRESS_SPACE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _hf_folder(tmp_path: Path) -> tuple[Path, dict]:
    folder = save_model(CvT(SMALL), tmp_path / "hf", format="hf")
    return folder, json.loads((folder / "config.json").read_text())


def _size_mb(path: Path) -> float:
    files = path.rglob("*") if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files if f.is_file()) / 2**20


def test_hostile_hf_configs_are_refused_by_field_and_value_before_any_allocation(tmp_path):
    """Each was seen failing before the check: depth 1,000,000 ran out of the address space given (9.3 GB
    unbounded), embed_dim 4000 over 64-wide weights grew 1 GB before "does not fit", the others ended in torch's
    allocator message, `negative dimension`, ZeroDivisionError or a `linspace` overload dump, none naming the file
    or field."""
    folder, hf = _hf_folder(tmp_path)
    cases = {
        "depth": ([1, 2, 1_000_000], "depth[2] = 1000000: is out of range"),
        "depth_text": (None, "depth[0] = '1': must be an int from 1 to 1024"),
        "embed_dim": ([4000, 64, 128], "does not fit the model"),
        "mlp_ratio": ([4.0, 4.0, 100000.0], "mlp_ratio[2] = 100000.0: is out of range"),
        "patch_sizes": ([7000, 3, 3], "patch_sizes[0] = 7000: is out of range"),
        "kernel_qkv": ([3, 3, 4001], "kernel_qkv[2] = 4001: is out of range"),
        "num_heads": ([0, 1, 2], "num_heads[0] = 0: is out of range"),
        "patch_stride": ([4, -2, 2], "patch_stride[1] = -2: is out of range"),
        "num_channels": (-3, "num_channels = -3: is out of range"),
        "qkv_bias": ([True, False, True], "qkv_bias = [True, False, True]: per-stage"),
        "drop_rate": ([0.0, "x", 0.0], "drop_rate = [0.0, 'x', 0.0]: must be a list of numbers"),
    }
    paths, expected = [], {}
    for key, (value, message) in cases.items():
        case = tmp_path / key
        shutil.copytree(folder, case)
        patch = {"depth": ["1", "2", "3"]} if key == "depth_text" else {key: value}
        (case / "config.json").write_text(json.dumps({**hf, **patch}))
        paths.append(case)
        expected[str(case)] = message
    strings = tmp_path / "both"
    shutil.copytree(folder, strings)
    (strings / "config.json").write_text(json.dumps({**hf, "depth": ["1", "2", "3"], "embed_dim": [-64, 64, 128]}))
    paths.append(strings)
    expected[str(strings)] = "embed_dim[0] = -64: is out of range"  # the first bad field, in CvTConfig's order
    report = _refuse_all(paths)
    for path in paths:
        outcome = report[str(path)]["outcome"]
        assert outcome.startswith("CheckpointError: ") and expected[str(path)] in outcome, (path.name, outcome)
        assert str(path) in outcome  # the message names the file (config.json, or the folder for a misfit)
        assert report[str(path)]["growth_mb"] < 2 * _size_mb(path) + 32, (path.name, report[str(path)])


def test_hostile_configs_of_our_own_formats_and_of_inferred_weights_are_refused(tmp_path):
    """Our folder's config.json, a training checkpoint's config and a config inferred from a state dict whose keys
    say 1,000,000 blocks: seen failing before the check (the folder and the inferred state dict built a million
    blocks until the address space ran out; a string width ended in 'not all arguments converted')."""
    model = CvT(SMALL)
    ours = save_model(model, tmp_path / "ours")
    meta = json.loads((ours / "config.json").read_text())
    paths = []
    for name, patch in {"deep": {"depths": [1, 2, 1_000_000]}, "text": {"dims": ["64", 64, 128]}}.items():
        case = tmp_path / name
        shutil.copytree(ours, case)
        (case / "config.json").write_text(json.dumps({**meta, "model_config": {**meta["model_config"], **patch}}))
        paths.append(case)
    run = tmp_path / "last.pt"
    bad = {**model_metadata(model), "model_config": {**SMALL.to_dict(), "heads": [0, 1, 2]}}
    write_training_checkpoint(run, model.state_dict(), bad, ema=None, state=dict.fromkeys(STATE_KEYS))
    paths.append(run)
    inferred = tmp_path / "inferred.pth"
    weights = {k.replace("stages.", "stage", 1): v for k, v in model.state_dict().items()}  # the authors' layout
    weights["stage2.blocks.999999.norm1.weight"] = torch.ones(128)
    torch.save(weights, inferred)
    paths.append(inferred)
    report = _refuse_all(paths)
    messages = [report[str(p)]["outcome"] for p in paths]
    assert messages[0].endswith(
        "deep/config.json: model_config.depths[2] = 1000000: is out of range: must be from 1 to 1024"
    )
    assert messages[1].endswith("text/config.json: model_config.dims[0] = '64': must be an int from 1 to 65536")
    assert messages[2].endswith("last.pt: model_config.heads[0] = 0: is out of range: must be from 1 to 65536")
    assert messages[3].startswith(f"CheckpointError: {inferred}: cannot build a config from the weights")
    assert "depths[2] = 1000000: is out of range" in messages[3]
    assert all(report[str(p)]["growth_mb"] < 2 * _size_mb(p) + 32 for p in paths), report


# --- class 7: arguments and messages -------------------------------------------------------------------------


def test_label_smoothing_2_fails_in_the_config_check_before_the_run_directory_is_made(tmp_path, capsys):
    """Seen failing before the check: the config passed, the run directory and config.json were written, and the
    first step failed."""
    from cvt.cli import main

    run = tmp_path / "run"
    argv = ["train", "--config", "demo", "--data", str(tmp_path / "data"), "--output", str(run)]
    assert main([*argv, "--set", "label_smoothing=2"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "cvt train: error: label_smoothing must be in [0, 1), got 2"
    assert not run.exists()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("lr=0", "lr must be > 0, got 0"),
        ("lr_per_256=-1e-3", "lr_per_256 must be > 0, got -0.001"),
        ("momentum=1.0", "momentum must be in [0, 1), got 1.0"),
        ("ema_decay=1.5", "ema_decay must be in [0, 1), got 1.5"),
        ("re_prob=2", "re_prob must be in [0, 1], got 2"),
        ("crop_pct=0", "crop_pct must be in (0, 1], got 0"),
        ("weight_decay=-0.05", "weight_decay must be >= 0, got -0.05"),
        ("std=(0.2,0,0.2)", "std must be > 0 each, got (0.2, 0, 0.2)"),
        ("scale=(0.9,0.1)", "scale must be (low, high) with low <= high, got (0.9, 0.1)"),
        ("input_size=0", "input_size must be >= 1, got 0"),
        ("optimizer='adam'", "optimizer must be one of ('adamw', 'sgd'), got 'adam'"),
        ("device='gpu'", "device must be one of ('auto', 'cpu', 'cuda'), got 'gpu'"),
        (
            "model_kwargs.depths=[1,2,1000000]",
            "model_kwargs.depths[2] = 1000000: is out of range: must be from 1 to 1024",
        ),
        ("model_kwargs.heads=[1,0,6]", "model_kwargs.heads[1] = 0: is out of range: must be from 1 to 65536"),
    ],
)
def test_train_settings_outside_their_natural_bounds_are_refused(setting, message):
    from cvt.train import TrainConfig, apply_overrides

    with pytest.raises(ValueError) as err:
        apply_overrides(TrainConfig(), [setting])
    assert str(err.value) == message


@pytest.mark.parametrize("command", ["predict", "eval", "export", "attention", "train"])
def test_device_cuda_without_cuda_is_one_line_at_parse_time(command, tmp_path, capsys, monkeypatch):
    """Seen failing before the check: predict, eval, export and attention ended in torch's AssertionError
    ("Torch not compiled with CUDA enabled") after loading the model; train in a RuntimeError after parsing."""
    from cvt.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine with a GPU
    model = str(save_model(CvT(SMALL), tmp_path / "model"))
    argv = {
        "predict": ["predict", "--model", model, str(tmp_path / "x.jpg")],
        "eval": ["eval", "--model", model, "--data", str(tmp_path)],
        "export": ["export", "--model", model, "--output", str(tmp_path / "m.onnx")],
        "attention": ["attention", "--model", model, str(tmp_path / "x.jpg"), "--output", str(tmp_path / "a.png")],
        "train": ["train", "--config", "demo", "--output", str(tmp_path / "run")],
    }[command]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--device", "cuda"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"cvt {command}: error: --device cuda: CUDA is not available"), err
    assert not (tmp_path / "run").exists()


def test_device_names_torch_does_not_know_are_refused():
    from cvt.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "--model", "m", "x.jpg", "--device", "gpu"])
    args = build_parser().parse_args(["train", "--config", "demo", "--device", "auto"])  # train's own choice
    assert args.device == "auto"


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_torchscript_file_is_called_what_it_is(tmp_path):
    """Seen failing before: "truncated or corrupt", with torch's advice to load with weights_only=False."""
    from cvt import load_model
    from cvt.checkpoint import CheckpointError

    path = tmp_path / "model.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert message.startswith(f"{path} is a TorchScript program (written by torch.jit.save")
    assert "weights_only" not in message and "corrupt" not in message


def _sharded(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A Hugging Face folder whose weights are one shard listed by model.safetensors.index.json."""
    folder = save_model(CvT(SMALL), tmp_path / "sharded", format="hf")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    from safetensors.torch import load_file

    weights = load_file(folder / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": dict.fromkeys(weights, "model-00001-of-00001.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder, weights


def test_a_sharded_index_is_read_from_its_own_folder(tmp_path):
    from cvt import load_model

    folder, _ = _sharded(tmp_path)
    original = CvT(SMALL).state_dict().keys()
    assert load_model(folder).state_dict().keys() == original


@pytest.mark.parametrize("escape", ["absolute", "dotdot", "symlink"])
def test_a_sharded_index_pointing_outside_its_folder_is_refused_without_reading_the_target(tmp_path, escape):
    """Seen failing before: the index was followed to /etc/passwd-like files and the error quoted their first bytes."""
    from cvt import load_model
    from cvt.checkpoint import CheckpointError

    folder, weights = _sharded(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-CONTENT of a file that is not the model's\n")
    target = {"absolute": str(secret), "dotdot": "../secret.txt", "symlink": "link.safetensors"}[escape]
    if escape == "symlink":
        (folder / "link.safetensors").symlink_to(secret)
    index = {"weight_map": {**dict.fromkeys(weights, "model-00001-of-00001.safetensors"), "extra": target}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    message = str(err.value)
    assert "which is outside the index's folder: refused, nothing of it was read" in message
    assert "SECRET" not in message and "CONTENT" not in message


def test_a_data_config_asking_for_huge_inputs_is_refused_when_read(tmp_path):
    """Seen failing before the check: the folder loaded, and its 100000 x 100000 input size would have been
    allocated by the first image transform."""
    from cvt import load_model
    from cvt.checkpoint import CheckpointError

    folder = save_model(CvT(SMALL), tmp_path / "ours")
    meta = json.loads((folder / "config.json").read_text())
    meta["data_config"] = {**meta["data_config"], "input_size": [100000, 100000]}
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    assert str(err.value) == (
        f"{folder / 'config.json'}: data_config.input_size = (100000, 100000): must be (height, width), ints from 1 "
        "to 8192"
    )
