"""A Hugging Face folder we write is complete: transformers' `AutoImageProcessor` and `pipeline` run it and prepare
images as our evaluation transform does, `DataConfig` survives the round trip, and an export transformers cannot run
is refused. transformers is the reference throughout."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, CvtConfig, CvtForImageClassification, pipeline

import cvt
from cvt.checkpoint import CheckpointError
from cvt.cli import main
from cvt.config import DataConfig
from cvt.data import create_eval_transform

TINY = {"dims": [16, 32, 48], "depths": [1, 2, 3], "heads": [1, 2, 3]}  # depth[i] > i: what transformers runs
CLASSES = [f"class {i}" for i in range(10)]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Image.Image:
    """A real photograph (scikit-learn's china.jpg, 640x427: not square), stored losslessly."""
    from sklearn.datasets import load_sample_images

    path = tmp_path_factory.mktemp("img") / "china.png"
    Image.fromarray(load_sample_images().images[0]).save(path)
    return path


def tiny_model(data: DataConfig, act: str = "gelu", seed: int = 0) -> cvt.CvT:
    """A tiny model with spread-out weights, so that its probabilities are far from uniform."""
    torch.manual_seed(seed)
    model = cvt.create_model("cvt_13", num_classes=len(CLASSES), act=act, **TINY)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif tensor.is_floating_point():
                tensor.normal_(0.0, 0.3)
        model.head.weight.mul_(10)
    model.class_names, model.data_config, model.model_name = list(CLASSES), data, "tiny-test"
    return model.eval()


DATA_CONFIGS = {
    "demo: 64 squash": DataConfig(input_size=64, crop_mode="squash", crop_pct=1.0),
    "64 center 0.875": DataConfig(input_size=64, crop_mode="center", crop_pct=0.875),
    "56 center bilinear": DataConfig(56, "center", 0.9, "bilinear", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
    "384 squash": DataConfig(input_size=384, crop_mode="squash", crop_pct=1.0),
    "384 center": DataConfig(input_size=384, crop_mode="center", crop_pct=0.9),
    "48x64 center": DataConfig(input_size=(48, 64), crop_mode="center", crop_pct=0.875),
}


@pytest.mark.parametrize("data", DATA_CONFIGS.values(), ids=DATA_CONFIGS.keys())
def test_image_processor_prepares_images_as_our_eval_transform(data, photo, tmp_path):
    cvt.save_model(tiny_model(data), tmp_path / "hf", format="hf")
    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    image = Image.open(photo).convert("RGB")
    theirs = processor(image, return_tensors="pt")["pixel_values"][0]
    ours = create_eval_transform(data)(image)
    assert theirs.shape == ours.shape == (3, *data.input_size)
    assert (theirs - ours).abs().max() < 1e-5
    assert cvt.load_model(tmp_path / "hf").data_config == data  # recovered exactly, crop mode included


def test_released_checkpoints_image_processor_is_read(tmp_path):
    # preprocessor_config.json as microsoft/cvt-13 and cvt-13-384 have it (the old feature-extractor spelling)
    hf = CvtForImageClassification(CvtConfig(embed_dim=TINY["dims"], depth=TINY["depths"], num_heads=TINY["heads"]))
    hf.save_pretrained(tmp_path / "hf")
    released = {"crop_pct": 0.875, "do_normalize": True, "do_resize": True, "resample": 3, "size": 224,
                "feature_extractor_type": "ConvNextFeatureExtractor", "image_mean": [0.485, 0.456, 0.406],
                "image_std": [0.229, 0.224, 0.225]}  # fmt: skip
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(released))
    assert cvt.load_model(tmp_path / "hf").data_config == DataConfig(224, crop_mode="center", crop_pct=0.875)
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps({**released, "size": 384}))
    assert cvt.load_model(tmp_path / "hf").data_config == DataConfig(384, crop_mode="squash", crop_pct=1.0)


def test_writes_what_transformers_checkpoints_use(tmp_path):
    cvt.save_model(tiny_model(DATA_CONFIGS["64 center 0.875"]), tmp_path / "hf", format="hf")
    pre = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "ConvNextImageProcessor"
    assert (pre["size"], pre["crop_pct"], pre["resample"]) == ({"shortest_edge": 64}, 0.875, 3)  # 3: PIL bicubic
    assert (pre["image_mean"], pre["image_std"]) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["id2label"]["3"] == "class 3" and config["label2id"]["class 3"] == 3


def test_pipeline_agrees_with_cvt_predict(photo, tmp_path, capsys):
    data = DATA_CONFIGS["64 center 0.875"]
    for act in ("gelu", "quick_gelu"):
        model = tiny_model(data, act=act, seed=1)
        cvt.save_model(model, tmp_path / act / "hf", format="hf")
        cvt.save_model(model, tmp_path / act / "own")
        theirs = pipeline("image-classification", model=str(tmp_path / act / "hf"))(str(photo), top_k=5)
        assert main(["predict", "--model", str(tmp_path / act / "own"), str(photo), "--topk", "5", "--json"]) == 0
        ours = json.loads(capsys.readouterr().out)[0]["predictions"]
        assert [p["label"] for p in theirs] == [p["label"] for p in ours], act
        assert len({p["label"] for p in ours}) == 5 and ours[0]["probability"] > 0.2  # not a uniform tie
        if act == "gelu":  # transformers computes GELU: the same numbers
            scores = np.array([p["score"] for p in theirs]) - np.array([p["probability"] for p in ours])
            assert np.abs(scores).max() < 1e-4


def test_export_transformers_cannot_run_is_refused(tmp_path, capsys):
    # the reference: transformers itself fails on a stage i with i or fewer blocks (the demo's depths 1/1/2)
    with pytest.raises(IndexError):
        CvtForImageClassification(CvtConfig(embed_dim=[16, 32, 48], depth=[1, 1, 2], num_heads=[1, 2, 2]))
    demo = cvt.create_model("cvt_13", num_classes=10, dims=[32, 64, 128], depths=[1, 1, 2], heads=[1, 2, 2])
    with pytest.raises(CheckpointError, match=r"depths=\(1, 1, 2\).*stage\(s\) \[1, 2\].*IndexError.*format='cvt'"):
        cvt.save_model(demo, tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists()
    cvt.save_model(demo, tmp_path / "own")
    assert main(["convert", str(tmp_path / "own"), str(tmp_path / "hf"), "--to", "hf"]) == 1
    assert "IndexError" in capsys.readouterr().err and not (tmp_path / "hf").exists()


@torch.no_grad()
def test_our_export_loads_back_with_its_activation(tmp_path):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    for act in ("gelu", "quick_gelu"):
        model = tiny_model(DATA_CONFIGS["64 center 0.875"], act=act)
        cvt.save_model(model, tmp_path / act, format="hf")
        back = cvt.load_model(tmp_path / act)
        assert back.cfg.act == act and back.model_name == "tiny-test"
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
    # a folder transformers wrote records none: the authors' QuickGELU, as before
    CvtForImageClassification(
        CvtConfig(embed_dim=TINY["dims"], depth=TINY["depths"], num_heads=TINY["heads"])
    ).save_pretrained(tmp_path / "theirs")
    assert cvt.load_model(tmp_path / "theirs").cfg.act == "quick_gelu"


# ---- the centre-crop drift: real photographs whose margins after resizing are odd or even ----------------------

# scikit-learn's photos are 640x427; cropped to width W, our 224 protocol resizes to int(256 W / 427) x 256 and cuts
# margins of int(256 W / 427) - 224 and 32 pixels; the 384 "center" one (crop_pct 0.875) resizes to 438 rows
DRIFT_DATA = {
    "224 center": DataConfig(224, crop_mode="center", crop_pct=0.875),  # the released 224 protocol
    "384 squash": DataConfig(384, crop_mode="squash", crop_pct=1.0),  # the released 384 protocol: no crop
    "384 center": DataConfig(384, crop_mode="center", crop_pct=0.875),
}
DRIFT_PHOTOS = {  # (photo, width kept): 224 margin / 384-center margin along the width
    "china": (0, 640),  # 159 (3 mod 4) / 272
    "flower": (1, 640),  # 159 (3 mod 4) / 272
    "china-627": (0, 627),  # 151 (3 mod 4) / 259 (3 mod 4)
    "flower-630": (1, 630),  # 153 (odd, 1 mod 4) / 262
    "china-624": (0, 624),  # 150 / 256
}


@pytest.fixture(scope="module")
def drift_photos(tmp_path_factory) -> dict[str, str]:
    from sklearn.datasets import load_sample_images

    folder, photos = tmp_path_factory.mktemp("photos"), load_sample_images().images
    paths = {}
    for name, (index, width) in DRIFT_PHOTOS.items():
        paths[name] = str(folder / f"{name}.png")
        Image.fromarray(photos[index][:, :width]).save(paths[name])
    return paths


def crop_margins(data: DataConfig, size: tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) cut by the centre crop of `data`, by hand: the shorter side resized to int(side / crop_pct)."""
    if data.crop_mode == "squash":
        return 0, 0
    width, height = size
    short = int(data.input_size[0] / data.crop_pct)
    resized = (short, int(short * width / height)) if height < width else (int(short * height / width), short)
    return resized[0] - data.input_size[0], resized[1] - data.input_size[1]


def floor_crop(image: Image.Image, data: DataConfig) -> torch.Tensor:
    """Our transform with the crop offsets rounded down, by hand: what transformers 5.x computes."""
    width, height = image.size
    rows, cols = crop_margins(data, image.size)
    resized = image.resize((data.input_size[1] + cols, data.input_size[0] + rows), Image.Resampling.BICUBIC)
    box = (cols // 2, rows // 2, cols // 2 + data.input_size[1], rows // 2 + data.input_size[0])
    pixels = torch.from_numpy(np.asarray(resized.crop(box), dtype=np.float32) / 255).permute(2, 0, 1)
    return (pixels - torch.tensor(data.mean).view(3, 1, 1)) / torch.tensor(data.std).view(3, 1, 1)


@pytest.mark.parametrize("key", DRIFT_DATA)
def test_processor_on_real_photos_with_odd_and_even_margins(key, drift_photos, tmp_path, caplog, capsys):
    data = DRIFT_DATA[key]
    with caplog.at_level("WARNING", logger="cvt.checkpoint.save"):
        cvt.save_model(tiny_model(data, seed=2), tmp_path / "hf", format="hf")
        cvt.save_model(tiny_model(data, seed=2), tmp_path / "own")
    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    classify = pipeline("image-classification", model=str(tmp_path / "hf"))
    assert main(["predict", "--model", str(tmp_path / "own"), *drift_photos.values(), "--json", "--no-optimize"]) == 0
    predicted = {Path(p["path"]).stem: p["predictions"] for p in json.loads(capsys.readouterr().out)}
    exact_everywhere = True
    for name, path in drift_photos.items():
        image = Image.open(path).convert("RGB")
        theirs = processor(image, return_tensors="pt")["pixel_values"][0]
        ours = create_eval_transform(data)(image)
        margins = crop_margins(data, image.size)
        if all(m % 4 != 3 for m in margins):  # round half to even and floor agree
            assert (theirs - ours).abs().max() < 1e-5, (name, margins)
            ranked = [p["label"] for p in classify(path, top_k=5)]
            assert ranked == [p["label"] for p in predicted[name]], (name, margins)  # the same ranking
        else:
            exact_everywhere = False
            assert (theirs - ours).abs().max() > 0.1, (name, margins)  # the crop sits elsewhere
            assert (theirs - floor_crop(image, data)).abs().max() < 1e-5, (name, margins)  # one pixel up or left
    warned = [r.getMessage() for r in caplog.records if "probe images" in r.getMessage()]
    assert bool(warned) == (not exact_everywhere) == (key != "384 squash")
    assert not warned or ("floor((W - w) / 2)" in warned[0] and "top-1" in warned[0])
