"""`train_one_epoch` / `evaluate` on in-memory data: learning, accumulation, EMA, non-finite loss, hand counts."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cvt import create_model
from cvt.engine import (
    EpochPlan,
    Learner,
    ModelEma,
    NonFiniteLossError,
    StepSettings,
    evaluate,
    per_class_accuracy,
    train_one_epoch,
)


def tiny(**kw):
    kw = {"dims": (16, 32, 48), "depths": (1, 1, 1), "heads": (1, 1, 2), "num_classes": 3, **kw}
    return create_model("cvt_13", **kw)


def colour_data(n=48, size=32, seed=0):
    """Three classes told apart by which colour channel is bright, plus noise."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % 3
    images = 0.3 * torch.randn(n, 3, size, size, generator=g)
    images[torch.arange(n), targets] += 1.0
    return TensorDataset(images, targets)


def test_a_few_steps_reduce_the_loss():
    data = colour_data()
    model = tiny()
    loader = DataLoader(data, batch_size=8, shuffle=False)
    before = evaluate(model, loader, num_classes=3)["loss"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for epoch in range(3):
        res = train_one_epoch(
            Learner(model, opt, nn.CrossEntropyLoss()), loader, EpochPlan(epoch=epoch, steps_per_epoch=len(loader))
        )
        assert res.finished and res.step == 6 and res.global_step == 0 + 6
    after = evaluate(model, loader, num_classes=3)
    assert after["loss"] < 0.7 * before, (before, after["loss"])
    assert after["count"] == 48


def test_accumulation_equals_the_big_batch():
    # no BatchNorm ("avg" projection) and no drop path, so 2 x 4 accumulated == one batch of 8
    data = colour_data(n=16)
    results = []
    for batch, accum in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        model = tiny(qkv_method="avg", drop_path_rate=0.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = DataLoader(data, batch_size=batch, shuffle=False)
        res = train_one_epoch(
            Learner(model, opt, nn.CrossEntropyLoss()), loader, EpochPlan(epoch=0, steps_per_epoch=2),
            StepSettings(accum_steps=accum),
        )  # fmt: skip
        assert res.step == 2 and res.meter.samples == 16
        results.append((model.state_dict(), res.meter.loss))
    (sd_a, loss_a), (sd_b, loss_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for key in sd_a:
        torch.testing.assert_close(sd_a[key], sd_b[key], rtol=1e-4, atol=1e-6)


def test_max_steps_and_start_step():
    data = colour_data(n=32)
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(data, batch_size=4)
    learner = Learner(model, opt, nn.CrossEntropyLoss())
    res = train_one_epoch(learner, loader, EpochPlan(epoch=0, steps_per_epoch=8, global_step=10, max_steps=13))
    assert (res.step, res.global_step, res.finished) == (3, 13, False)
    # resuming at step 3: the loader is positioned by the caller, 5 steps remain
    rest = DataLoader(torch.utils.data.Subset(data, range(12, 32)), batch_size=4)
    res = train_one_epoch(
        learner, rest, EpochPlan(epoch=0, steps_per_epoch=8, start_step=3, global_step=13, meter=res.meter)
    )
    assert (res.step, res.global_step, res.finished, res.meter.steps) == (8, 18, True, 8)


def test_non_finite_loss_raises_with_step_and_value():
    data = colour_data(n=16)
    data.tensors[0][9] = float("nan")  # second batch of 8
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at epoch 2, step 1 .*global step 6") as info:
        train_one_epoch(
            Learner(model, opt, nn.CrossEntropyLoss()), DataLoader(data, batch_size=8),
            EpochPlan(epoch=2, steps_per_epoch=2, global_step=5),
        )  # fmt: skip
    assert info.value.step == 1 and info.value.global_step == 6


def test_ema_update_by_hand():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    ema = ModelEma(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.bias.fill_(1.0)
    ema.update(model)
    assert ema.module.weight.tolist() == [[pytest.approx(1.2)] * 2]  # 0.9 * 1 + 0.1 * 3
    assert ema.module.bias.item() == pytest.approx(0.1)
    ema.update(model)
    assert ema.module.bias.item() == pytest.approx(0.19)  # 0.9 * 0.1 + 0.1 * 1


class Logits(nn.Module):
    """The 'image' is the logit vector itself."""

    def forward(self, x):
        return x


def test_evaluate_matches_a_hand_count():
    logits = torch.tensor(
        [
            # class:  0    1    2    3    4    5
            [9.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # y=0: top-1 right
            [1.0, 9.0, 0.0, 0.0, 0.0, 0.0],  # y=0: predicted 1; 0 is 2nd -> top-5 right
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # y=0: 0 is 6th -> top-5 wrong, predicted 5
            [0.0, 0.0, 9.0, 0.0, 0.0, 0.0],  # y=2: right
            [0.0, 0.0, 0.0, 0.0, 9.0, 0.0],  # y=3: predicted 4, top-5 right (ties at 0 are taken in index order)
        ]
    )
    targets = torch.tensor([0, 0, 0, 2, 3])
    loader = DataLoader(TensorDataset(logits, targets), batch_size=2)
    res = evaluate(Logits(), loader, num_classes=6)
    assert res["count"] == 5
    assert res["top1"] == pytest.approx(100 * 2 / 5)
    assert res["top5"] == pytest.approx(100 * 4 / 5)
    expected_loss = nn.functional.cross_entropy(logits, targets).item()
    assert res["loss"] == pytest.approx(expected_loss, rel=1e-6)
    confusion = torch.zeros(6, 6, dtype=torch.int64)
    for true, pred in ((0, 0), (0, 1), (0, 5), (2, 2), (3, 4)):
        confusion[true, pred] += 1
    assert torch.equal(res["confusion"], confusion)
    assert per_class_accuracy(res["confusion"]) == [pytest.approx(100 / 3), None, 100.0, 0.0, None, None]


def test_evaluate_ignores_padding():
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    targets = torch.tensor([0, 0, 0])
    valid = torch.tensor([True, True, False])
    res = evaluate(Logits(), DataLoader(TensorDataset(logits, targets, valid), batch_size=3), num_classes=2)
    assert res["count"] == 2 and res["top1"] == 50.0 and res["top5"] == 100.0
