"""Fine-tuning: `cvt train --model NAME_OR_PATH --data DIR`, its defaults sized to the dataset, and the head fitted
to the data's classes (kept, re-ordered or re-initialised, and said so in one log line)."""

import json
import logging
from pathlib import Path

import pytest
import torch

import cvt
from cvt.data import make_dataset, open_dataset
from cvt.train import finetune_config
from cvt.train.build import model_to_train
from cvt.train.finetune import default_batch_size, schedule_steps

TINY = {"dims": [16, 32, 48], "depths": [1, 1, 1], "heads": [1, 1, 2]}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """4 classes x 8 training + 3 validation images of 32x32."""
    return make_dataset(tmp_path_factory.mktemp("data") / "shapes", num_classes=4, train_per_class=8, val_per_class=3,
                        image_size=32)  # fmt: skip


@pytest.fixture(scope="module")
def classes(shapes):
    return list(open_dataset(shapes, split="train").classes)


def saved_model(path, class_names, **data):
    """A tiny model saved with `class_names` and a 32 px squash protocol (as a small pre-trained run has)."""
    model = cvt.create_model("cvt_13", num_classes=len(class_names), **TINY)
    model.class_names = list(class_names)
    model.data_config = cvt.DataConfig(input_size=32, crop_mode="squash", crop_pct=1.0, **data)
    cvt.save_model(model, path)
    return model


def test_schedule_and_batch_follow_the_stated_rules():
    # BiT-HyperRule: 500 steps under 20k images, 10k under 500k, 20k above
    assert [schedule_steps(n) for n in (100, 19_999, 20_000, 499_999, 500_000, 10**7)] == [
        500, 500, 10_000, 10_000, 20_000, 20_000]  # fmt: skip
    # 64, or the largest power of two up to a quarter of a small set, at least 2
    assert [default_batch_size(n) for n in (4, 10, 32, 100, 255, 256, 10**6)] == [2, 2, 8, 16, 32, 64, 64]


def test_finetune_config_takes_the_models_protocol_and_sizes_the_run(shapes, classes, tmp_path):
    saved_model(tmp_path / "pre", classes, interpolation="bilinear")
    cfg = finetune_config(str(tmp_path / "pre"), str(shapes))
    assert cfg.init == str(tmp_path / "pre") and cfg.data == str(shapes)
    assert (cfg.input_size, cfg.crop_mode, cfg.crop_pct, cfg.interpolation) == (32, "squash", 1.0, "bilinear")
    # a start that is not released weights (a small model's own pre-training): AdamW at 4e-3 per 256 images
    assert (cfg.optimizer, cfg.momentum, cfg.lr_per_256, cfg.weight_decay) == ("adamw", 0.9, 4e-3, 0.05)
    # 32 images at batch 8: 4 steps an epoch, 500 steps = 125 epochs, warm-up 5% of them
    assert cfg.batch_size == 8 and cfg.epochs == 125 and cfg.warmup_epochs == pytest.approx(6.25)
    assert cfg.sched_unit == "step" and cfg.auto_augment is None and cfg.mixup_alpha == 0.0 and cfg.re_prob == 0.0
    # an override wins, and what derives from it follows: batch 16 -> 2 steps an epoch -> 250 epochs
    cfg = finetune_config(str(tmp_path / "pre"), str(shapes), ["batch_size=16", "optimizer='sgd'"])
    assert cfg.batch_size == 16 and cfg.epochs == 250 and cfg.warmup_epochs == pytest.approx(12.5)
    assert (cfg.optimizer, cfg.lr_per_256, cfg.weight_decay) == ("sgd", 0.04, 0.0)
    cfg = finetune_config(str(tmp_path / "pre"), str(shapes), ["epochs=3"])
    assert cfg.epochs == 3 and cfg.warmup_epochs == pytest.approx(0.15)


def test_released_weights_keep_the_papers_fine_tuning(shapes):
    # the released ImageNet weights: the paper's SGD at 0.01 per 512 images (nothing is downloaded to decide it)
    cfg = finetune_config("cvt_13", str(shapes))
    assert (cfg.optimizer, cfg.lr_per_256, cfg.weight_decay, cfg.input_size) == ("sgd", 0.005, 0.0, 224)
    cfg = finetune_config("cvt_13", str(shapes), ["optimizer=adamw"])
    assert (cfg.optimizer, cfg.lr_per_256, cfg.weight_decay) == ("adamw", 2.5e-5, 0.05)
    # random weights are no pre-training to keep: the rate that trains a model from its start
    cfg = finetune_config("cvt_13", str(shapes), ["pretrained=false"])
    assert (cfg.optimizer, cfg.lr_per_256, cfg.pretrained) == ("adamw", 4e-3, False)


def test_other_class_names_reinitialise_the_head_and_say_so(shapes, classes, tmp_path, caplog):
    # as many classes as the data, other names: the old head must not be kept
    old = saved_model(tmp_path / "pre", ["w", "x", "y", "z"])
    cfg = finetune_config(str(tmp_path / "pre"), str(shapes))
    with caplog.at_level(logging.INFO, logger="cvt"):
        net = model_to_train(cfg, classes)
    assert not torch.equal(net.head.weight, old.head.weight)
    assert net.cfg.num_classes == 4 and net.class_names is None  # build_run then sets the data's names
    body = {k: v for k, v in old.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(net.state_dict()[k], v) for k, v in body.items())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fine-tuning")]
    assert len(lines) == 1, lines
    assert str(tmp_path / "pre") in lines[0] and "re-initialised head.weight, head.bias" in lines[0]
    assert "classes 4 (w, x, y, z) differ from the data's classes 4 (disk, frame, ring, square)" in lines[0]
    n = len(old.state_dict())
    assert f"{n - 2} of {n} tensor(s) loaded" in lines[0]


def test_same_classes_keep_or_reorder_the_head(shapes, classes, tmp_path, caplog):
    same = saved_model(tmp_path / "same", classes)
    with caplog.at_level(logging.INFO, logger="cvt"):
        net = model_to_train(finetune_config(str(tmp_path / "same"), str(shapes)), classes)
    assert torch.equal(net.head.weight, same.head.weight) and torch.equal(net.head.bias, same.head.bias)
    assert "head kept" in caplog.text
    shuffled = [classes[i] for i in (2, 0, 3, 1)]
    other = saved_model(tmp_path / "shuffled", shuffled)
    net = model_to_train(finetune_config(str(tmp_path / "shuffled"), str(shapes)), classes)
    for row, name in enumerate(classes):  # data class `name` is row shuffled.index(name) of the old head
        assert torch.equal(net.head.weight[row], other.head.weight[shuffled.index(name)])
        assert torch.equal(net.head.bias[row], other.head.bias[shuffled.index(name)])
    saved_model(tmp_path / "fewer", classes[:3])
    net = model_to_train(finetune_config(str(tmp_path / "fewer"), str(shapes)), classes)
    assert net.head.weight.shape == (4, 48) and net.cfg.num_classes == 4  # what a saved file will record


def test_cli_finetunes_a_checkpoint_in_one_command(shapes, classes, tmp_path, capsys, caplog):
    from cvt.cli import main

    saved_model(tmp_path / "pre", ["w", "x", "y", "z"])
    out = tmp_path / "run"
    args = ["train", "--model", str(tmp_path / "pre"), "--data", str(shapes), "--output", str(out),
            "--set", "epochs=1", "--set", "num_workers=0", "--set", "progress=False",
            "--set", "layer_decay=0.75"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="cvt"):
        assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["completed"] and summary["epochs_done"] == 1 and summary["global_step"] == 4
    assert "re-initialised head.weight, head.bias" in caplog.text
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["init"] == str(tmp_path / "pre") and recorded["optimizer"] == "adamw"
    assert recorded["layer_decay"] == 0.75
    groups = torch.load(out / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    # depths 1/1/1: stem, 3 blocks, head = layers 0-4; the head trains at the full rate, the stem at 0.75^4 of it
    assert sorted({g["lr_scale"] for g in groups}) == pytest.approx([0.75**4, 0.75**3, 0.75**2, 0.75, 1.0])
    model = cvt.load_model(out / "best.pt")
    assert model.class_names == classes and model.data_config.input_size == (32, 32)
    assert model.data_config.crop_mode == "squash"
    assert main(["train", "--model", str(tmp_path / "pre")]) == 2  # no data: an error, not a traceback


def test_cli_starts_a_registered_model_from_random_weights_offline(shapes, tmp_path, monkeypatch, capsys):
    # before: `cvt train --model cvt_13` always fetched the released weights (twice: once for the data config)
    from huggingface_hub import constants

    from cvt.cli import main

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "run"
    args = ["train", "--model", "cvt_13", "--data", str(shapes), "--output", str(out), "--set", "pretrained=false",
            "--set", f"model_kwargs={TINY}", "--set", "input_size=32", "--set", "max_steps=1",
            "--set", "num_workers=0", "--set", "progress=False"]  # fmt: skip
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["global_step"] == 1
    assert json.loads((out / "config.json").read_text())["pretrained"] is False
    assert cvt.load_model(out / "last.pt").model_name == "cvt_13-custom"  # the run's weights, not released ones


def test_cli_finetune_reads_the_checkpoint_and_lists_the_training_split_once(shapes, tmp_path, monkeypatch, capsys):
    # before: planning built the whole model to read its data config and listed the training split to size the
    # run, then the run read the checkpoint and listed the split again
    from cvt.checkpoint import read as checkpoint_read
    from cvt.cli import main
    from cvt.data import datasets

    saved_model(tmp_path / "pre", ["w", "x", "y", "z"])
    weight_reads, listed = [], []
    read_weights_file, folder_init = checkpoint_read.read_weights_file, datasets.FolderDataset.__init__

    def counted_read(path):
        weight_reads.append(path)
        return read_weights_file(path)

    def counted_init(self, root, **kwargs):
        listed.append(Path(root).name)
        folder_init(self, root, **kwargs)

    monkeypatch.setattr(checkpoint_read, "read_weights_file", counted_read)
    monkeypatch.setattr(datasets.FolderDataset, "__init__", counted_init)
    args = ["train", "--model", str(tmp_path / "pre"), "--data", str(shapes), "--output", str(tmp_path / "run"),
            "--set", "max_steps=1", "--set", "num_workers=0", "--set", "progress=False"]  # fmt: skip
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["global_step"] == 1
    assert len(weight_reads) == 1 and Path(weight_reads[0]).parent == tmp_path / "pre"
    assert sorted(listed) == ["train", "val"]
