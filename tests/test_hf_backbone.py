"""CvT as a transformers backbone: UperNet, Mask2Former and DETR train with it from every checkpoint format cvt
reads, its maps are the stage maps of the source model (and of transformers' own CvT), and a saved composite model
reloads exactly in a new process. The references: the source model's `forward_intermediates`, transformers'
`CvtModel`, and transformers' heads and loading code."""

import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    AutoBackbone,
    CvtModel,
    DetrConfig,
    DetrForObjectDetection,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

import cvt
from cvt.config import DataConfig
from test_hf_interop import TINY, tiny_model  # tests/ is on sys.path (pytest's rootdir import)

FORMATS = ("official", "hf", "cvt")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[cvt.CvT, dict[str, str]]:
    """A tiny model and its checkpoints: the authors' bare state dict, a transformers folder, our own folder."""
    model = tiny_model(DataConfig(), act="gelu", seed=1)
    root = tmp_path_factory.mktemp("ckpt")
    paths = {"official": root / "tiny.pth", "hf": root / "hf", "cvt": root / "own"}
    for fmt, path in paths.items():
        cvt.save_model(model, path, format=fmt)
    return model, {fmt: str(path) for fmt, path in paths.items()}


def backbone_config(path: str, **options):
    # the authors' file records no architecture: heads and activation are given, as to `cvt.load_model`
    return cvt.hf_backbone_config(path, heads=TINY["heads"], act="gelu", **options)


def images(h: int = 61, w: int = 75, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(7))


def assert_backbone_trained(backbone, loss: torch.Tensor) -> None:
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def assert_maps_of(backbone, model: cvt.CvT, x: torch.Tensor, **tolerance) -> list[torch.Tensor]:
    """The backbone (in eval mode) returns the source model's stage maps, so its weights came from the file; an
    extra level comes after them. Returns the maps."""
    with torch.no_grad():
        ours = backbone.eval()(x).feature_maps
        reference = model.forward_intermediates(x, intermediates_only=True)
    assert len(ours) in (len(reference), len(reference) + 1)
    for got, want in zip(ours, reference, strict=False):
        torch.testing.assert_close(got, want, **tolerance)
    return list(ours)


@pytest.mark.parametrize("fmt", FORMATS)
def test_upernet_trains_on_every_checkpoint_format(source, fmt):
    model, paths = source
    config = UperNetConfig(
        backbone_config=backbone_config(paths[fmt]), num_labels=3, hidden_size=16, auxiliary_channels=8
    )
    upernet = UperNetForSemanticSegmentation(config)
    assert upernet.backbone.channels == [16, 32, 48]
    x = images()  # 61 x 75: no side a multiple of the strides
    assert_maps_of(upernet.backbone, model, x, rtol=0, atol=0)
    upernet.train()
    out = upernet(pixel_values=x, labels=torch.randint(0, 3, (2, 61, 75)))
    assert out.logits.shape == (2, 3, 61, 75)
    assert_backbone_trained(upernet.backbone, out.loss)


@pytest.mark.parametrize("fmt", FORMATS)
def test_mask2former_trains_on_every_checkpoint_format(source, fmt):
    model, paths = source
    config = Mask2FormerConfig(
        backbone_config=backbone_config(paths[fmt], extra_level=True),  # its pixel decoder takes four levels
        num_labels=3, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
        dim_feedforward=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2, num_queries=4,
        train_num_points=64,
    )  # fmt: skip
    m2f = Mask2FormerForUniversalSegmentation(config)
    backbone = m2f.model.pixel_level_module.encoder
    assert backbone.channels == [16, 32, 48, 48]
    x = images(64, 64)
    maps = assert_maps_of(backbone, model, x, rtol=0, atol=0)
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    m2f.train()
    masks = [torch.randint(0, 2, (2, 64, 64)).float(), torch.randint(0, 2, (1, 64, 64)).float()]
    out = m2f(pixel_values=x, mask_labels=masks, class_labels=[torch.tensor([0, 1]), torch.tensor([2])])
    assert_backbone_trained(backbone, out.loss)


@pytest.mark.parametrize("fmt", FORMATS)
def test_detr_trains_on_every_checkpoint_format(source, fmt):
    model, paths = source
    config = DetrConfig(
        backbone_config=backbone_config(paths[fmt], out_features=["stage3"]),
        use_timm_backbone=False, use_pretrained_backbone=False, num_labels=3, d_model=16, encoder_layers=1,
        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, num_queries=4,
    )  # fmt: skip
    detr = DetrForObjectDetection(config)
    backbone = detr.model.backbone.model  # DETR swaps its BatchNorms for frozen ones: the maps stay the same
    x = images(64, 64)
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=[2], intermediates_only=True)[0]
        torch.testing.assert_close(backbone.eval()(x).feature_maps[0], want)
    detr.train()
    boxes = [
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])},
        {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.3]])},
    ]
    out = detr(pixel_values=x, labels=boxes)
    assert out.pred_boxes.shape == (2, 4, 4)
    assert_backbone_trained(backbone, out.loss)


def test_maps_equal_transformers_cvt_stage_outputs(source):
    # transformers' own CvT (GELU, as this model) computes the same stages from our transformers folder
    model, paths = source
    backbone = AutoBackbone.from_config(backbone_config(paths["hf"]))
    theirs = CvtModel.from_pretrained(paths["hf"]).eval()
    x = images()
    with torch.no_grad():
        want = theirs(x, output_hidden_states=True).hidden_states
        got = backbone.eval()(x).feature_maps
    assert len(want) == len(got) == 3
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_map_sizes_follow_the_documented_rule():
    # stage 1: floor((H + 1) / 4); every later level: ceil(H / 2). 61 -> 15 -> 8 -> 4 -> 2, 75 -> 19 -> 10 -> 5 -> 3
    config = cvt.hf_backbone_config("cvt_13", pretrained=False, extra_level=True, **TINY)
    backbone = AutoBackbone.from_config(config)
    assert backbone.stage_names == ["stage1", "stage2", "stage3", "stage4"] and backbone.out_indices == [0, 1, 2, 3]
    assert config.strides_of_levels == [4, 8, 16, 32]
    with torch.no_grad():
        maps = backbone(images()).feature_maps
    assert [tuple(m.shape[1:]) for m in maps] == [(16, 15, 19), (32, 8, 10), (48, 4, 5), (48, 2, 3)]
    with torch.no_grad():
        maps = backbone(images(64, 96)).feature_maps
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 24), (8, 12), (4, 6), (2, 3)]  # multiples of 32: exact


def test_frozen_stages_and_norm_eval(source):
    _, paths = source
    backbone = AutoBackbone.from_config(backbone_config(paths["cvt"], frozen_stages=1, norm_eval=True)).train()
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [bn.running_mean.clone() for bn in bns]
    assert bns and not any(bn.training for bn in bns)
    assert not backbone.cvt.stages[0].training and backbone.cvt.stages[1].training
    sum(m.square().mean() for m in backbone(images()).feature_maps).backward()
    for bn, mean in zip(bns, before, strict=True):
        torch.testing.assert_close(bn.running_mean, mean, rtol=0, atol=0)  # statistics not updated
    assert all(p.grad is None and not p.requires_grad for p in backbone.cvt.stages[0].parameters())
    assert all(p.grad is not None for p in backbone.cvt.stages[1].parameters())
    with pytest.raises(ValueError, match="frozen_stages=4"):
        backbone_config(paths["cvt"], frozen_stages=4)


def test_missing_weights_are_named(source, tmp_path):
    _, paths = source
    config = backbone_config(paths["cvt"])
    config.weights = str(tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="gone"):
        AutoBackbone.from_config(config)


def test_saved_model_reloads_exactly_in_a_new_process(source, tmp_path):
    model, paths = source
    official = tmp_path / "weights.pth"
    shutil.copy(paths["official"], official)
    upernet = UperNetForSemanticSegmentation(
        UperNetConfig(backbone_config=backbone_config(str(official)), num_labels=3, hidden_size=16)
    ).eval()
    x = images()
    with torch.no_grad():
        want = upernet(pixel_values=x).logits
    upernet.save_pretrained(tmp_path / "upernet")
    torch.save(x, tmp_path / "x.pt")
    official.unlink()  # the saved model holds every weight: the file it was built from is not needed
    code = textwrap.dedent(f"""
        import sys, torch, cvt
        assert "transformers" not in sys.modules  # `import cvt` stays light
        from transformers import UperNetForSemanticSegmentation
        torch.set_num_threads(1)  # as this test: the same summation order
        cvt.register_transformers()
        model = UperNetForSemanticSegmentation.from_pretrained({str(tmp_path / "upernet")!r}).eval()
        with torch.no_grad():
            torch.save(model(pixel_values=torch.load({str(tmp_path / "x.pt")!r})).logits, {str(tmp_path / "y.pt")!r})
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), want, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients(source):
    _, paths = source
    x, grads = images(), []
    for checkpointing in (False, True):
        backbone = AutoBackbone.from_config(backbone_config(paths["cvt"])).train()
        if checkpointing:
            backbone.gradient_checkpointing_enable()
            assert all(stage.grad_checkpointing for stage in backbone.cvt.stages)
        torch.manual_seed(0)  # the same drop-path draws in both runs
        sum(m.square().mean() for m in backbone(x).feature_maps).backward()
        grads.append([p.grad for p in backbone.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(recomputed, plain)
