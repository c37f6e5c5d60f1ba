"""`cvt eval` and `cvt predict` on a model whose outputs are known by hand.

The model's head has zero weights and biases (5, 4, 3, 2, 1, 0): whatever the image, the logits are those six
numbers, so every count below follows from the class of each image alone.
"""

import json
import math

import pytest
import torch

from cvt import create_model
from cvt.checkpoint import save_model
from cvt.cli import main
from cvt.config import CvTConfig, DataConfig
from cvt.data import create_eval_transform, load_image, make_dataset
from cvt.model import CvT
from cvt.optimize import InferenceBlock
from cvt.predict import inference_model, predict_images

BIAS = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
LSE = 5 + math.log(sum(math.exp(-k) for k in range(6)))  # log-sum-exp of BIAS


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """6 classes x 2 validation images."""
    return make_dataset(tmp_path_factory.mktemp("data") / "shapes", num_classes=6, train_per_class=1, val_per_class=2,
                        image_size=32)  # fmt: skip


def constant_model(class_names, folder):
    model = create_model("cvt_13", dims=(16, 32, 48), depths=(1, 1, 1), heads=(1, 1, 2), num_classes=6)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor(BIAS))
    model.data_config = DataConfig(input_size=(32, 32), crop_mode="center", crop_pct=0.875)
    model.class_names = list(class_names)
    return save_model(model, folder)


def test_eval_matches_a_hand_count(shapes, tmp_path, capsys):
    classes = sorted(p.name for p in (shapes / "val").iterdir())
    names = classes[::-1]  # the model's order differs from the folder order: labels must follow the model
    model_dir = constant_model(names, tmp_path / "model")
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(model_dir), "--data", str(shapes), "--json", str(tmp_path / "r.json"),
                 "--output", str(out)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["count"] == 12
    assert res["top1"] == pytest.approx(100 * 2 / 12)  # only the 2 images of the model's class 0
    assert res["top5"] == pytest.approx(100 * 10 / 12)  # all but the 2 images of the model's class 5
    assert res["loss"] == pytest.approx(LSE - sum(BIAS) / 6, rel=1e-5)  # mean over classes of LSE - bias[class]
    assert res["classes"] == names
    assert res["per_class"][names[0]] == {"count": 2, "top1": 100.0}
    assert all(res["per_class"][n]["top1"] == 0.0 for n in names[1:])
    assert res["confusion"] == [[2, 0, 0, 0, 0, 0] for _ in range(6)]
    assert "top-1   16.67" in text and "top-5   83.33" in text and f"{names[0]}" in text
    assert (out / "confusion.png").stat().st_size > 1000
    assert json.loads((out / "eval.json").read_text())["top1"] == res["top1"]


def test_eval_refuses_other_class_names(shapes, tmp_path, capsys):
    model_dir = constant_model(["a", "b", "c", "d", "e", "f"], tmp_path / "model")
    code = main(["eval", "--model", str(model_dir), "--data", str(shapes), "--output", str(tmp_path / "eval")])
    assert code == 1
    assert "class names differ from the model's" in capsys.readouterr().err


def test_predict_by_hand(shapes, tmp_path, capsys):
    names = [f"class{i}" for i in range(6)]
    model_dir = constant_model(names, tmp_path / "model")
    first = sorted((shapes / "val").rglob("*.*"))[0]
    folder = shapes / "val" / sorted(p.name for p in (shapes / "val").iterdir())[1]
    assert main(["predict", "--model", str(model_dir), str(first), str(folder), "--topk", "3", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 1 + 2 and results[0]["path"] == str(first)
    total = sum(math.exp(b) for b in BIAS)
    for r in results:
        assert [p["label"] for p in r["predictions"]] == ["class0", "class1", "class2"]
        assert [p["probability"] for p in r["predictions"]] == pytest.approx([math.exp(b) / total for b in BIAS[:3]])
    assert main(["predict", "--model", str(model_dir), str(first), "--topk", "1"]) == 0
    assert capsys.readouterr().out.strip() == f"{first}: class0 {math.exp(5) / total:.3f}"


def test_predict_with_a_model_built_from_a_config(shapes):
    # a plain CvT(cfg) declares its metadata: the default ImageNet protocol, no class names (labels are indices)
    model = CvT(CvTConfig(dims=(16, 32, 48), depths=(1, 1, 1), heads=(1, 1, 2), num_classes=6))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor(BIAS))
    image = sorted((shapes / "val").rglob("*.*"))[0]
    (result,) = predict_images(model, [image], topk=2, backend="torch")  # the labels, not the backend, matter here
    total = sum(math.exp(b) for b in BIAS)
    assert [p["label"] for p in result["predictions"]] == ["0", "1"]
    assert [p["probability"] for p in result["predictions"]] == pytest.approx([math.exp(b) / total for b in BIAS[:2]])


def test_predict_runs_the_optimized_model_with_the_plain_models_numbers(shapes):
    torch.manual_seed(0)
    model = create_model("cvt_13", dims=(16, 32, 48), depths=(1, 1, 2), heads=(1, 2, 3), num_classes=6).eval()
    for module in model.modules():  # BatchNorm statistics that folding must carry over
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model.data_config = DataConfig(input_size=(32, 32), crop_mode="center", crop_pct=0.875)
    images = sorted((shapes / "val").rglob("*.*"))
    transform = create_eval_transform(model.data_config)
    with torch.no_grad():
        expected = model(torch.stack([transform(load_image(p)) for p in images])).softmax(-1)
    assert any(isinstance(m, InferenceBlock) for m in inference_model(model, backend="torch").modules())
    # which backend "auto" takes is measured on the machine (tests/test_inference.py checks the choice with recorded
    # timings); whichever it takes gives the plain model's numbers below
    assert inference_model(model, optimize=False) is model
    for optimize, backend in ((True, "torch"), (True, "onnxruntime"), (False, "auto")):
        results = predict_images(model, images, topk=6, batch_size=5, optimize=optimize, backend=backend)
        for r, probs in zip(results, expected, strict=True):
            got = torch.zeros(6).index_put_((torch.tensor([p["index"] for p in r["predictions"]]),),
                                            torch.tensor([p["probability"] for p in r["predictions"]]))  # fmt: skip
            torch.testing.assert_close(got, probs, rtol=1e-5, atol=1e-6)
