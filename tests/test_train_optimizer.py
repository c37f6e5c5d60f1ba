"""The paper's recipe by hand-computed values: learning-rate scaling, warm-up + cosine schedule, weight-decay groups."""

import pytest
import torch

from cvt import create_model
from cvt.train.optimizer import WarmupCosineSchedule, cosine_lr, create_optimizer, param_groups, scaled_lr

COS_3_DEG = 0.9986295347545738  # cos(pi / 60): epoch 5 of 300


def tiny_model():
    return create_model("cvt_13", dims=(16, 32, 48), depths=(1, 1, 1), heads=(1, 1, 2), num_classes=10)


def test_scaled_lr_matches_paper():
    assert scaled_lr(2.5e-4, 2048) == pytest.approx(2e-3)  # "2e-3 at batch 2048 for CvT-13"
    assert scaled_lr(2.5e-4, 256) == pytest.approx(2.5e-4)
    assert scaled_lr(2.5e-4, 64) == pytest.approx(6.25e-5)


@pytest.mark.parametrize(
    "t, expected",
    [
        (0, 1e-6),  # warm-up starts at warmup_lr
        (1, 1e-6 + (2e-3 - 1e-6) / 5),  # 4.008e-4
        (2.5, 1e-6 + 2.5 * (2e-3 - 1e-6) / 5),  # fractional epoch (step mode)
        (5, 1e-5 + 0.5 * (2e-3 - 1e-5) * (1 + COS_3_DEG)),  # cosine counted from epoch 0 (timm, no warm-up prefix)
        (150, 1e-5 + 0.5 * (2e-3 - 1e-5)),  # half way: cos = 0
        (300, 1e-5),  # the floor
        (400, 1e-5),
    ],
)
def test_cosine_lr_hand_values(t, expected):
    lr = cosine_lr(t, base_lr=2e-3, epochs=300, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5)
    assert lr == pytest.approx(expected, rel=1e-12)


def test_epoch5_value_spelled_out():
    # 1e-5 + 0.995e-3 * 1.99862953... = 1.998636387e-3
    assert cosine_lr(5, base_lr=2e-3, epochs=300) == pytest.approx(1.9986363870808e-3, rel=1e-11)


def test_schedule_per_epoch_and_per_step():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.0)
    per_epoch = WarmupCosineSchedule(
        opt, base_lr=1.0, epochs=10, steps_per_epoch=4, warmup_epochs=2, warmup_lr=0.0, min_lr=0.0, unit="epoch"
    )
    # per epoch: constant inside an epoch
    assert per_epoch.step(1, 0) == per_epoch.step(1, 3) == pytest.approx(0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    per_step = WarmupCosineSchedule(
        opt, base_lr=1.0, epochs=10, steps_per_epoch=4, warmup_epochs=2, warmup_lr=0.0, min_lr=0.0, unit="step"
    )
    assert per_step.step(1, 2) == pytest.approx(0.75)  # t = 1.5 of 2 warm-up epochs
    assert per_step.step(5, 0) == pytest.approx(0.5)  # cos(pi/2) = 0 -> half the peak
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown schedule unit"):
        WarmupCosineSchedule(opt, base_lr=1.0, epochs=10, steps_per_epoch=4, unit="iteration")


def test_weight_decay_groups():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    # decayed: 3 embedding convs + 3 blocks x (3 depth-wise convs + q/k/v/proj + fc1/fc2 linear weights) + head
    assert len(decay["names"]) == 3 + 3 * (3 + 6) + 1 == 31
    assert "stages.0.patch_embed.proj.weight" in decay["names"]
    assert "stages.1.blocks.0.attn.conv_proj_k.conv.weight" in decay["names"]  # conv weights DO get decay
    assert "stages.2.blocks.0.mlp.fc1.weight" in decay["names"] and "head.weight" in decay["names"]
    for name in (
        "stages.2.cls_token",  # class token
        "stages.0.patch_embed.proj.bias",
        "stages.0.patch_embed.norm.weight",  # LayerNorm
        "stages.0.blocks.0.attn.conv_proj_q.bn.weight",  # BatchNorm
        "stages.0.blocks.0.attn.conv_proj_q.bn.bias",
        "stages.2.blocks.0.attn.proj_v.bias",
        "norm.weight",
        "head.bias",
    ):
        assert name in no_decay["names"], name
    every = {n for n, _ in model.named_parameters()}
    assert set(decay["names"]) | set(no_decay["names"]) == every
    assert not set(decay["names"]) & set(no_decay["names"])
    # per stage: embed conv bias + embed LN (2) + block LN1/LN2 (4) + 3 BN (6) + q/k/v/proj/fc1/fc2 biases (6)
    # = 19; plus class token, final LN (2) and head bias
    assert len(no_decay["names"]) == 3 * 19 + 1 + 2 + 1


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_decays_only_the_decay_group(fused):
    # with zero gradients AdamW's update is pure decoupled decay: p <- p * (1 - lr * wd)
    model = tiny_model()
    opt = create_optimizer(model, lr=0.1, weight_decay=0.05, fused=fused)
    assert isinstance(opt, torch.optim.AdamW) and bool(opt.defaults["fused"]) == fused
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["head.weight"], before["head.weight"] * (1 - 0.1 * 0.05), rtol=0, atol=1e-7)
    conv = "stages.0.blocks.0.attn.conv_proj_v.conv.weight"
    torch.testing.assert_close(after[conv], before[conv] * 0.995, rtol=0, atol=1e-7)
    for name in ("stages.2.cls_token", "norm.weight", "stages.1.patch_embed.proj.bias"):
        assert torch.equal(after[name], before[name]), name


def test_sgd_for_fine_tuning():
    opt = create_optimizer(tiny_model(), name="sgd", lr=0.01, weight_decay=0.0, momentum=0.9)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ValueError, match="unknown optimizer"):
        create_optimizer(tiny_model(), name="lamb", lr=0.01, weight_decay=0.0)


def test_layer_decay_learning_rates_by_hand():
    # depths 1/2/3: layers (timm's grouping, cvt.timm_interface) 0 stem = stage 0's embedding; 1 stage 0 block 0;
    # 2 stage 1's embedding + block 0; 3 stage 1 block 1; 4 stage 2's embedding + class token + block 0; 5 block 1;
    # 6 block 2 + final norm; 7 the head. Layer i gets 0.5 ** (7 - i) of the rate.
    model = create_model("cvt_13", dims=(16, 32, 48), depths=(1, 2, 3), heads=(1, 1, 2), num_classes=10)
    opt = create_optimizer(model, name="sgd", lr=0.1, weight_decay=0.05, layer_decay=0.5)
    WarmupCosineSchedule(opt, base_lr=0.4, epochs=10, steps_per_epoch=1, warmup_epochs=0).step(0)
    lr = {name: g["lr"] for g in opt.param_groups for name in g["names"]}
    wd = {name: g["weight_decay"] for g in opt.param_groups for name in g["names"]}
    expected = {
        "stages.0.patch_embed.proj.weight": 0.4 / 128,
        "stages.0.patch_embed.norm.bias": 0.4 / 128,
        "stages.0.blocks.0.mlp.fc1.weight": 0.4 / 64,
        "stages.1.patch_embed.proj.weight": 0.4 / 32,
        "stages.1.blocks.0.attn.conv_proj_q.bn.weight": 0.4 / 32,
        "stages.1.blocks.1.attn.proj.weight": 0.4 / 16,
        "stages.2.cls_token": 0.4 / 8,
        "stages.2.patch_embed.norm.weight": 0.4 / 8,
        "stages.2.blocks.0.norm1.weight": 0.4 / 8,
        "stages.2.blocks.1.mlp.fc2.bias": 0.4 / 4,
        "stages.2.blocks.2.attn.proj_k.weight": 0.4 / 2,
        "norm.weight": 0.4 / 2,
        "head.weight": 0.4,
        "head.bias": 0.4,
    }
    for name, value in expected.items():
        assert lr[name] == pytest.approx(value), name
    assert set(lr) == {n for n, _ in model.named_parameters()}  # every parameter, once
    assert (
        wd["stages.2.cls_token"] == wd["head.bias"] == 0.0
        and wd["head.weight"] == wd["stages.1.patch_embed.proj.weight"] == 0.05
    )
    # 8 layers; the stem, stage 0 block 0, ... each have decayed and non-decayed parameters
    assert len(opt.param_groups) == 16
    plain = create_optimizer(model, name="sgd", lr=0.1, weight_decay=0.05)
    assert len(plain.param_groups) == 2 and "lr_scale" not in plain.param_groups[0]
