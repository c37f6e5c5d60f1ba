"""Inference rewrites (`cvt.optimize`, the "torch" backend) against the plain eval path and transformers' CvT."""

import copy

import pytest
import torch
import transformers
from torch import nn

import cvt
from cvt.checkpoint import cvt_to_hf
from cvt.model import QuickGELU
from cvt.optimize import fold_batchnorm, rewrite_for_inference

CLS_CONFIGS = {"cls_last": (False, False, True), "no_cls": (False, False, False), "cls_all": (True, True, True)}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def randomise_batchnorm(model):
    """Non-trivial running statistics and affine parameters, so that folding has something to get wrong."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1, 0.2)
                module.bias.normal_(0, 0.2)
            elif isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.1)  # the k and v biases are rewritten: they must not be zero here
    return model.eval()


def tiny_model(**overrides):
    # narrow but with every structural feature: several heads, stride-2 k/v grids, a class token
    overrides = {"dims": (16, 32, 48), "heads": (1, 2, 3), "depths": (1, 1, 2), **overrides}
    overrides.setdefault("num_classes", 11)
    return randomise_batchnorm(cvt.create_model("cvt_13", **overrides))


def assert_close_relative(actual, expected, rel):
    """Every element within `rel` of the largest magnitude in `expected`."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("size", [(64, 64), (72, 40)])
def test_fold_batchnorm_same_outputs(size):
    model = tiny_model()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is left alone
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["dw_bn", "avg", "linear"])
@pytest.mark.parametrize("cls", list(CLS_CONFIGS))
@pytest.mark.parametrize(("batch", "size"), [(2, (64, 64)), (1, (72, 40)), (3, (52, 84))])
def test_optimized_fp32_equals_plain_model(method, cls, batch, size):
    model = tiny_model(qkv_method=method, cls_token=CLS_CONFIGS[cls])
    x = torch.randn(batch, 3, *size)
    with torch.no_grad():
        expected = model(x)
        # a small chunk size makes the MLP run over several row chunks, as it does at full size
        for chunk_elements in (0, 3000):
            fast = rewrite_for_inference(model, chunk_elements=chunk_elements)
            out = fast(x)
            assert out.shape == expected.shape == (batch, 11) and out.dtype == torch.float32
            assert_close_relative(out, expected, 1e-5)
            assert_close_relative(fast.forward_features(x), model.forward_features(x), 1e-5)


def test_optimize_leaves_the_model_alone_and_needs_no_grad():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = rewrite_for_inference(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in fast.parameters())
    with pytest.raises(ValueError, match="dtype"):
        rewrite_for_inference(model, dtype=torch.float16)


def test_optimized_model_traces():
    model = tiny_model()
    fast = rewrite_for_inference(model, chunk_elements=3000)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        traced = torch.jit.trace(fast, x)
        assert_close_relative(traced(x), model(x), 1e-5)


@pytest.mark.filterwarnings("ignore:this CPU has no native bfloat16")
@pytest.mark.parametrize("method", ["dw_bn", "avg", "linear"])
def test_optimized_bfloat16_close_to_fp32(method):
    model = tiny_model(qkv_method=method)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        out = rewrite_for_inference(model, dtype=torch.bfloat16)(x)
    assert out.dtype == torch.float32
    # bfloat16 keeps 8 bits of mantissa (relative step 2**-8 = 0.4%); errors add up over the blocks
    assert_close_relative(out, expected, 3e-2)


@pytest.mark.filterwarnings("ignore:this CPU has no native bfloat16")
def test_optimized_bfloat16_top1_agrees_on_peaked_logits():
    # Random weights give near-uniform logits, where any rounding flips the top-1; a trained model's are peaked.
    # Make them so: the head maps each image's fp32 features to its own class, as a trained classifier would.
    model = tiny_model(num_classes=64)
    x = torch.randn(64, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        feats = feats - feats.mean(0)
        model.head.weight.copy_(feats / feats.norm(dim=1, keepdim=True) * 4)
        model.head.bias.zero_()
        expected = model(x)
        out = rewrite_for_inference(model, dtype=torch.bfloat16)(x)
    agree = (out.argmax(1) == expected.argmax(1)).float().mean().item()
    assert agree >= 0.99


# ---- against transformers' CvtForImageClassification (GELU, the same weights) ----


@pytest.mark.parametrize(("batch", "size"), [(2, (72, 56)), (1, (64, 64))])
def test_optimized_gelu_model_matches_transformers(batch, size):
    # transformers runs only the released layout: "dw_bn" projections (its "avg" and "linear" paths crash) and a
    # class token in the last stage only (it sizes every class token by the last width and fails without one)
    # depths (1, 2, 3): transformers indexes stage i's drop-path schedule at i, so it needs depth[i] > i
    model = tiny_model(act="gelu", depths=(1, 2, 3))
    cfg = model.cfg
    hf_cfg = transformers.CvtConfig(
        embed_dim=list(cfg.dims), num_heads=list(cfg.heads), depth=list(cfg.depths), num_labels=cfg.num_classes
    )
    hf = transformers.CvtForImageClassification(hf_cfg).eval()
    hf.load_state_dict(cvt_to_hf(model.state_dict()), strict=True)
    x = torch.randn(batch, 3, *size)
    with torch.no_grad():
        expected = hf(x).logits
        assert_close_relative(model(x), expected, 1e-5)
        assert_close_relative(rewrite_for_inference(model)(x), expected, 1e-5)


# ---- the training path's rewrites in model.py ----


def test_quick_gelu_values_and_gradient_match_the_formula():
    x = torch.randn(4096, dtype=torch.float64) * 4
    x_ref = x.clone().requires_grad_()
    expected = x_ref * torch.sigmoid(1.702 * x_ref)
    grad_out = torch.randn_like(x)
    (expected_grad,) = torch.autograd.grad(expected, x_ref, grad_out)
    x_new = x.clone().requires_grad_()
    out = QuickGELU()(x_new)
    (grad,) = torch.autograd.grad(out, x_new, grad_out)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the inference path computes the very same numbers in place
        xf = torch.randn(1000) * 4
        assert torch.equal(QuickGELU()(xf), xf * torch.sigmoid(1.702 * xf))


def test_training_step_matches_the_reference_formulas():
    # the whole model's gradients with the rewritten QuickGELU and channels-last embedding against a model whose
    # activation is the plain formula under autograd
    class PlainQuickGELU(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(1.702 * x)

    model = tiny_model(drop_path_rate=0.0).train()
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if hasattr(module, "act") and isinstance(module.act, QuickGELU):
            module.act = PlainQuickGELU()
    x = torch.randn(2, 3, 64, 48)
    for m in (model, reference):
        m(x).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_optimized_model_exports_to_onnx(tmp_path):
    import onnxruntime  # noqa: PLC0415 - the export extra

    model = tiny_model()
    fast = rewrite_for_inference(model, chunk_elements=3000)
    x = torch.randn(2, 3, 64, 80)
    program = torch.onnx.export(fast, (x,), dynamo=True, dynamic_shapes=({0: "batch"},))
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    y = torch.randn(3, 3, 64, 80)
    with torch.no_grad():
        expected = model(y)
    (out,) = session.run(None, {session.get_inputs()[0].name: y.numpy()})
    assert_close_relative(torch.from_numpy(out), expected, 1e-5)


@pytest.mark.slow  # compiling takes a minute or more on 2 cores
def test_compiled_cpu_model_with_frozen_weights_equals_the_plain_model():
    from torch._inductor import config

    model = tiny_model()
    fast = rewrite_for_inference(model, compile=True)  # inductor's freezing on the CPU
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        assert_close_relative(fast(x), model(x), 1e-4)
    assert config.freezing is False  # set for this model only
