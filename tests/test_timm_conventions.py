"""timm's conventions, each as timm documents it, on tiny CvTs, with the expected values written out by hand:
parameter groups, list_models, pretrained_cfg, forward_intermediates / prune_intermediate_layers, FeatureInfo,
create_model's global_pool and checkpoint_path, resolve_data_config / create_transform."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

import cvt
from cvt.checkpoint import CheckpointError
from cvt.timm_interface import MATCH_PREV_GROUP, layer_ids

TINY = {"dims": (16, 32, 48), "depths": (1, 2, 3), "heads": (1, 1, 2), "num_classes": 10}


def test_group_matcher_numbers_layers_as_timm():
    model = cvt.create_model("cvt_13", **TINY)
    names = [n for n, _ in model.named_parameters()]
    fine = layer_ids(names, model.group_matcher(coarse=False))
    assert {fine[n] for n in names if n.startswith("stages.0.patch_embed.")} == {0}  # the stem
    assert {fine[n] for n in names if n.startswith("stages.0.blocks.0.")} == {1}
    assert {fine[n] for n in names if n.startswith(("stages.1.patch_embed.", "stages.1.blocks.0."))} == {2}
    assert {fine[n] for n in names if n.startswith("stages.1.blocks.1.")} == {3}
    assert (
        fine["stages.2.cls_token"]
        == fine["stages.2.patch_embed.proj.weight"]
        == fine["stages.2.blocks.0.norm1.weight"]
        == 4
    )
    assert fine["stages.2.blocks.1.mlp.fc1.weight"] == 5
    assert fine["stages.2.blocks.2.attn.proj.bias"] == fine["norm.weight"] == fine["norm.bias"] == 6
    assert fine["head.weight"] == fine["head.bias"] == 7
    coarse = layer_ids(names, model.group_matcher(coarse=True))
    assert coarse["stages.0.patch_embed.proj.weight"] == 0 and coarse["stages.0.blocks.0.norm1.weight"] == 1
    assert coarse["stages.1.patch_embed.proj.weight"] == coarse["stages.1.blocks.1.mlp.fc2.bias"] == 2
    assert coarse["stages.2.cls_token"] == coarse["stages.2.blocks.2.norm2.weight"] == 3
    assert coarse["norm.weight"] == coarse["head.weight"] == 4  # unmatched: the last group, as in timm
    assert set(fine) == set(coarse) == set(names)


def test_layer_ids_follow_timms_matcher_rules():
    # timm's group_with_matcher: first matching rule wins, captured numbers sort numerically (10 after 9),
    # MATCH_PREV_GROUP joins the group before, unmatched names come last, a None entry is skipped
    names = ["embed.w", "blocks.10.w", "blocks.9.w", "blocks.2.w", "final_norm.w", "fc.w"]
    matcher = {
        "stem": r"^embed",
        "skip": None,
        "blocks": [(r"^blocks\.(\d+)", None), (r"^final_norm", (MATCH_PREV_GROUP,))],
    }
    assert layer_ids(names, matcher) == {"embed.w": 0, "blocks.2.w": 1, "blocks.9.w": 2, "blocks.10.w": 3,
                                         "final_norm.w": 3, "fc.w": 4}  # fmt: skip


# --- list_models ------------------------------------------------------------------------------------------------


def test_list_models_filters_as_timm():
    assert cvt.list_models() == ["cvt_13", "cvt_21", "cvt_w24"]
    assert cvt.list_models("cvt_2*") == ["cvt_21"]  # the first argument is the filter, as in timm
    assert cvt.list_models(["cvt_13", "cvt_w*"]) == ["cvt_13", "cvt_w24"]
    assert cvt.list_models("cvt_*", exclude_filters=["*13", "*21"]) == ["cvt_w24"]
    tagged = [
        "cvt_13.in1k_384",
        "cvt_13.in22k_ft_384",
        "cvt_21.in1k_384",
        "cvt_21.in22k_ft_384",
        "cvt_w24.in22k_ft_384",
    ]
    assert cvt.list_models("*384*", pretrained=True) == tagged
    assert cvt.list_models("cvt_13.*", pretrained=True) == ["cvt_13.in1k", "cvt_13.in1k_384", "cvt_13.in22k_ft_384"]
    assert cvt.list_models("resnet*") == []
    assert cvt.list_models(True) == cvt.list_models(pretrained=True)  # the former signature still works
    assert len(cvt.list_models(pretrained=True)) == 7


# --- pretrained_cfg ---------------------------------------------------------------------------------------------


def test_pretrained_cfg_is_timms_dict():
    with torch.device("meta"):  # the registered architectures, without computing their weights
        model = cvt.create_model("cvt_13")
        big = cvt.create_model("cvt_21.in22k_ft_384").pretrained_cfg
        features = cvt.create_model("cvt_13", features_only=True)
    cfg = model.pretrained_cfg
    assert isinstance(cfg, dict) and model.default_cfg == cfg
    assert (cfg["architecture"], cfg["tag"]) == ("cvt_13", "in1k")
    assert (cfg["hf_hub_id"], cfg["file"], cfg["license"]) == ("microsoft/cvt-13", "CvT-13-224x224-IN-1k.pth", "mit")
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert cfg["num_classes"] == 1000
    # timm's first_conv / classifier name the modules (timm adapts in_chans and swaps heads through them)
    conv, head = model.get_submodule(cfg["first_conv"]), model.get_submodule(cfg["classifier"])
    assert isinstance(conv, torch.nn.Conv2d) and conv.in_channels == 3 and head.out_features == 1000
    assert big["input_size"] == (3, 384, 384) and big["crop_pct"] == 1.0 and big["crop_mode"] == "squash"
    assert big["hf_hub_id"] == "microsoft/cvt-21-384-22k" and big["tag"] == "in22k_ft_384"
    assert features.pretrained_cfg["hf_hub_id"] == "microsoft/cvt-13" and features.pretrained_cfg["num_classes"] == 0
    # a narrowed model has none of the released weights: no hub id, file or licence of theirs
    custom = cvt.create_model("cvt_13", **TINY).pretrained_cfg
    assert (custom["architecture"], custom["tag"], custom["hf_hub_id"], custom["file"]) == ("cvt_13-custom", None,
                                                                                          None, None)  # fmt: skip
    assert custom["input_size"] == (3, 224, 224) and custom["num_classes"] == 10


# --- forward_intermediates and prune_intermediate_layers ---------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return cvt.create_model("cvt_13", **TINY).eval()


X = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
GRIDS = [(16, 24), (8, 12), (4, 6)]  # strides 4, 8, 16


@torch.no_grad()
@pytest.mark.parametrize(
    ("indices", "taken"), [(None, [0, 1, 2]), (2, [1, 2]), (1, [2]), ((0, -1), [0, 2]), ([1], [1])]
)
def test_forward_intermediates_indices(model, indices, taken):
    maps = model.forward_intermediates(X, indices=indices, intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [(2, TINY["dims"][i], *GRIDS[i]) for i in taken]


@pytest.mark.parametrize("indices", [0, 4, (3,), (-4,), ()])
def test_forward_intermediates_bad_indices(model, indices):
    with pytest.raises(ValueError, match="indices"):
        model.forward_intermediates(X, indices=indices)


@torch.no_grad()
def test_forward_intermediates_options(model):
    final, maps = model.forward_intermediates(X)
    tokens = model.forward_features(X)  # (B, 1 + HW, C): the class token first, normalised
    assert torch.equal(final, tokens)
    torch.testing.assert_close(model.forward_head(final), model(X))
    # norm: the final LayerNorm on the last stage's output, which is then the spatial part of forward_features
    _, normed = model.forward_intermediates(X, norm=True)
    expected = tokens[:, 1:].unflatten(1, GRIDS[2]).permute(0, 3, 1, 2)
    assert torch.equal(normed[-1], expected) and not torch.allclose(maps[-1], expected)
    assert all(torch.equal(a, b) for a, b in zip(normed[:-1], maps[:-1], strict=True))
    # NLC: the spatial tokens (no class token) of the same maps
    nlc = model.forward_intermediates(X, output_fmt="NLC", intermediates_only=True)
    assert all(torch.equal(t, m.flatten(2).transpose(1, 2)) for t, m in zip(nlc, maps, strict=True))
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(X, output_fmt="NHWC")
    # output_dict, as timm's ViT: image_intermediates, and image_features unless intermediates_only
    out = model.forward_intermediates(X, output_dict=True)
    assert set(out) == {"image_intermediates", "image_features"} and torch.equal(out["image_features"], final)
    assert set(model.forward_intermediates(X, output_dict=True, intermediates_only=True)) == {"image_intermediates"}


@torch.no_grad()
def test_stop_early_runs_no_later_stage(model):
    calls = []
    hook = model.stages[1].register_forward_hook(lambda *_: calls.append(1))
    try:
        final, maps = model.forward_intermediates(X, indices=(0,), stop_early=True)
        assert not calls and len(maps) == 1
        assert final.shape == (2, 16 * 24, 16)  # the tokens of the last stage run, stage 0
        model.forward_intermediates(X, indices=(0,))
        assert calls  # without stop_early every stage runs
    finally:
        hook.remove()


@torch.no_grad()
def test_prune_intermediate_layers(model):
    pruned = copy.deepcopy(model)
    assert pruned.prune_intermediate_layers((0, 1)) == [0, 1]
    assert len(pruned.stages) == 2 and isinstance(pruned.head, torch.nn.Identity) and pruned.num_classes == 0
    assert isinstance(pruned.norm, cvt.model.LayerNorm)  # kept unless prune_norm, as timm
    want = model.forward_intermediates(X, indices=(0, 1), intermediates_only=True)
    got = pruned.forward_intermediates(X, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert not any(k.startswith(("stages.2.", "head.")) for k in pruned.state_dict())
    other = copy.deepcopy(model)
    other.prune_intermediate_layers(1, prune_norm=True, prune_head=False)
    assert len(other.stages) == 3 and isinstance(other.norm, torch.nn.Identity) and other.num_classes == 10


# --- features_only: FeatureInfo ----------------------------------------------------------------------------------


def test_features_only_feature_info_is_timms():
    features = cvt.create_model("cvt_13", features_only=True, out_indices=(0, 2), **TINY)
    info = features.feature_info
    assert info.channels() == [16, 48] and info.reduction() == [4, 16]
    assert info.module_name() == ["stages.0", "stages.2"]
    assert info.channels(1) == 32 and info.reduction([0, 1]) == [4, 8]  # an index or a list: any stage
    assert info.get_dicts(keys=["num_chs", "reduction"]) == [{"num_chs": 16, "reduction": 4},
                                                              {"num_chs": 48, "reduction": 16}]  # fmt: skip
    assert info.get_dicts(idx=1) == {"num_chs": 32, "reduction": 8, "module": "stages.1", "index": 1}
    assert len(info) == 3 and info[2]["module"] == "stages.2" and info.out_indices == (0, 2)
    assert features.channels() == [16, 48]
    maps = features(X)
    assert [m.shape[1] for m in maps] == info.channels()
    assert [X.shape[-1] // m.shape[-1] for m in maps] == info.reduction()


# --- create_model(global_pool=, checkpoint_path=) ----------------------------------------------------------------


@torch.no_grad()
def test_global_pool(tmp_path):
    torch.manual_seed(0)
    avg = cvt.create_model("cvt_13", global_pool="avg", **TINY).eval()
    tokens = avg.forward_features(X)
    by_hand = avg.head(tokens[:, 1:].mean(dim=1))  # timm's "avg": the mean of the spatial tokens
    torch.testing.assert_close(avg(X), by_hand)
    assert not torch.allclose(avg(X), avg.head(tokens[:, 0]))
    assert avg.unused_in_forward() == []  # every row reaches the head now
    cvt.save_model(avg, tmp_path / "avg")
    assert cvt.load_model(tmp_path / "avg").cfg.global_pool == "avg"
    with pytest.raises(CheckpointError, match="global_pool"):
        cvt.save_model(avg, tmp_path / "hf", format="hf")  # transformers' head reads the class token
    with pytest.raises(ValueError, match="class token"):
        cvt.create_model("cvt_13", global_pool="token", cls_token=False, **TINY)
    with pytest.raises(ValueError, match="global_pool"):
        cvt.create_model("cvt_13", global_pool="max", **TINY)
    token = cvt.create_model("cvt_13", **TINY).eval()
    token.reset_classifier(5, global_pool="avg")
    assert token.cfg.global_pool == "avg" and token(X).shape == (2, 5)


def test_checkpoint_path_loads_into_the_created_model(model, tmp_path):
    cvt.save_model(model, tmp_path / "ckpt")
    loaded = cvt.create_model("cvt_13", checkpoint_path=tmp_path / "ckpt", **TINY)
    state = model.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in loaded.state_dict().items())


# --- cvt.data.resolve_data_config and create_transform -----------------------------------------------------------


def test_resolve_data_config_and_create_transform():
    model = cvt.create_model("cvt_21.in22k_ft_384", depths=(1, 1, 1))
    config = cvt.data.resolve_data_config(model=model)
    assert config == {"input_size": (3, 384, 384), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
                      "std": (0.229, 0.224, 0.225), "crop_pct": 1.0, "crop_mode": "squash"}  # fmt: skip
    # timm's precedence: args, then the given pretrained_cfg, then the model's, then the defaults
    assert cvt.data.resolve_data_config({"img_size": 256, "crop_pct": 0.9}, model=model)["input_size"] == (3, 256, 256)
    assert cvt.data.resolve_data_config({"input_size": (3, 200, 100)}, model=model)["input_size"] == (3, 200, 100)
    assert cvt.data.resolve_data_config({}, pretrained_cfg={"crop_pct": 0.95})["crop_pct"] == 0.95
    assert cvt.data.resolve_data_config()["input_size"] == (3, 224, 224)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8))
    ours = cvt.data.create_eval_transform(model.data_config)(image)
    theirs = cvt.data.create_transform(**config)(image)
    assert theirs.shape == (3, 384, 384) and torch.equal(theirs, ours)
    # timm's default centre crop: resize the shorter side to floor(224 / 0.875) = 256, crop 224
    center = cvt.data.create_transform(224, interpolation="bicubic")(image)
    assert torch.equal(center, cvt.data.create_eval_transform(cvt.DataConfig(224))(image))
    assert cvt.data.create_transform((3, 64, 48), is_training=True)(image).shape == (3, 64, 48)
    with pytest.raises(ValueError, match="border"):
        cvt.data.create_transform(224, crop_mode="border")


# --- timm's head_hidden_size, global_pool="", set_input_size, pretrained_cfg_overlay, resolve_model_data_config ---


@torch.no_grad()
def test_no_pooling_applies_the_head_to_every_token():
    torch.manual_seed(0)
    pooled = cvt.create_model("cvt_13", **TINY).eval()
    assert pooled.head_hidden_size == pooled.num_features == 48  # no pre-logits layer: the last stage's width
    every = cvt.create_model("cvt_13", global_pool="", **TINY).eval()
    every.load_state_dict(pooled.state_dict())
    out = every(X)
    grid = (X.shape[2] // 16) * (X.shape[3] // 16)  # strides 4, 2, 2
    assert out.shape == (X.shape[0], 1 + grid, 10)  # timm's global_pool="": (B, tokens, classes)
    torch.testing.assert_close(out[:, 0], pooled(X))  # the class token's row is the pooled model's logits
    assert every.forward_head(every.forward_features(X), pre_logits=True).shape == (X.shape[0], 1 + grid, 48)


def test_set_input_size_and_resolve_model_data_config():
    model = cvt.create_model("cvt_13", **TINY)
    model.set_input_size(96)
    assert model.data_config.input_size == (96, 96) and model.pretrained_cfg["input_size"] == (3, 96, 96)
    config = cvt.data.resolve_model_data_config(model)
    assert config["input_size"] == (3, 96, 96) and config["crop_pct"] == 0.875 and config["interpolation"] == "bicubic"
    model.set_input_size((96, 128))
    assert cvt.data.resolve_model_data_config(model, args={"crop_pct": 1.0})["input_size"] == (3, 96, 128)


def test_pretrained_cfg_overlay_reads_the_released_weights_from_a_file(model, tmp_path):
    cvt.save_model(model, tmp_path / "local")
    overlay = {"file": tmp_path / "local", "input_size": (3, 256, 256), "crop_pct": 1.0}
    loaded = cvt.create_model("cvt_13", pretrained=True, pretrained_cfg_overlay=overlay, **TINY)
    state = model.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in loaded.state_dict().items())
    random = cvt.create_model("cvt_13", pretrained_cfg_overlay={"input_size": (3, 256, 256), "crop_pct": 1.0}, **TINY)
    assert random.data_config.input_size == (256, 256) and random.data_config.crop_pct == 1.0
    with pytest.raises(ValueError, match=r"unknown pretrained_cfg_overlay key\(s\) \['url'\]"):
        cvt.create_model("cvt_13", pretrained_cfg_overlay={"url": "https://example.org/w.pth"}, **TINY)
