"""timm's conventions, each as timm documents it, on tiny CvTs, with the expected values written out by hand:
parameter groups for layer-wise learning rates."""

import cvt
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
