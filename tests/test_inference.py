"""`cvt.optimize_for_inference`: every backend against the plain eval-mode model, the "auto" rule and its fallback
when onnxruntime is missing, and the export cache."""

import sys

import pytest
import torch

import cvt
import cvt.export
from cvt.inference import (
    ONNXRUNTIME_MAX_BATCH,
    BatchRouter,
    OnnxRuntimeModel,
    choose_backend,
    export_key,
    onnxruntime_available,
    optimize_for_inference,
)
from cvt.optimize import InferenceBlock
from cvt.predict import inference_model
from test_optimize import assert_close_relative, tiny_model  # tests/ is on sys.path (pytest's rootdir import)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py

# batch 1 and 3, a square size and an odd one whose k/v grids round up
SHAPES = [(1, 3, 64, 64), (3, 3, 72, 40)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model()


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory):
    """The "onnxruntime" backend of `model`, exported once into a fresh cache folder, with a count of exports."""
    folder = tmp_path_factory.mktemp("cache")
    calls = []
    original = cvt.export.export_onnx

    def counting(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    cvt.export.export_onnx = counting
    try:
        first = optimize_for_inference(model, backend="onnxruntime", cache_dir=folder)
        second = optimize_for_inference(model, backend="onnxruntime", cache_dir=folder)
    finally:
        cvt.export.export_onnx = original
    return {"folder": folder, "calls": calls, "first": first, "second": second}


def reference(model, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        return x, model(x)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "auto"])
def test_float32_backends_equal_the_plain_model(model, exports, backend, shape):
    fast = optimize_for_inference(model, backend=backend, cache_dir=exports["folder"])  # the export made once
    x, expected = reference(model, shape)
    with torch.inference_mode():
        out = fast(x)
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert_close_relative(out, expected, 1e-4)  # the stated tolerance of every float32 backend


def test_auto_picks_by_batch_size_for_float32_on_cpu(model, exports, monkeypatch):
    assert onnxruntime_available()
    assert choose_backend("cpu", batch_size=1) == choose_backend("cpu", batch_size=ONNXRUNTIME_MAX_BATCH)
    assert choose_backend("cpu", batch_size=1) == "onnxruntime"
    assert choose_backend("cpu", batch_size=ONNXRUNTIME_MAX_BATCH + 1) == "torch"
    monkeypatch.setenv("CVT_CACHE_DIR", str(exports["folder"]))  # the export made above: no second export
    fast = optimize_for_inference(model, backend="auto", batch_size=1)
    assert isinstance(fast, OnnxRuntimeModel) and fast.path == exports["first"].path
    assert fast.num_classes == model.num_classes and fast.data_config == model.data_config
    large = optimize_for_inference(model, backend="auto", batch_size=ONNXRUNTIME_MAX_BATCH + 1)
    assert any(isinstance(m, InferenceBlock) for m in large.modules())


def test_auto_without_a_batch_size_routes_each_call(model, exports, monkeypatch):
    monkeypatch.setenv("CVT_CACHE_DIR", str(exports["folder"]))
    router = optimize_for_inference(model, backend="auto")
    assert isinstance(router, BatchRouter) and isinstance(router.small, OnnxRuntimeModel)
    assert router.num_classes == model.num_classes and router.class_names == model.class_names
    ran = []
    for part in (router.small, router.large):
        part.register_forward_hook(lambda module, args, out: ran.append(module))
    for batch in (1, ONNXRUNTIME_MAX_BATCH + 1):
        x, expected = reference(model, (batch, 3, 48, 48))
        with torch.inference_mode():
            assert_close_relative(router(x), expected, 1e-4)
    assert ran == [router.small, router.large]


@pytest.mark.filterwarnings("ignore:this CPU has no native bfloat16")
def test_auto_runs_torch_for_bfloat16(model):
    assert choose_backend("cpu", torch.bfloat16) == "torch" and choose_backend("cuda") == "torch"
    assert choose_backend("cpu", compile=True) == "torch"
    fast = optimize_for_inference(model, torch.bfloat16, backend="auto")
    assert any(isinstance(m, InferenceBlock) for m in fast.modules())
    x, expected = reference(model, (4, 3, 64, 64))
    with torch.inference_mode():
        out = fast(x)
    assert out.dtype == torch.float32
    # the stated bfloat16 tolerance: 8 bits of mantissa (2**-8 = 0.4% a rounding), adding up over the blocks
    assert_close_relative(out, expected, 3e-2)


def test_session_uses_torchs_thread_count(model, exports):
    for threads in (1, 2):
        torch.set_num_threads(threads)  # the one_thread fixture puts the count back
        fast = optimize_for_inference(model, backend="onnxruntime", cache_dir=exports["folder"])
        assert fast.session.get_session_options().intra_op_num_threads == threads


def test_second_call_loads_the_cached_export(exports):
    assert len(exports["calls"]) == 1  # the second call did not export
    assert exports["first"].path == exports["second"].path and exports["first"].path.is_file()
    assert list(exports["folder"].glob("onnx/*.onnx")) == [exports["first"].path]
    assert not list(exports["folder"].glob("onnx/.*"))  # no temporary file left behind (written atomically)


def test_the_cache_key_follows_weights_and_settings(model):
    changed = tiny_model()
    with torch.no_grad():
        changed.load_state_dict(model.state_dict())
        key = export_key(changed, {"opset": 18})
        assert key == export_key(model, {"opset": 18})  # another copy of the same weights: the same file
        changed.stages[1].blocks[0].attn.conv_proj_k.bn.running_var.add_(1e-3)  # a buffer counts too
        assert export_key(changed, {"opset": 18}) != key
    assert export_key(model, {"opset": 19}) != key


@pytest.mark.slow
def test_a_damaged_cache_entry_is_exported_again(model, exports, tmp_path, monkeypatch):
    (tmp_path / "onnx").mkdir()
    damaged = tmp_path / "onnx" / exports["first"].path.name
    damaged.write_bytes(b"not an onnx file")
    calls = []
    original = cvt.export.export_onnx
    monkeypatch.setattr(cvt.export, "export_onnx", lambda *a, **k: calls.append(a[1]) or original(*a, **k))
    fast = optimize_for_inference(model, backend="onnxruntime", cache_dir=tmp_path)
    assert calls == [damaged] and fast.path == damaged
    x, expected = reference(model, SHAPES[0])
    assert_close_relative(fast(x), expected, 1e-4)


def test_auto_falls_back_to_torch_without_onnxruntime(model, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    assert not onnxruntime_available()
    with caplog.at_level("INFO", logger="cvt.inference"):
        fast = optimize_for_inference(model, backend="auto")
    assert "onnxruntime is not installed" in caplog.text
    assert any(isinstance(m, InferenceBlock) for m in fast.modules())
    x, expected = reference(model, SHAPES[1])
    with torch.inference_mode():
        assert_close_relative(fast(x), expected, 1e-4)
    with pytest.raises(ImportError, match=r"pip install 'cvt-pytorch\[export\]'"):
        optimize_for_inference(model, backend="onnxruntime")


def test_settings_a_backend_does_not_have_are_refused(model):
    with pytest.raises(ValueError, match="backend must be one of"):
        optimize_for_inference(model, backend="tensorrt")
    with pytest.raises(ValueError, match="use backend='torch'"):
        optimize_for_inference(model, torch.bfloat16, backend="onnxruntime")
    with pytest.raises(ValueError, match="use backend='torch'"):
        optimize_for_inference(model, compile=True, backend="onnxruntime")


def test_inference_model_moves_an_already_optimized_model_to_the_device():
    # what `cvt eval --device cuda` does with a model optimized before; "meta" stands in for the other device here.
    # The reference is torch's own placement of the parameters, not our code's.
    optimized = cvt.optimize_for_inference(tiny_model(), backend="torch")  # its own: moving may share tensors
    moved = inference_model(optimized, device="meta")
    assert {p.device.type for p in moved.parameters()} == {"meta"}
    assert not moved.training
