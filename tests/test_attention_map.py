import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cvt
from cvt.attention_map import attention_overlay, class_token_attention, key_grid, plot_attention, top_predictions
from cvt.checkpoint import save_model
from cvt.cli import main


def _with_running_stats(model):
    """Give every BatchNorm non-trivial running statistics, as a trained model has."""
    generator = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
    return model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return _with_running_stats(cvt.create_model("cvt_13", depths=(1, 1, 2), num_classes=5)).eval()


def _bn(x, bn):
    return (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps) * bn.weight[
        :, None, None
    ] + bn.bias[:, None, None]


def _reference_class_attention(model, images):
    """The last block's class-token attention, computed from the parameters with plain tensor operations."""
    (fmap,) = model.forward_intermediates(images, indices=(1,), intermediates_only=True)
    stage = model.stages[2]
    emb = stage.patch_embed
    x = F.conv2d(fmap, emb.proj.weight, emb.proj.bias, stride=2, padding=1)  # (B, C, H, W)
    b, c, h, w = x.shape
    x = F.layer_norm(x.flatten(2).transpose(1, 2), (c,), emb.norm.weight, emb.norm.bias, 1e-5)
    x = torch.cat((stage.cls_token.expand(b, -1, -1), x), dim=1)
    x = stage.blocks[0](x, (h, w))  # every block but the last (here one)
    blk = stage.blocks[1]
    y = F.layer_norm(x, (c,), blk.norm1.weight, blk.norm1.bias, 1e-5)
    cls, grid = y[:, :1], y[:, 1:].transpose(1, 2).reshape(b, c, h, w)
    a = blk.attn
    q = _bn(F.conv2d(grid, a.conv_proj_q.conv.weight, stride=1, padding=1, groups=c), a.conv_proj_q.bn)
    k = _bn(F.conv2d(grid, a.conv_proj_k.conv.weight, stride=2, padding=1, groups=c), a.conv_proj_k.bn)
    q = torch.cat((cls, q.flatten(2).transpose(1, 2)), 1) @ a.proj_q.weight.T + a.proj_q.bias
    k = torch.cat((cls, k.flatten(2).transpose(1, 2)), 1) @ a.proj_k.weight.T + a.proj_k.bias
    heads = a.num_heads
    q0 = q[:, 0].reshape(b, heads, c // heads)  # the class-token query per head
    k = k.reshape(b, k.shape[1], heads, c // heads)
    scores = torch.einsum("bhd,bnhd->bhn", q0, k) * c**-0.5  # official scale: full width, not head_dim
    return scores.softmax(dim=-1), (h, w)


@pytest.mark.parametrize(("size", "keys"), [((224, 224), (7, 7)), ((100, 140), (4, 5)), ((96, 128), (3, 4))])
def test_maps_match_direct_softmax_and_sum_to_one(model, size, keys):
    images = torch.randn(2, 3, *size)
    result = class_token_attention(model, images)
    with torch.no_grad():
        want, grid = _reference_class_attention(model, images)
        logits = model(images)
    assert result.maps.shape == (2, 6, *keys) and result.key_grid == keys
    assert result.token_grid == grid and keys == ((grid[0] + 1) // 2, (grid[1] + 1) // 2)  # ceil(H/2) x ceil(W/2)
    total = result.maps.sum(dim=(-2, -1)) + result.to_class_token
    torch.testing.assert_close(total, torch.ones(2, 6), rtol=0, atol=1e-5)
    torch.testing.assert_close(result.to_class_token, want[..., 0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.maps.flatten(2), want[..., 1:], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.logits, logits)
    assert result.mean.shape == (2, *keys)


@pytest.mark.parametrize(("method", "size", "keys"), [("avg", (100, 140), (4, 5)), ("linear", (96, 128), (6, 8))])
def test_key_grid_of_other_projections(method, size, keys):
    torch.manual_seed(0)
    model = cvt.create_model("cvt_13", depths=(1, 1, 1), qkv_method=method, num_classes=5).eval()
    result = class_token_attention(model, torch.randn(1, 3, *size))
    assert result.key_grid == keys
    torch.testing.assert_close(result.maps.sum(dim=(-2, -1)) + result.to_class_token, torch.ones(1, 6))
    assert key_grid(model.stages[2].blocks[0].attn, result.token_grid) == keys


def test_restores_training_mode_and_needs_a_class_token(model):
    model.train()
    class_token_attention(model, torch.randn(1, 3, 64, 64))
    assert model.training
    model.eval()
    torch.manual_seed(0)
    no_cls = cvt.create_model("cvt_13", depths=(1, 1, 1), cls_token=False, num_classes=5)
    with pytest.raises(ValueError, match="no class token"):
        class_token_attention(no_cls, torch.randn(1, 3, 64, 64))


def test_top_predictions():
    logits = torch.tensor([0.0, 2.0, 1.0])
    probs = logits.softmax(0)
    assert top_predictions(logits, ["a", "b", "c"], k=2) == [
        ("b", pytest.approx(probs[1].item())),
        ("c", pytest.approx(probs[2].item())),
    ]
    assert [label for label, _ in top_predictions(logits, k=5)] == ["1", "2", "0"]


def test_plot_attention_writes_png(tmp_path):
    path = plot_attention(torch.rand(3, 64, 80), torch.rand(3, 4, 5), tmp_path / "a.png", title="x")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 300


def test_cli_writes_overlay(model, tmp_path, capsys):
    names = ["circle", "square", "star", "cross", "ring"]
    save_model(model, tmp_path / "tiny", class_names=names)
    image = Image.new("RGB", (300, 240), (20, 40, 200))
    image.paste((250, 200, 10), (100, 60, 200, 160))
    image.save(tmp_path / "input.jpg")
    out = tmp_path / "attention.png"
    assert (
        main(["attention", "--model", str(tmp_path / "tiny"), str(tmp_path / "input.jpg"), "--output", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert any(name in printed for name in names)
    assert "6 heads over 7x7 keys" in printed
    with Image.open(out) as im:
        assert im.format == "PNG"


def test_attention_overlay_blends_the_upsampled_map_over_the_image():
    image = torch.full((3, 8, 8), 0.5)
    attention = torch.tensor([[0.0, 0.0], [0.0, 1.0]])  # all weight on the bottom-right key
    overlay = attention_overlay(image, attention, alpha=0.5)
    assert overlay.shape == (8, 8, 3) and overlay.dtype == torch.uint8
    # the corners hold the map's extremes: inferno's darkest (0, 0, 4) and brightest (252, 255, 164), half each
    expected_low = torch.tensor([0.5 * 127.5 + 0.5 * c for c in (0.0015 * 255, 0.0005 * 255, 0.0139 * 255)])
    expected_high = torch.tensor([0.5 * 127.5 + 0.5 * c for c in (0.9884 * 255, 0.9984 * 255, 0.6449 * 255)])
    torch.testing.assert_close(overlay[0, 0].float(), expected_low, atol=1.0, rtol=0)
    torch.testing.assert_close(overlay[-1, -1].float(), expected_high, atol=1.0, rtol=0)
