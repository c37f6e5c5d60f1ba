"""Contract tests over every registered model, and the numerics of each building block against the spec."""

import math

import pytest
import torch
import torch.nn.functional as F

import cvt
from cvt.model import Attention, LayerNorm, QuickGELU

# Shrunk depths keep every variant's widths and heads but make the contract tests fast.
TINY_DEPTHS = {"cvt_13": (1, 1, 2), "cvt_21": (1, 1, 2), "cvt_w24": (1, 1, 1)}


def tiny(name, **overrides):
    overrides.setdefault("depths", TINY_DEPTHS[name])
    return cvt.create_model(name, num_classes=7, **overrides)


@pytest.fixture(params=cvt.list_models())
def name(request):
    return request.param


def test_forward_backward_every_parameter_gets_a_gradient(name):
    model = tiny(name).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)
    out.square().mean().backward()
    # Only the class token's query of the last block reaches the head, and it skips the convolution, so that
    # block's q conv/BN are not used by `forward` (no gradient); every other parameter gets a non-zero one.
    last = f"stages.2.blocks.{len(model.stages[2].blocks) - 1}.attn.conv_proj_q."
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == [last + s for s in ("conv.weight", "bn.weight", "bn.bias")]
    assert model.unused_in_forward() == unused  # what DDP is told
    assert [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.abs().sum() > 0] == []
    # ... and the whole network's forward, which computes every row, gives exactly zero to those three
    model.zero_grad(set_to_none=True)
    model.forward_head(model.forward_features(torch.randn(2, 3, 64, 64))).square().mean().backward()
    zero = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert zero == unused


def test_batch_of_one_keeps_batch_dim(name):
    # the authors' head squeezes every dim of size 1 and returns (classes,) here
    model = tiny(name).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (80, 48)])
def test_non_square_and_intermediates(name, size):
    model = tiny(name).eval()
    x = torch.randn(2, 3, *size)
    final, maps = model.forward_intermediates(x)
    assert [m.shape for m in maps] == [
        (2, info["num_chs"], math.ceil(size[0] / info["reduction"]), math.ceil(size[1] / info["reduction"]))
        for info in model.feature_info
    ]
    assert [info["reduction"] for info in model.feature_info] == [4, 8, 16]
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(final), model(x))
        only = model.forward_intermediates(x, indices=1, intermediates_only=True)
    assert len(only) == 1 and torch.equal(only[0], maps[-1])


def test_reset_classifier(name):
    model = tiny(name)
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, cvt.model_config(name).dims[-1])


def test_gradient_checkpointing_same_output_and_grads(name):
    model = tiny(name, drop_path_rate=0.5).train()  # drop path on: the RNG must be replayed in recomputation
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    ref = model(x)
    ref.sum().backward()
    ref_grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing()
    torch.manual_seed(1)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for n, p in model.named_parameters():
        if ref_grads[n] is None:  # unused by `forward` (see the test above): unused with checkpointing too
            assert p.grad is None, n
        else:
            torch.testing.assert_close(p.grad, ref_grads[n], msg=n)


def test_no_weight_decay_names_exist(name):
    model = tiny(name, pos_embed=True)
    params = dict(model.named_parameters())
    names = model.no_weight_decay()
    assert "stages.2.cls_token" in names and "stages.0.pos_embed" in names
    assert names <= set(params)


@pytest.mark.parametrize("method", ["dw_bn", "avg", "linear"])
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_projection_methods_and_activations(method, act):
    model = cvt.create_model("cvt_13", depths=(1, 1, 1), qkv_method=method, act=act, num_classes=5)
    out = model(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.sum().backward()


def test_ablation_fields_build_and_run():
    model = cvt.create_model(
        "cvt_13",
        depths=(1, 1, 1),
        cls_token=(False, False, False),
        pos_embed=True,
        num_classes=4,
        embed_kernel=(4, 2, 2),
        embed_stride=(4, 2, 2),
        embed_padding=0,
    )
    assert model.stages[0].pos_embed.shape == (1, 56 * 56, 64)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 4)
    assert model(torch.randn(1, 3, 96, 128)).shape == (1, 4)  # position embeddings resampled


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="known models: cvt_13, cvt_21, cvt_w24"):
        cvt.create_model("cvt_99")
    with pytest.raises(ValueError, match="unknown CvTConfig field.*'dimz'.*valid fields"):
        cvt.create_model("cvt_13", dimz=(1, 2, 3))
    with pytest.raises(ValueError, match="known tags"):
        cvt.create_model("cvt_13.in5k")
    with pytest.raises(ValueError, match="qkv_method"):
        cvt.create_model("cvt_13", qkv_method="conv")


def test_registered_data_configs():
    assert cvt.create_model("cvt_13", depths=(1, 1, 1)).data_config.input_size == (224, 224)
    data = cvt.create_model("cvt_21.in22k_ft_384", depths=(1, 1, 1)).data_config
    assert data.input_size == (384, 384) and data.crop_mode == "squash" and data.interpolation == "bicubic"
    assert cvt.create_model("cvt_w24", depths=(1, 1, 1)).data_config.input_size == (384, 384)  # its only weights'
    with torch.device("meta"):
        assert cvt.create_model("cvt_w24").pretrained_entry.hf_hub_id == "microsoft/cvt-w24-384-22k"


# ---- building blocks against the spec, written out by hand ----


def test_quick_gelu_formula():
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(QuickGELU()(x), x / (1 + torch.exp(-1.702 * x)))


def test_layernorm_in_float32_cast_back():
    norm = LayerNorm(8, eps=1e-5)
    x = (torch.randn(4, 8) * 3 + 1).bfloat16()
    xf = x.float()
    expected = (xf - xf.mean(-1, keepdim=True)) / torch.sqrt(xf.var(-1, unbiased=False, keepdim=True) + 1e-5)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.bfloat16())


def test_drop_path_schedule_restarts_per_stage():
    model = cvt.create_model("cvt_13")
    rates = [[b.drop_path.rate for b in stage.blocks] for stage in model.stages]
    assert rates[0] == [0.0] and rates[1] == [0.0, 0.0]
    assert rates[2] == pytest.approx([0.1 * j / 9 for j in range(10)])
    w24 = cvt.model_config("cvt_w24")
    assert w24.drop_path_rate == (0.0, 0.0, 0.3)


def test_initialisation():
    model = cvt.create_model("cvt_13")
    fc1 = model.stages[2].blocks[0].mlp.fc1
    # trunc_normal_(std=0.02) truncates at +-2 absolute (100 std), so it is a plain N(0, 0.02) in practice
    assert fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert fc1.bias.abs().max() == 0
    bn = model.stages[1].blocks[0].attn.conv_proj_k.bn
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert model.stages[2].cls_token.std().item() == pytest.approx(0.02, rel=0.2)
    assert model.head.bias.abs().max() > 0  # the head bias keeps PyTorch's default init


def reference_attention(attn, x, hw, num_cls):
    """The spec's convolutional-projection attention, written out directly (eval-mode BatchNorm)."""
    batch, _, dim = x.shape
    heads = attn.num_heads
    cls, tokens = x[:, :num_cls], x[:, num_cls:]
    fmap = tokens.transpose(1, 2).reshape(batch, dim, *hw)

    def dw_bn(proj, stride):
        y = F.conv2d(fmap, proj.conv.weight, None, stride, 1, 1, dim)
        bn = proj.bn
        y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        y = y * bn.weight[:, None, None] + bn.bias[:, None, None]
        return torch.cat([cls, y.flatten(2).transpose(1, 2)], dim=1)

    q = dw_bn(attn.conv_proj_q, 1) @ attn.proj_q.weight.T + attn.proj_q.bias
    k = dw_bn(attn.conv_proj_k, 2) @ attn.proj_k.weight.T + attn.proj_k.bias
    v = dw_bn(attn.conv_proj_v, 2) @ attn.proj_v.weight.T + attn.proj_v.bias
    split = lambda t: t.reshape(batch, t.shape[1], heads, dim // heads).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) * dim**-0.5, dim=-1)  # scale on the full width
    out = (weights @ v).permute(0, 2, 1, 3).reshape(batch, -1, dim)
    return out @ attn.proj.weight.T + attn.proj.bias, weights


@pytest.mark.parametrize("hw", [(7, 7), (6, 9)])
def test_attention_against_direct_computation(hw):
    dim, heads = 48, 3
    attn = Attention(dim, heads, num_prefix_tokens=1).eval()
    with torch.no_grad():
        for proj in (attn.conv_proj_q, attn.conv_proj_k, attn.conv_proj_v):
            proj.bn.running_mean.normal_()
            proj.bn.running_var.uniform_(0.5, 2)
            proj.bn.weight.normal_()
            proj.bn.bias.normal_()
    x = torch.randn(2, 1 + hw[0] * hw[1], dim)
    expected, weights = reference_attention(attn, x, hw, 1)
    assert weights.shape == (2, heads, 1 + hw[0] * hw[1], 1 + math.ceil(hw[0] / 2) * math.ceil(hw[1] / 2))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, hw), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(attn.attention_weights(x, hw), weights, rtol=1e-5, atol=1e-6)


def test_avg_projection_pools_kv_only():
    attn = Attention(16, 2, method="avg").eval()
    hw = (5, 5)
    x = torch.randn(1, 25, 16)
    fmap = x.transpose(1, 2).reshape(1, 16, 5, 5)
    pooled = F.avg_pool2d(fmap, 3, 2, 1, ceil_mode=True).flatten(2).transpose(1, 2)
    q = x @ attn.proj_q.weight.T + attn.proj_q.bias
    k = pooled @ attn.proj_k.weight.T + attn.proj_k.bias
    v = pooled @ attn.proj_v.weight.T + attn.proj_v.bias
    split = lambda t: t.reshape(1, -1, 2, 8).permute(0, 2, 1, 3)  # noqa: E731
    w = torch.softmax(split(q) @ split(k).transpose(-1, -2) * 16**-0.5, -1)
    out = (w @ split(v)).permute(0, 2, 1, 3).reshape(1, 25, 16) @ attn.proj.weight.T + attn.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(attn(x, hw), out)


@pytest.mark.parametrize("method", ["dw_bn", "avg", "linear"])
def test_forward_computes_the_class_token_row_alone(method):
    # `forward` skips the last block's other rows; the whole network's class token must be the same
    model = cvt.create_model("cvt_13", dims=(16, 32, 48), heads=(1, 2, 3), depths=(1, 1, 2), qkv_method=method,
                             num_classes=7).eval()  # fmt: skip
    x = torch.randn(3, 3, 64, 80)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (3, 1 + 4 * 5, 48)
        assert model.forward_features(x, class_token_only=True).shape == (3, 1, 48)
        torch.testing.assert_close(model(x), model.head(tokens[:, 0]), rtol=1e-5, atol=1e-6)
