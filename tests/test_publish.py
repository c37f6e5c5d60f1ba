"""The model card written with every saved model, and publishing on the Hugging Face hub: `cvt.push_to_hub` and
`cvt push` up to huggingface_hub's network call (HfApi replaced by a recorder), and the uploaded folder loads in
cvt and in transformers. huggingface_hub's own card parser is the reference for the metadata header."""

import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import CvtForImageClassification

import cvt
from cvt.checkpoint.card import model_card
from cvt.cli import main
from cvt.config import CvTConfig, DataConfig

TINY = {"dims": [16, 32, 48], "depths": [1, 2, 3], "heads": [1, 1, 2]}
RESULTS = {"dataset": "shapes", "split": "val", "top1": 87.5, "top5": 100.0, "epoch": 2}

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(act="gelu"):
    torch.manual_seed(0)
    model = cvt.create_model("cvt_13", num_classes=3, act=act, **TINY).eval()
    model.class_names, model.model_name = ["circle", "square", "star"], "tiny-shapes"
    model.data_config = DataConfig(input_size=64, crop_mode="center", crop_pct=0.875)
    return model


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """huggingface_hub.HfApi replaced by a recorder: what would be created and uploaded, the folder copied."""
    calls = {"uploaded": tmp_path / "uploaded"}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=False, exist_ok=False, **kw):
            calls["create_repo"] = {"repo_id": repo_id, "private": private, "exist_ok": exist_ok}

        def upload_folder(self, *, repo_id, folder_path, revision=None, commit_message=None, **kw):
            calls["upload"] = {"repo_id": repo_id, "revision": revision, "commit_message": commit_message}
            shutil.copytree(folder_path, calls["uploaded"])

            class Commit:
                commit_url = f"https://huggingface.co/{repo_id}/commit/0123abcd"

            return Commit()

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    return calls


def test_every_saved_folder_has_a_model_card(tmp_path):
    model = tiny_model()
    for fmt, library in (("cvt", "cvt"), ("hf", "transformers")):
        cvt.save_model(model, tmp_path / fmt, format=fmt, results=RESULTS)
        card = ModelCard.load(tmp_path / fmt / "README.md")  # the hub's parser
        data = card.data.to_dict()
        assert data["library_name"] == library and data["pipeline_tag"] == "image-classification"
        assert "image-classification" in data["tags"] and "cvt" in data["tags"]
        assert data["datasets"] == ["shapes"] and data["metrics"] == ["accuracy"]
        assert data["license"] == "unknown"  # a custom model: its licence is its owner's to state
        top1, top5 = card.data.eval_results
        assert (top1.metric_value, top1.dataset_name, top1.dataset_split) == (87.5, "shapes", "val")
        assert top5.metric_value == 100.0 and top5.metric_name == "top-5 accuracy"
        assert "circle, square, star" in card.text and "64x64, center (crop 0.875)" in card.text
    assert cvt.load_model(tmp_path / "cvt").class_names == model.class_names  # the card changes nothing else
    cvt.save_model(model, tmp_path / "bare")
    bare = ModelCard.load(tmp_path / "bare" / "README.md").data.to_dict()
    assert "metrics" not in bare and "model-index" not in bare and "datasets" not in bare  # no run, no results


def test_released_weights_card_names_their_licence_and_data():
    meta = {"model_name": "cvt_21.in22k_ft_384", "model_config": CvTConfig(depths=(1, 4, 16)).to_dict(),
            "data_config": DataConfig(384, "squash", 1.0).to_dict(), "class_names": None}  # fmt: skip
    entry = cvt.variants.identify(CvTConfig(depths=(1, 4, 16)), "cvt_21.in22k_ft_384").weights
    data = ModelCard(model_card(meta, format="hf", entry=entry)).data.to_dict()
    assert data["license"] == "mit" and data["datasets"] == ["imagenet-21k", "imagenet-1k"]
    # another head: no longer the released weights, so neither their licence nor their data
    other = {**meta, "model_config": CvTConfig(depths=(1, 4, 16), num_classes=10).to_dict()}
    entry = cvt.variants.identify(CvTConfig(depths=(1, 4, 16), num_classes=10), "cvt_21.in22k_ft_384").weights
    data = ModelCard(model_card(other, format="hf", entry=entry)).data.to_dict()
    assert data["license"] == "unknown" and "datasets" not in data


def test_push_to_hub_uploads_a_folder_that_loads(hub):
    model = tiny_model()
    url = cvt.push_to_hub(model, "me/tiny-shapes", results=RESULTS, private=True, token="hf_test")
    assert url == "https://huggingface.co/me/tiny-shapes/commit/0123abcd"
    assert hub["token"] == "hf_test"
    assert hub["create_repo"] == {"repo_id": "me/tiny-shapes", "private": True, "exist_ok": True}
    assert hub["upload"]["repo_id"] == "me/tiny-shapes" and "tiny-shapes (hf format)" in hub["upload"]["commit_message"]
    folder = hub["uploaded"]
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json",
                                                  "README.md"}  # fmt: skip
    x = torch.randn(2, 3, 64, 64)
    theirs = CvtForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, model(x), rtol=0, atol=1e-5)
        ours = cvt.load_model(folder, act="gelu")
        torch.testing.assert_close(ours(x), model(x), rtol=0, atol=0)
    assert ours.class_names == model.class_names and ours.data_config == model.data_config
    assert ModelCard.load(folder / "README.md").data.eval_results[0].metric_value == 87.5


def test_push_refuses_an_export_transformers_cannot_run_before_any_network_call(hub):
    model = cvt.create_model("cvt_13", num_classes=3, dims=[16, 32, 48], depths=[1, 1, 2], heads=[1, 1, 2])
    with pytest.raises(cvt.checkpoint.CheckpointError, match="IndexError"):
        cvt.push_to_hub(model, "me/demo")
    assert "create_repo" not in hub and "upload" not in hub


def test_cli_push_a_training_checkpoint_with_its_results(hub, tmp_path, capsys):
    model = tiny_model(act="quick_gelu")
    ckpt = {"format": "cvt.train", "version": 1, "model": model.state_dict(), "ema": None,
            **cvt.model.model_metadata(model), "best": {"top1": 91.25, "top5": 99.5, "epoch": 7},
            "train_config": {"data": "/data/flowers/", "val_split": "val"}}  # fmt: skip
    torch.save(ckpt, tmp_path / "best.pt")
    assert (
        main(["push", "--model", str(tmp_path / "best.pt"), "me/flowers", "--format", "cvt", "--message", "first"]) == 0
    )
    assert "pushed tiny-shapes (cvt format) to me/flowers" in capsys.readouterr().out
    assert hub["upload"]["commit_message"] == "first" and hub["create_repo"]["private"] is False
    card = ModelCard.load(hub["uploaded"] / "README.md")
    assert card.data.library_name == "cvt" and card.data.datasets == ["flowers"]
    assert [r.metric_value for r in card.data.eval_results] == [91.25, 99.5] and "best epoch: 7" in card.text
    back = cvt.load_model(hub["uploaded"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
    assert back.cfg.act == "quick_gelu" and back.class_names == model.class_names
