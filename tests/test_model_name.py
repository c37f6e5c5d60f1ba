"""A model whose architecture is not a registered variant's never carries the tag of released weights."""

import json

import pytest
import torch

import cvt
from cvt.checkpoint import save_model
from cvt.train import load_config

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

RELEASED = set(cvt.list_models(pretrained=True))  # cvt_13.in1k, ...: names of weights someone published


@pytest.fixture(scope="module")
def demo_arch():
    """The demo's overrides of CvT-13 (widths 32/64/128, depths 1/1/2), read from the shipped config."""
    return load_config("demo").model_kwargs


def test_registered_architecture_keeps_its_name():
    # classes, drop rates and the activation do not change the architecture the weights fit
    model = cvt.create_model("cvt_13", num_classes=10, drop_path_rate=0.2, act="gelu")
    assert model.model_name == "cvt_13.in1k"


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
