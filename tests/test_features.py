
import pytest
import torch

import cvt
from cvt.features import CvTFeatures, filter_state_dict

TINY = {"depths": (1, 1, 1)}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return cvt.create_model("cvt_13", **TINY).eval()


@pytest.mark.parametrize(
    ("size", "grids"),
    [
        ((224, 224), [(56, 56), (28, 28), (14, 14)]),
        ((256, 320), [(64, 80), (32, 40), (16, 20)]),
        # by hand: (225 + 4 - 7) // 4 + 1 = 56, (231 + 4 - 7) // 4 + 1 = 58, then (n + 2 - 3) // 2 + 1
        ((225, 231), [(56, 58), (28, 29), (14, 15)]),
    ],
)
def test_maps_have_documented_shapes_and_match_forward_intermediates(model, size, grids):
    features = CvTFeatures(model, out_indices=(0, 1, 2))
    assert features.channels() == [64, 192, 384]
    assert features.reduction() == [4, 8, 16]
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        maps = features(x)
        reference = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [(2, c, h, w) for c, (h, w) in zip((64, 192, 384), grids, strict=True)]
    for got, want in zip(maps, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_create_model_features_only_drops_head_and_unused_stages():
    torch.manual_seed(0)
    features = cvt.create_model("cvt_13", features_only=True, out_indices=(0, 1), **TINY)
    assert isinstance(features, CvTFeatures)
    assert features.out_indices == (0, 1)
    assert [info["index"] for info in features.feature_info] == [0, 1]
    keys = features.state_dict().keys()
    assert not [k for k in keys if k.startswith(("norm.", "head.", "stages.2."))]
    assert "stages.1.blocks.0.attn.conv_proj_k.conv.weight" in keys
    assert features.data_config.input_size == (224, 224)
    maps = features(torch.randn(1, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(1, 64, 16, 24), (1, 192, 8, 12)]


@pytest.mark.parametrize(("indices", "expected"), [((-1,), (2,)), ((-1, 0), (0, 2)), (2, (1, 2)), ((1, 1), (1,))])
def test_out_indices_forms(model, indices, expected):
    assert CvTFeatures(model, indices).out_indices == expected


@pytest.mark.parametrize("indices", [(3,), (-4,), ()])
def test_bad_out_indices(model, indices):
    with pytest.raises(ValueError, match="out_indices"):
        CvTFeatures(model, indices)


def test_loads_a_saved_classifier_checkpoint(model, tmp_path):
    from cvt.checkpoint import save_model

    path = save_model(model, tmp_path / "tiny")
    features = cvt.create_model("cvt_13", features_only=True, pretrained=str(path), out_indices=(1, 2), **TINY)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        got = features(x)
        want = model.forward_intermediates(x, indices=(1, 2), intermediates_only=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_filter_state_dict_loads_strictly(model):
    torch.manual_seed(1)
    features = cvt.create_model("cvt_13", features_only=True, out_indices=(0,), **TINY).eval()
    features.load_state_dict(filter_state_dict(model.state_dict(), features), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            features(x)[0], model.forward_intermediates(x, indices=(0,), intermediates_only=True)[0]
        )


def test_backbone_trains():
    features = cvt.create_model("cvt_13", features_only=True, **TINY).train()
    loss = sum(m.square().mean() for m in features(torch.randn(2, 3, 64, 64)))
    loss.backward()
    grads = [p.grad for p in features.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
