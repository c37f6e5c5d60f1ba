"""`cvt.train.train` end to end on generated data: run directory, learning, exact mid-epoch resume, non-finite stop."""

import csv
import hashlib
import json

import pytest
import torch

import cvt
from cvt.data import make_dataset
from cvt.engine import NonFiniteLossError
from cvt.train import TrainConfig, apply_overrides, find_config, load_config, rng_state, set_rng_state, train

TINY = {"dims": [16, 32, 48], "depths": [1, 1, 1], "heads": [1, 1, 2]}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """4 classes x 8 training + 3 validation images of 32x32."""
    return make_dataset(tmp_path_factory.mktemp("data") / "shapes", num_classes=4, train_per_class=8, val_per_class=3,
                        image_size=32)  # fmt: skip


def tiny_config(data, output, **kw) -> TrainConfig:
    base = {
        "model_kwargs": dict(TINY),
        "data": str(data),
        "input_size": 32,
        "batch_size": 8,
        "num_workers": 0,
        "epochs": 3,
        "warmup_epochs": 1,
        "lr": 2e-3,
        "amp": "none",
        "output": str(output),
        "progress": False,
    }
    return TrainConfig(**{**base, **kw})


def test_config_overrides():
    cfg = apply_overrides(TrainConfig(), ["epochs=3", "model_kwargs.drop_path_rate=0.2", "init=runs/x/best.pt",
                                          "clip_grad=None", "scale=(0.5, 1.0)"])  # fmt: skip
    assert cfg.epochs == 3 and cfg.model_kwargs == {"drop_path_rate": 0.2} and cfg.init == "runs/x/best.pt"
    assert cfg.scale == (0.5, 1.0) and cfg.clip_grad is None
    with pytest.raises(ValueError, match="unknown TrainConfig field.*'epoch'"):
        apply_overrides(TrainConfig(), ["epoch=3"])
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", ["cvt_13_224", "cvt_13_384", "cvt_21_224", "cvt_21_384", "cvt_w24_384",
                                  "finetune_384", "demo"])  # fmt: skip
def test_paper_configs_load(name):
    cfg = load_config(name)
    head = find_config(name).read_text().split('"""')[1]
    assert "cvt " in head and "%" in head  # the command that runs it and the result to expect
    if name != "demo":
        assert cfg.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.re_prob == 0.25 and cfg.label_smoothing == 0.1
        assert cfg.warmup_lr == 1e-6 and cfg.min_lr == 1e-5
    if name.startswith("cvt_21") or name.startswith("cvt_w24"):
        assert cfg.weight_decay == 0.1
    if name.endswith("384"):
        assert cfg.input_size == 384 and cfg.crop_mode == "squash"
    if name == "finetune_384":
        assert cfg.optimizer == "sgd" and cfg.momentum == 0.9 and cfg.batch_size * 8 == 512


def test_configs_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here, nor a checkout above
    for spec in ("demo", "demo.py", "configs/demo.py"):
        assert find_config(spec).parent.name == "configs" and find_config(spec).name == "demo.py"
        assert load_config(spec).model_kwargs["dims"] == [32, 64, 128]
    own = write_config(tmp_path / "demo.py", tiny_config("x", "y", epochs=2), "cvt train --config demo.py", "none.")
    assert find_config("demo.py") == own.relative_to(tmp_path)  # a user's own file wins over the shipped name
    assert load_config("demo.py").epochs == 2
    with pytest.raises(FileNotFoundError, match=r"config nodir/demo.py not found.*'cvt_13_224'"):
        load_config("nodir/demo.py")


def test_cvt_configs_lists_the_paper_figures(capsys):
    from cvt.cli import main

    assert main(["configs"]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()[2:]}
    assert sorted(rows) == ["cvt_13_224", "cvt_13_384", "cvt_21_224", "cvt_21_384", "cvt_w24_384", "demo",
                            "finetune_384"]  # fmt: skip
    # the paper's ImageNet-1k top-1 (SPEC.md, Training recipe)
    for name, top1 in [("cvt_13_224", "81.6%"), ("cvt_13_384", "83.0%"), ("cvt_21_224", "82.5%"),
                       ("cvt_21_384", "83.3%"), ("cvt_w24_384", "87.7%")]:  # fmt: skip
        assert f"| {top1} top-1" in rows[name], rows[name]
    assert "| cvt_13_224 | cvt_13 | 224 | 300 |" in rows["cvt_13_224"]


def test_rng_state_round_trip():
    state = rng_state()
    a = (__import__("random").random(), __import__("numpy").random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (__import__("random").random(), __import__("numpy").random.rand(), torch.rand(1).item()) == a


def test_training_learns_and_fills_the_run_directory(shapes, tmp_path):
    # no augmentation, so the loss measures fitting alone
    # mean-pooled head: this narrow net fits 32 images in 24 steps with it, the class token needs far longer
    cfg = tiny_config(shapes, tmp_path / "run", epochs=6, warmup_epochs=0, lr=3e-3, auto_augment=None, re_prob=0.0,
                      mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0, scale=None, hflip=0.0,
                      model_kwargs={**TINY, "cls_token": False}, tensorboard=True)  # fmt: skip
    summary = train(cfg)
    run = tmp_path / "run"
    for name in ("config.json", "metrics.csv", "summary.json", "last.pt", "best.pt", "curves.png"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))  # numbered as the log's "epoch 1/6"
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < 0.8 * losses[0] and losses[-1] < 1.2, losses  # from about ln(4) = 1.39
    # the schedule, per epoch, without warm-up: lr(e) = 1e-5 + (3e-3 - 1e-5) (1 + cos(pi e / 6)) / 2
    assert float(rows[0]["lr"]) == pytest.approx(3e-3)
    assert float(rows[3]["lr"]) == pytest.approx(1.505e-3)
    assert float(rows[5]["lr"]) == pytest.approx(1e-5 + 1.495e-3 * (1 - 0.8660254037844387))
    assert float(rows[3]["throughput"]) > 0
    assert list((run / "tb").glob("events.out.tfevents.*"))  # TensorBoard logging
    assert cvt.load_model(run / "best.pt").model_name == "cvt_13-custom"  # TINY widths: not the in1k weights
    assert json.loads((run / "summary.json").read_text()) == summary
    assert summary["completed"] and summary["epochs_done"] == 6 and summary["global_step"] == 24
    assert summary["best_top1"] == max(float(r["val_top1"]) for r in rows)
    best_row = max(rows, key=lambda r: float(r["val_top1"]))  # the first of equals, as the run keeps it
    assert summary["best_epoch"] == int(best_row["epoch"])  # one numbering in metrics.csv, summary.json and the log
    assert json.loads((run / "config.json").read_text())["epochs"] == 6
    ckpt = torch.load(run / "last.pt", weights_only=True)  # only plain types: readable without unpickling code
    assert ckpt["format"] == "cvt.train" and ckpt["epoch"] == 6 and ckpt["step"] == 0
    model = cvt.load_model(run / "best.pt")  # the checkpoint layer reads the training format
    assert model.class_names == ckpt["class_names"] and len(model.class_names) == 4
    assert model.data_config.input_size == (32, 32)
    with pytest.raises(ValueError, match="already holds a run"):
        train(cfg)


def _digest(state):
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _optimizer_tensors(opt_state):
    return {f"{i}.{k}": v for i, s in opt_state["state"].items() for k, v in s.items()}


def test_interrupted_run_resumes_bit_identical(shapes, tmp_path):
    # the full recipe: RandAugment, random erasing, Mixup/CutMix, drop path, label smoothing; 4 steps per epoch
    kw = {"epochs": 2, "deterministic": True, "model_kwargs": {**TINY, "drop_path_rate": [0.0, 0.1, 0.2]}}
    full = train(tiny_config(shapes, tmp_path / "full", **kw))
    stopped = train(tiny_config(shapes, tmp_path / "split", max_steps=6, **kw))  # stops in the middle of epoch 1
    assert not stopped["completed"] and stopped["global_step"] == 6
    mid = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert (mid["epoch"], mid["step"], mid["global_step"]) == (1, 2, 6)
    # resume in a fresh state, with a data-loader worker this time: augmentation does not depend on workers
    torch.manual_seed(1234)
    resumed = train(tiny_config(shapes, tmp_path / "split", resume="auto", num_workers=1, **kw))
    assert resumed["completed"] and resumed["global_step"] == full["global_step"] == 8
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    oa, ob = _optimizer_tensors(a["optimizer"]), _optimizer_tensors(b["optimizer"])
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
    assert _digest(a["model"]) == _digest(b["model"])
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    for ra, rb in zip(a["history"], b["history"], strict=True):
        for key in ("train_loss", "val_loss", "val_top1", "lr"):
            assert ra[key] == rb[key], key


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(shapes, tmp_path):
    kw = {"epochs": 3, "warmup_epochs": 0, "auto_augment": None, "mixup_alpha": 0.0, "cutmix_alpha": 0.0}
    train(tiny_config(shapes, tmp_path / "run", max_steps=4, **kw))  # one good epoch
    last = tmp_path / "run" / "last.pt"
    before = last.read_bytes()
    # an absurd learning rate: the weights blow up and the loss turns NaN/inf within a few steps
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* at epoch 1, step \d+ .*last good checkpoint"):
        train(tiny_config(shapes, tmp_path / "run", resume="auto", lr=1e30, **kw))
    assert last.read_bytes() == before


def write_config(path, cfg: TrainConfig, command: str, result: str, extra: str = ""):
    """A config file as cvt/configs/ holds them: docstring with the command and the result, then `get_config()`."""
    path.write_text(
        f'"""A tiny run.\n\n    {command}\n\nResult: {result}\n"""\n'
        "from cvt.train import TrainConfig\n\n\n"
        f"{extra}def get_config():\n    return TrainConfig(**{cfg.to_dict()!r})\n"
    )
    return path


def test_cli_train_then_resume_without_config(shapes, tmp_path, capsys):
    from cvt.cli import main

    config = write_config(tmp_path / "tiny.py", tiny_config("x", "y", epochs=2), "cvt train --config tiny.py",
                          "none to speak of (0-100%).")  # fmt: skip
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--data", str(shapes), "--output", str(out), "--set", "max_steps=3"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["completed"] is False
    assert main(["train", "--resume", str(out)]) == 0  # the run's own config, without its max_steps
    summary = json.loads(capsys.readouterr().out)
    assert summary["completed"] and summary["global_step"] == 8 and summary["run_dir"] == str(out)


def test_demo_command_end_to_end(tmp_path, capsys):
    from cvt.cli import main

    sizes = {"num_classes": 3, "train_per_class": 8, "val_per_class": 2, "image_size": 32}
    dataset = f"def get_dataset():\n    return {sizes!r}\n\n\n"
    config = write_config(tmp_path / "demo_tiny.py", tiny_config("x", "y", epochs=1, num_threads=1),
                          "cvt demo --config demo_tiny.py", "far below the 90% top-1 target.", dataset)  # fmt: skip
    out, data = tmp_path / "run", tmp_path / "data"
    code = main(["demo", "--config", str(config), "--data", str(data), "--output", str(out)])
    text = capsys.readouterr().out
    assert code == 1 and "target >= 90% top-1: NOT reached" in text  # one epoch on 24 images: an honest failure
    assert (data / "train").is_dir() and (data / "val").is_dir()
    for name in ("curves.png", "confusion.png", "eval.json", "best.pt", "metrics.csv", "summary.json"):
        assert (out / name).is_file() and str(out / name) in text, name
    assert text.count(": ") >= 4  # four predicted images with their guesses


RUN_FROM_PYTHON = """
import sys
from cvt.train import TrainConfig, train
train(TrainConfig(**{cfg}))
"""


def test_train_from_python_states_its_plan_and_reports_each_epoch(shapes, tmp_path):
    # before: train(cfg) said nothing unless the caller configured logging; the CLI said only "4 step(s) per epoch"
    import subprocess
    import sys

    cfg = {**tiny_config(shapes, tmp_path / "run", epochs=2, batch_size=4).to_dict(), "num_threads": 1}
    proc = subprocess.run([sys.executable, "-c", RUN_FROM_PYTHON.replace("{cfg}", repr(cfg))], capture_output=True,
                          text=True, timeout=300, check=True)  # fmt: skip
    err = proc.stderr
    # 32 images at batch 4: 8 steps an epoch, 16 in all; 32 images an epoch at 32x32
    assert "at 32x32: 2 epoch(s) x 8 step(s) = 16 step(s) (16 to go), 32 image(s) per epoch" in err, err
    assert "estimated time:" in err and "per epoch" in err and "for the 2 epoch(s) left" in err, err
    assert "epoch 1/2" in err and "epoch 2/2" in err, err  # one line per epoch, counted from 1
