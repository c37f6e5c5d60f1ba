"""A model whose architecture is not a registered variant's never carries the tag of released weights."""

import json

import pytest
import torch
from huggingface_hub import ModelCard

import cvt
from cvt.checkpoint import save_model
from cvt.train import load_config

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

RELEASED = set(cvt.list_models(pretrained=True))  # cvt_13.in1k, ...: names of weights someone published


@pytest.fixture(scope="module")
def demo_arch():
    """The demo's overrides of CvT-13 (widths 32/64/128, depths 1/1/2), read from the shipped config."""
    return load_config("demo").model_kwargs


def test_registered_architecture_keeps_its_name_but_not_the_weights_tag():
    # drop rates change how a model trains, not what it is: still the released weights
    assert cvt.create_model("cvt_13", drop_path_rate=0.2).model_name == "cvt_13.in1k"
    # another head or activation keeps the variant's architecture, not its weights: the variant's name alone
    model = cvt.create_model("cvt_13", num_classes=10, drop_path_rate=0.2, act="gelu")
    assert model.model_name == "cvt_13"


def card_of(model, tmp_path):
    folder = save_model(model, tmp_path / "card", format="hf")
    return ModelCard.load(folder / "README.md").data.to_dict(), json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("changes", [{"num_classes": 10}, {"act": "gelu"}])
def test_a_model_departing_from_released_weights_claims_them_nowhere(changes, tmp_path):
    with torch.device("meta"):
        model = cvt.create_model("cvt_13", **changes)
    assert model.model_name == "cvt_13" and model.model_name not in RELEASED
    cfg = model.pretrained_cfg
    claimed = (cfg["tag"], cfg["hf_hub_id"], cfg["file"], cfg["license"])
    assert cfg["architecture"] == "cvt_13" and claimed == (None, None, None, None)
    model = model.to_empty(device="cpu")
    card, config = card_of(model, tmp_path)
    assert card["license"] == "unknown" and "datasets" not in card and "in1k" not in str(card)
    assert config["cvt_model_name"] == "cvt_13"


def test_an_untouched_model_claims_the_released_weights_everywhere(tmp_path):
    with torch.device("meta"):
        model = cvt.create_model("cvt_13")
    assert model.model_name == "cvt_13.in1k" and model.model_name in RELEASED
    cfg = model.pretrained_cfg
    assert (cfg["architecture"], cfg["tag"], cfg["hf_hub_id"], cfg["file"], cfg["license"]) == (
        "cvt_13", "in1k", "microsoft/cvt-13", "CvT-13-224x224-IN-1k.pth", "mit")  # the SPEC's names  # fmt: skip
    card, config = card_of(model.to_empty(device="cpu"), tmp_path)
    assert card["license"] == "mit" and card["datasets"] == ["imagenet-1k"]
    assert config["cvt_model_name"] == "cvt_13.in1k"


def test_a_1000_class_imagenet_head_keeps_imagenets_names(tmp_path):
    # before: no class names, so `cvt predict` said "21" where transformers' pipeline on its export said "LABEL_21"
    with torch.device("meta"):
        model = cvt.create_model("cvt_13", act="gelu")
    assert model.class_names[:2] == ["tench", "goldfish"] and len(model.class_names) == 1000
    _, config = card_of(model.to_empty(device="cpu"), tmp_path)
    assert config["id2label"]["21"] == "kite"  # what transformers' pipeline prints


def test_changed_architecture_is_custom_everywhere(demo_arch, tmp_path):
    model = cvt.create_model("cvt_13", num_classes=10, **demo_arch)
    assert model.model_name == "cvt_13-custom" and model.model_name not in RELEASED
    assert cvt.create_model("cvt_13", stride_kv=1).model_name == "cvt_13-custom"  # an ablation variant
    folder = save_model(model, tmp_path / "saved")
    recorded = json.loads((folder / "config.json").read_text())
    assert recorded["model_name"] == "cvt_13-custom"
    assert recorded["model_config"]["dims"] == demo_arch["dims"]  # the config says what changed
    assert cvt.load_model(folder).model_name == "cvt_13-custom"
    cvt.export_torchscript(model, tmp_path / "m.pt", input_size=64, check=False)
    extra = {"cvt.model_name.txt": ""}
    torch.jit.load(str(tmp_path / "m.pt"), _extra_files=extra)
    assert extra["cvt.model_name.txt"] in ("cvt_13-custom", b"cvt_13-custom")


def test_a_file_that_recorded_a_released_tag_for_another_architecture_is_renamed(demo_arch, tmp_path):
    model = cvt.create_model("cvt_13", num_classes=10, **demo_arch)
    model.model_name = "cvt_13.in1k"  # what the demo's checkpoints recorded before
    folder = save_model(model, tmp_path / "old")
    assert cvt.load_model(folder).model_name == "cvt_13-custom"
