"""Inference rewrites (`cvt.optimize`) against the plain model's eval path."""

import pytest
import torch
from torch import nn

import cvt
from cvt.optimize import fold_batchnorm


def randomise_batchnorm(model):
    """Non-trivial running statistics and affine parameters, so that folding has something to get wrong."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1, 0.2)
                module.bias.normal_(0, 0.2)
    return model.eval()


def tiny_model(**overrides):
    overrides.setdefault("depths", (1, 1, 2))
    return randomise_batchnorm(cvt.create_model("cvt_13", num_classes=11, **overrides))


@pytest.mark.parametrize("size", [(64, 64), (72, 40)])
def test_fold_batchnorm_same_outputs(size):
    model = tiny_model()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is left alone
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
