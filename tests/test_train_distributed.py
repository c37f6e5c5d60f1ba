"""Data-parallel training under torchrun on CPU (gloo): 2 processes x batch 4 == 1 process x batch 8.

The model has no BatchNorm ("avg" projection: BatchNorm statistics are per process in DDP, as in the authors'
runs), no drop path and no Mixup (their randomness is per process); augmentation is seeded per image, so both runs
see the same pixels. FSDP2 (`fsdp=True`) must give the same result.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cvt.data import make_dataset
from cvt.train import TrainConfig, train

SETTINGS = dict(
    model_kwargs={"dims": [16, 32, 48], "depths": [1, 1, 1], "heads": [1, 1, 2], "qkv_method": "avg",
                  "drop_path_rate": 0.0},
    input_size=32, num_workers=0, epochs=2, warmup_epochs=1, lr=2e-3, amp="none", mixup_alpha=0.0,
    cutmix_alpha=0.0, progress=False, deterministic=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "shapes", num_classes=4, train_per_class=8, val_per_class=3,
                        image_size=32)  # fmt: skip


@pytest.fixture(scope="module")
def reference(shapes, tmp_path_factory):
    """One process, batch 8: 4 steps per epoch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("ref") / "run"
        summary = train(TrainConfig(data=str(shapes), batch_size=8, output=str(out), **SETTINGS))
    finally:
        torch.set_num_threads(threads)
    return summary, torch.load(out / "last.pt", weights_only=True)


def torchrun(tmp_path, shapes, *overrides):
    config = tmp_path / "tiny.py"
    config.write_text(
        textwrap.dedent(f"""
        \"\"\"Tiny data-parallel test run.

            torchrun --nproc-per-node 2 -m cvt train --config tiny.py

        Result: 2 processes x batch 4 match 1 process x batch 8 (top-1 %: whatever the tiny model reaches).
        \"\"\"
        from cvt.train import TrainConfig

        def get_config():
            return TrainConfig(batch_size=4, **{SETTINGS!r})
    """)
    )
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "cvt",
           "train", "--config", str(config), "--data", str(shapes), "--output", str(out), *overrides]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out / "last.pt", weights_only=True)


def assert_same_training(ckpt, reference):
    summary, ref = reference
    assert ckpt["world_size"] == 2 and ref["world_size"] == 1
    assert ckpt["global_step"] == ref["global_step"] == 8
    for key, value in ref["model"].items():
        torch.testing.assert_close(ckpt["model"][key], value, rtol=1e-4, atol=2e-5, msg=key)
    for a, b in zip(ckpt["history"], ref["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
        assert a["val_top1"] == b["val_top1"]  # every validation image counted once (12 images, 2 ranks)
    assert len(ckpt["rng"]) == 2  # one RNG state per rank


def test_ddp_two_processes_match_one(tmp_path, shapes, reference):
    assert_same_training(torchrun(tmp_path, shapes), reference)


@pytest.mark.slow
def test_fsdp_two_processes_match_one(tmp_path, shapes, reference):
    assert_same_training(torchrun(tmp_path, shapes, "--set", "fsdp=True"), reference)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_released_layout_with_its_unused_q_projection(tmp_path, shapes, mode):
    # dw_bn projections and a class token: `CvT.forward` leaves the last block's q convolution out of the graph,
    # which DDP must be told about (it would otherwise wait forever for their gradients) and FSDP must tolerate
    kwargs = {**SETTINGS["model_kwargs"], "qkv_method": "dw_bn"}
    overrides = ["--set", f"model_kwargs={kwargs!r}", "--set", "epochs=1"]
    ckpt = torchrun(tmp_path, shapes, *overrides, *(["--set", "fsdp=True"] if mode == "fsdp" else []))
    assert ckpt["global_step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    q_conv = "stages.2.blocks.0.attn.conv_proj_q.conv.weight"
    trained = "stages.2.blocks.0.attn.conv_proj_k.conv.weight"
    torch.manual_seed(0)  # the run's seed: the model it started from
    from cvt import create_model  # noqa: PLC0415

    start = create_model("cvt_13", num_classes=4, **kwargs).state_dict()
    assert torch.equal(ckpt["model"][q_conv], start[q_conv])  # no gradient, no decay: untouched
    assert not torch.equal(ckpt["model"][trained], start[trained])
