import contextlib
import io
import json

import numpy as np
import onnx
import pytest
import torch

import cvt
import cvt.export
import cvt.optimize
from cvt.checkpoint import save_model
from cvt.cli import main
from cvt.export import export_onnx, export_torchscript, onnx_session

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

# batch 1 and 3 at 224, 384 and 256x320, plus an odd size whose k/v grids round up (ceil(H/2))
SHAPES = [(b, 3, h, w) for b in (1, 3) for h, w in ((224, 224), (384, 384), (256, 320))] + [(2, 3, 97, 131)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = cvt.create_model("cvt_13", depths=(1, 1, 1), num_classes=10)
    model.train()  # a few steps so that the BatchNorm running statistics are not the identity
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 64, 64) * 2 + 0.5)
    model.eval()
    model.class_names = [f"class {i}" for i in range(10)]
    return model


@pytest.fixture(scope="module")
def reference(model):
    """PyTorch outputs of the original (unfolded) model for each shape in SHAPES."""
    generator = torch.Generator().manual_seed(1)
    inputs = {shape: torch.randn(*shape, generator=generator) for shape in SHAPES}
    with torch.no_grad():
        return {shape: (x, model(x)) for shape, x in inputs.items()}


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """One ONNX and one TorchScript file, written by the CLI from a saved checkpoint, and what the CLI printed."""
    folder = tmp_path_factory.mktemp("export")
    save_model(model, folder / "tiny")
    printed = {}
    for fmt, name in (("onnx", "tiny.onnx"), ("torchscript", "tiny.pt")):
        argv = ["export", "--model", str(folder / "tiny"), "--format", fmt, "--output", str(folder / name)]
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert main([*argv, "--input-size", "128"]) == 0  # the example's size does not matter
        printed[fmt] = out.getvalue()
    return folder, printed


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_cli_reports_the_check(exported, fmt):
    out = exported[1][fmt]
    # default check: batch 1 at the example's size, batch 3 at an odd size a quarter the area
    assert "input 1x3x128x128: max abs diff to PyTorch" in out and "input 3x3x65x81: max abs diff" in out
    assert "<= 0.0001" in out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_one_onnx_file_serves_every_batch_and_size(exported, reference, shape):
    session = onnx_session(exported[0] / "tiny.onnx")
    x, want = reference[shape]
    (got,) = session.run(None, {"images": x.numpy()})
    assert got.shape == (shape[0], 10)
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_one_torchscript_file_serves_every_batch_and_size(exported, reference, shape):
    module = torch.jit.load(str(exported[0] / "tiny.pt"))
    x, want = reference[shape]
    with torch.no_grad():
        got = module(x)
    assert got.shape == (shape[0], 10)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_onnx_graph_is_dynamic_folded_and_carries_metadata(exported, model):
    proto = onnx.load(str(exported[0] / "tiny.onnx"))
    (images,) = proto.graph.input
    assert [d.dim_param or d.dim_value for d in images.type.tensor_type.shape.dim] == ["batch", 3, "height", "width"]
    (logits,) = proto.graph.output
    assert [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim] == ["batch", 10]
    ops = {node.op_type for node in proto.graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["cvt.config"]) == model.cfg.to_dict()
    assert cvt.DataConfig.from_dict(json.loads(meta["cvt.data_config"])) == model.data_config
    assert json.loads(meta["cvt.class_names"]) == model.class_names


def test_torchscript_extra_files(exported, model):
    extra = {"cvt.config.json": "", "cvt.class_names.json": ""}
    torch.jit.load(str(exported[0] / "tiny.pt"), _extra_files=extra)
    assert json.loads(extra["cvt.config.json"]) == model.cfg.to_dict()
    assert json.loads(extra["cvt.class_names.json"]) == model.class_names


def test_a_wrong_export_fails_loudly_writes_nothing_and_leaves_the_model_alone(model, tmp_path, monkeypatch):
    fold = cvt.optimize.fold_batchnorm

    def perturbed_fold(m):
        folded = fold(m)
        with torch.no_grad():
            folded.head.bias.add_(1e-3)
        return folded

    monkeypatch.setattr(cvt.export, "fold_batchnorm", perturbed_fold)  # where the export looks it up
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"does not reproduce PyTorch: max abs diff 0\.001"):
        export_torchscript(model, tmp_path / "m.pt", input_size=64, check_shapes=[(1, 3, 64, 64)])
    assert not (tmp_path / "m.pt").exists()
    assert model.training
    model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(isinstance(m.bn, torch.nn.BatchNorm2d) for m in model.modules() if hasattr(m, "bn"))


def test_cli_errors(tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "m.onnx")]) == 1
    assert "neither an existing file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--model", "cvt_13", "--format", "tflite", "--output", str(tmp_path / "m")])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["avg", "linear"])
def test_onnx_other_projections(tmp_path, method):
    # AvgPool2d(ceil_mode=True) and plain linear projections keep dynamic shapes too; the export checks itself
    torch.manual_seed(0)
    model = cvt.create_model("cvt_13", depths=(1, 1, 1), qkv_method=method).eval()
    result = export_onnx(model, tmp_path / "m.onnx", input_size=96, check_shapes=[(1, 3, 96, 96), (3, 3, 101, 133)])
    assert result.max_abs_diff < 1e-4 and len(result.checks) == 2


@pytest.mark.slow
def test_backbone_and_full_size_onnx(tmp_path):
    torch.manual_seed(0)
    features = cvt.create_model("cvt_13", features_only=True, out_indices=(0, 2)).eval()
    result = export_onnx(features, tmp_path / "backbone.onnx", check_shapes=[(1, 3, 224, 224), (2, 3, 256, 320)])
    assert result.max_abs_diff < 1e-4
    session = onnx_session(tmp_path / "backbone.onnx")
    assert [o.name for o in session.get_outputs()] == ["stage0", "stage2"]
    maps = session.run(None, {"images": np.zeros((1, 3, 256, 320), np.float32)})
    assert [m.shape for m in maps] == [(1, 64, 64, 80), (1, 384, 16, 20)]


def test_cli_shows_each_check_once(exported):
    # before: the library logged every check at INFO and the command printed it again, so the user saw it twice
    import subprocess
    import sys

    folder, _ = exported
    argv = ["export", "--model", str(folder / "tiny"), "--format", "onnx", "--output", str(folder / "again.onnx")]
    code = f"import sys; from cvt.cli import main; sys.exit(main({argv!r}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    # the terminal shows the printed result (stdout) and the INFO log lines (stderr): each check in one of them
    assert proc.stdout.count("max abs diff to PyTorch") == 2 and "max abs diff" not in proc.stderr, proc.stderr
