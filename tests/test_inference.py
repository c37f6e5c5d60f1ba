"""`cvt.optimize_for_inference`: every backend against the plain eval-mode model, the "auto" rule (measured trials,
conversions only when the work pays for them, fallback when a backend is missing), and the export cache."""

import logging
import sys

import pytest
import torch

import cvt
import cvt.export
import cvt.openvino_backend
from cvt.backend_trials import load_trials, save_trial, trial_key
from cvt.export_cache import ENTRY_FILE, store_entry
from cvt.inference import (
    LARGE_BATCH,
    BatchRouter,
    OnnxRuntimeModel,
    OpenVinoModel,
    choose_backend,
    export_key,
    onnxruntime_available,
    openvino_available,
    optimize_for_inference,
)
from cvt.optimize import InferenceBlock
from cvt.predict import inference_model
from test_optimize import assert_close_relative, tiny_model  # tests/ is on sys.path (pytest's rootdir import)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py

# batch 1 and 3, a square size and an odd one whose k/v grids round up
SHAPES = [(1, 3, 64, 64), (3, 3, 72, 40)]
CONVERTERS = {"onnx": (cvt.export, "onnx_bytes"), "openvino": (cvt.openvino_backend, "convert_openvino")}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model()


def count_conversions(monkeypatch):
    """Wrap both converters; returns the list each call appends its kind to."""
    calls = []
    for kind, (module, name) in CONVERTERS.items():
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _o=original, _k=kind, **k: calls.append(_k) or _o(*a, **k))
    return calls


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory):
    """Both converted backends of `model`, made once into a fresh cache folder, then loaded again from it."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        calls = count_conversions(patch)
        first = {b: optimize_for_inference(model, backend=b, cache_dir=folder) for b in ("onnxruntime", "openvino")}
        second = {b: optimize_for_inference(model, backend=b, cache_dir=folder) for b in ("onnxruntime", "openvino")}
    return {"folder": folder, "calls": calls, "first": first, "second": second}


def reference(model, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        return x, model(x)


def record(folder, model, dtype, batch, **seconds):
    save_trial(folder, trial_key(model.cfg.to_dict(), str(dtype), batch), seconds)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino", "auto"])
def test_float32_backends_equal_the_plain_model(model, exports, backend, shape):
    fast = optimize_for_inference(model, backend=backend, cache_dir=exports["folder"])  # the conversions made once
    x, expected = reference(model, shape)
    with torch.inference_mode():
        out = fast(x)
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert_close_relative(out, expected, 1e-4)  # the stated tolerance of every float32 backend


@pytest.mark.filterwarnings("ignore:this CPU has no native bfloat16")
@pytest.mark.parametrize("backend", ["torch", "openvino", "auto"])
def test_bfloat16_backends_equal_the_plain_model_within_bfloat16_rounding(model, exports, backend):
    fast = optimize_for_inference(model, torch.bfloat16, backend=backend, cache_dir=exports["folder"])
    x, expected = reference(model, (4, 3, 64, 64))
    with torch.inference_mode():
        out = fast(x)
    assert out.dtype == torch.float32
    # the stated bfloat16 tolerance: 8 bits of mantissa (2**-8 = 0.4% a rounding), adding up over the blocks
    assert_close_relative(out, expected, 3e-2)
    assert not torch.allclose(out, expected, rtol=1e-5, atol=1e-6)  # bfloat16 did run


def test_openvino_runs_large_batches_over_throughput_streams(model, exports):
    torch.set_num_threads(2)  # the one_thread fixture puts the count back
    fast = optimize_for_inference(model, backend="openvino", batch_size=16, cache_dir=exports["folder"])
    assert "THROUGHPUT" in str(fast.compiled.get_property("PERFORMANCE_HINT")) and fast.streams == 2
    assert fast.compiled.get_property("INFERENCE_NUM_THREADS") == 2
    x, expected = reference(model, (16, 3, 48, 48))
    with torch.inference_mode():
        assert_close_relative(fast(x), expected, 1e-4)  # split over the streams and put back together in order
    small = optimize_for_inference(model, backend="openvino", batch_size=1, cache_dir=exports["folder"])
    assert "LATENCY" in str(small.compiled.get_property("PERFORMANCE_HINT")) and small.streams == 1


def test_sessions_use_torchs_thread_count(model, exports):
    for threads in (1, 2):
        torch.set_num_threads(threads)
        ort = optimize_for_inference(model, backend="onnxruntime", cache_dir=exports["folder"])
        assert ort.session.get_session_options().intra_op_num_threads == threads
        ov = optimize_for_inference(model, backend="openvino", cache_dir=exports["folder"])
        assert ov.compiled.get_property("INFERENCE_NUM_THREADS") == threads


def test_converted_models_carry_the_models_metadata(model, exports):
    for fast in exports["first"].values():
        assert fast.num_classes == model.num_classes and fast.data_config == model.data_config
        assert fast.class_names == model.class_names and fast.cfg == model.cfg


def test_second_call_loads_the_cached_conversions(exports):
    assert sorted(exports["calls"]) == ["onnx", "openvino"]  # the second calls did not convert
    folder = exports["folder"]
    for backend, kind in (("onnxruntime", "onnx"), ("openvino", "openvino")):
        assert exports["first"][backend].path == exports["second"][backend].path
        (entry,) = (folder / kind).iterdir()  # one entry, no temporary folder left behind (renamed into place)
        assert (entry / ENTRY_FILE).is_file() and exports["first"][backend].path.parent == entry


def test_the_cache_key_follows_weights_and_settings(model):
    changed = tiny_model()
    with torch.no_grad():
        changed.load_state_dict(model.state_dict())
        key = export_key(changed, {"opset": 18})
        assert key == export_key(model, {"opset": 18})  # another copy of the same weights: the same entry
        changed.stages[1].blocks[0].attn.conv_proj_k.bn.running_var.add_(1e-3)  # a buffer counts too
        assert export_key(changed, {"opset": 18}) != key
    assert export_key(model, {"opset": 19}) != key


def copy_entry(exports, kind, tmp_path):
    """A copy of the module's cache holding only `kind`'s entry; returns the copy and the entry's folder."""
    import shutil

    shutil.copytree(exports["folder"] / kind, tmp_path / kind)
    (entry,) = (tmp_path / kind).iterdir()
    return entry


def test_a_damaged_openvino_entry_is_converted_again(model, exports, tmp_path, monkeypatch, caplog):
    entry = copy_entry(exports, "openvino", tmp_path)
    weights = entry / "model.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the IR still loads, its numbers are wrong
    weights.write_bytes(bytes(data))
    calls = count_conversions(monkeypatch)
    with caplog.at_level("WARNING"):
        fast = optimize_for_inference(model, backend="openvino", cache_dir=tmp_path)
    assert calls == ["openvino"] and "does not match its recorded SHA-256" in caplog.text
    assert fast.path.parent == entry  # written again under the same name
    x, expected = reference(model, SHAPES[0])
    assert_close_relative(fast(x), expected, 1e-4)


def test_another_graph_under_an_entrys_name_is_not_used(model, exports, tmp_path, monkeypatch, caplog):
    # another graph (the mean colour of the image) put where this model's IR is: used silently before
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    entry = copy_entry(exports, "openvino", tmp_path)
    images = ops.parameter([-1, 3, -1, -1], np.float32)
    ov.save_model(ov.Model([ops.reduce_mean(images, [2, 3], False)], [images]), entry / "model.xml")
    calls = count_conversions(monkeypatch)
    with caplog.at_level("WARNING"):
        fast = optimize_for_inference(model, backend="openvino", cache_dir=tmp_path)
    assert calls == ["openvino"] and "not using the cache entry" in caplog.text
    x, expected = reference(model, SHAPES[1])
    assert_close_relative(fast(x), expected, 1e-4)


def test_an_entry_written_for_another_key_is_not_used(model, exports, tmp_path, monkeypatch, caplog):
    entry = copy_entry(exports, "openvino", tmp_path)
    record_file = entry / ENTRY_FILE
    record_file.write_text(record_file.read_text().replace(entry.name.rsplit("-", 1)[1], "0" * 24))
    calls = count_conversions(monkeypatch)
    with caplog.at_level("WARNING"):
        optimize_for_inference(model, backend="openvino", cache_dir=tmp_path)
    assert calls == ["openvino"] and "it was written for key '000" in caplog.text


def test_a_cache_that_is_a_file_runs_uncached_with_one_warning(model, tmp_path, caplog):
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    with caplog.at_level("WARNING"):
        fast = optimize_for_inference(model, backend="openvino", cache_dir=cache)
        x, expected = reference(model, SHAPES[0])
        assert_close_relative(fast(x), expected, 1e-4)
        assert store_entry(cache, "onnx", "other", "0" * 24, lambda folder: None) is None  # another kind, later
    assert fast.path is None  # compiled from memory
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "running uncached" in warnings[0].getMessage()
    assert cache.read_text() == "not a folder"


def test_least_recently_used_entries_are_evicted_over_the_bound(model, exports, tmp_path, monkeypatch):
    import os

    for kind in ("onnx", "openvino"):
        copy_entry(exports, kind, tmp_path)
    onnx_entry = next((tmp_path / "onnx").iterdir())
    os.utime(onnx_entry / ENTRY_FILE, (1, 1))  # the ONNX entry is the least recently used
    legacy = tmp_path / "onnx" / "cvt_13-0123456789abcdef01234567.onnx"  # what earlier versions left, unremoved
    legacy.write_bytes(b"x" * 1000)
    os.utime(legacy, (2, 2))
    sizes = {p.parent.name: sum(f.stat().st_size for f in p.parent.iterdir()) for p in tmp_path.glob("*/*/entry.json")}
    monkeypatch.setenv("CVT_CACHE_MAX_BYTES", str(max(sizes.values()) + 1))  # room for one entry
    torch.manual_seed(1)
    changed = tiny_model()  # a new model: its entry is written, and one old entry must go
    optimize_for_inference(changed, backend="openvino", cache_dir=tmp_path)
    left = sorted(p.parent.parent.name for p in tmp_path.glob("*/*/entry.json"))
    assert left == ["openvino"] and not onnx_entry.exists()
    assert not legacy.exists()


def test_the_cache_bound_is_read_from_the_environment(monkeypatch):
    from cvt.export_cache import DEFAULT_MAX_BYTES, cache_max_bytes

    for text, value in (("", DEFAULT_MAX_BYTES), ("1000", 1000), ("500M", 500 * 2**20), ("2GiB", 2 * 2**30)):
        monkeypatch.setenv("CVT_CACHE_MAX_BYTES", text)
        assert cache_max_bytes() == value
    monkeypatch.setenv("CVT_CACHE_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match="CVT_CACHE_MAX_BYTES='lots' is not a size"):
        cache_max_bytes()


def test_auto_times_each_backend_once_and_takes_the_fastest(model, exports, monkeypatch):
    folder = exports["folder"]
    key = trial_key(model.cfg.to_dict(), str(torch.float32), 3)
    fast = optimize_for_inference(model, backend="auto", batch_size=3, cache_dir=folder)
    timed = load_trials(folder)[key]
    assert sorted(timed) == ["onnxruntime", "openvino", "torch"]
    winner = min(timed, key=timed.get)
    kinds = {"torch": InferenceBlock, "onnxruntime": OnnxRuntimeModel, "openvino": OpenVinoModel}
    assert any(isinstance(m, kinds[winner]) for m in fast.modules())
    # the record decides from then on: make onnxruntime the fastest and torch the slowest
    record(folder, model, torch.float32, 3, torch=3.0, openvino=2.0, onnxruntime=1.0)
    assert choose_backend(model, batch_size=3, cache_dir=folder) == "onnxruntime"
    record(folder, model, torch.float32, 3, torch=1.0, openvino=2.0, onnxruntime=3.0)
    assert choose_backend(model, batch_size=3, cache_dir=folder) == "torch"


def test_auto_without_a_batch_size_routes_each_call(model, exports):
    folder = exports["folder"]
    record(folder, model, torch.float32, 1, torch=3.0, openvino=1.0, onnxruntime=2.0)
    record(folder, model, torch.float32, LARGE_BATCH, torch=1.0, openvino=2.0, onnxruntime=3.0)
    router = optimize_for_inference(model, backend="auto", cache_dir=folder)
    assert isinstance(router, BatchRouter) and isinstance(router.small, OpenVinoModel)
    assert any(isinstance(m, InferenceBlock) for m in router.large.modules())
    assert router.num_classes == model.num_classes and router.class_names == model.class_names
    ran = []
    for part in (router.small, router.large):
        part.register_forward_hook(lambda module, args, out: ran.append(module))
    for batch in (1, router.max_batch + 1):
        x, expected = reference(model, (batch, 3, 48, 48))
        with torch.inference_mode():
            assert_close_relative(router(x), expected, 1e-4)
    assert ran == [router.small, router.large]


def test_auto_converts_nothing_for_a_few_images(model, tmp_path, monkeypatch):
    calls = count_conversions(monkeypatch)
    fast = optimize_for_inference(model, backend="auto", batch_size=2, images=2, cache_dir=tmp_path)
    assert calls == [] and any(isinstance(m, InferenceBlock) for m in fast.modules())
    assert not list(tmp_path.glob("*/*"))  # no entry: only the timing of torch on one image was recorded
    # a conversion measured as cheap (or work large enough) makes the conversion worth it
    save_trial(tmp_path, trial_key(model.cfg.to_dict(), "conversion", "-"), {"openvino": 1e-9, "onnx": 1e9})
    record(tmp_path, model, torch.float32, 2, torch=2.0, openvino=1.0)
    fast = optimize_for_inference(model, backend="auto", batch_size=2, images=2, cache_dir=tmp_path)
    assert calls == ["openvino"] and isinstance(fast, OpenVinoModel)


def test_auto_falls_back_to_torch_without_openvino_or_onnxruntime(model, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert not onnxruntime_available() and not openvino_available()
    with caplog.at_level("INFO", logger="cvt.inference"):
        fast = optimize_for_inference(model, backend="auto", cache_dir=tmp_path)
    assert "onnxruntime is not installed" in caplog.text and "openvino is not installed" in caplog.text
    assert any(isinstance(m, InferenceBlock) for m in fast.modules())
    x, expected = reference(model, SHAPES[1])
    with torch.inference_mode():
        assert_close_relative(fast(x), expected, 1e-4)
    with pytest.raises(ImportError, match=r"pip install 'cvt-pytorch\[export\]'"):
        optimize_for_inference(model, backend="onnxruntime")
    with pytest.raises(ImportError, match=r"pip install 'cvt-pytorch\[openvino\]'"):
        optimize_for_inference(model, backend="openvino")


def test_auto_uses_openvino_alone_when_onnxruntime_is_missing(model, exports, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    record(exports["folder"], model, torch.float32, 5, torch=2.0, openvino=1.0)
    assert choose_backend(model, batch_size=5, cache_dir=exports["folder"]) == "openvino"


def test_settings_a_backend_does_not_have_are_refused(model):
    with pytest.raises(ValueError, match="backend must be one of"):
        optimize_for_inference(model, backend="tensorrt")
    with pytest.raises(ValueError, match="onnxruntime backend runs float32"):
        optimize_for_inference(model, torch.bfloat16, backend="onnxruntime")
    with pytest.raises(ValueError, match="use backend='torch'"):
        optimize_for_inference(model, compile=True, backend="openvino")
    with pytest.raises(ValueError, match="dtype='int8' runs on backend='openvino' or 'auto'"):
        optimize_for_inference(model, "int8", backend="torch", calibration=[torch.zeros(1, 3, 64, 64)])
    with pytest.raises(ValueError, match="calibration= is given with dtype='int8'"):
        optimize_for_inference(model, "int8", backend="openvino")
    with pytest.raises(ValueError, match="dtype must be"):
        optimize_for_inference(model, torch.float16, backend="openvino")


def test_inference_model_moves_an_already_optimized_model_to_the_device():
    # what `cvt eval --device cuda` does with a model optimized before; "meta" stands in for the other device here.
    # The reference is torch's own placement of the parameters, not our code's.
    optimized = cvt.optimize_for_inference(tiny_model(), backend="torch")  # its own: moving may share tensors
    moved = inference_model(optimized, device="meta")
    assert {p.device.type for p in moved.parameters()} == {"meta"}
    assert not moved.training


@pytest.mark.parametrize(
    "failure",
    [OSError(30, "Read-only file system"), OSError(28, "No space left on device")],
    ids=["read-only", "full"],
)
def test_an_unwritable_cache_leaves_nothing_behind_and_says_why(tmp_path, monkeypatch, caplog, failure):
    # root cannot make a folder read-only and no test can fill a disk: the writer raises what the system would
    def write(folder):
        (folder / "model.onnx").write_bytes(b"partial")
        raise failure

    with caplog.at_level("WARNING"):
        assert store_entry(tmp_path, "onnx", "cvt", "1" * 24, write) is None
    assert failure.strerror in caplog.text and "running uncached" in caplog.text
    assert list((tmp_path / "onnx").iterdir()) == []  # the temporary folder is gone


@pytest.mark.parametrize("backend", ["auto", "openvino"])
def test_cvt_predict_runs_uncached_when_the_cache_is_a_file(model, tmp_path, monkeypatch, caplog, capsys, backend):
    # before: `cvt predict` (default backend) exported, then failed writing into the cache (NotADirectoryError)
    from PIL import Image

    from cvt.checkpoint import save_model
    from cvt.cli import main

    save_model(model, tmp_path / "tiny")
    Image.new("RGB", (80, 64), (200, 30, 30)).save(tmp_path / "a.png")
    cache = tmp_path / "cache"
    cache.write_text("a file where the cache folder should be")
    monkeypatch.setenv("CVT_CACHE_DIR", str(cache))
    with caplog.at_level("WARNING"):
        assert main(["predict", "--model", str(tmp_path / "tiny"), str(tmp_path / "a.png"), "--backend", backend]) == 0
    assert "a.png" in capsys.readouterr().out
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING and "uncached" in r.getMessage()]
    assert len(warned) == (backend == "openvino")  # "auto" on one image converts nothing, so nothing to warn of


@pytest.fixture(scope="module")
def calibration(model):
    """Images the tiny model was not built from: smooth random fields, as photographs are smooth."""
    generator = torch.Generator().manual_seed(3)
    coarse = torch.rand(24, 3, 8, 8, generator=generator)
    return [torch.nn.functional.interpolate(coarse[i : i + 8], size=(64, 64), mode="bilinear") for i in (0, 8, 16)]


@pytest.mark.parametrize("backend", ["openvino", "auto"])
def test_int8_is_quantized_and_stays_near_the_plain_model(model, exports, calibration, backend):
    fast = optimize_for_inference(model, "int8", backend=backend, calibration=calibration, cache_dir=exports["folder"])
    assert isinstance(fast, OpenVinoModel) and fast.path.parent.parent.name == "openvino-int8"
    import openvino as ov

    ir = ov.Core().read_model(str(fast.path))
    assert any(op.get_type_name() == "FakeQuantize" for op in ir.get_ops())  # int8 ops, not float32 again
    x = torch.cat(calibration)[:8]
    with torch.no_grad():
        expected = model(x)
    out = fast(x)
    assert_close_relative(out, expected, 0.1)  # int8 steps of 1/256 of each range, over 4 blocks
    assert not torch.allclose(out, expected, rtol=1e-3, atol=1e-4)


def test_cvt_export_openvino_writes_a_model_server_layout(model, calibration, tmp_path, capsys):
    import openvino as ov
    from PIL import Image

    from cvt.checkpoint import save_model
    from cvt.cli import main

    save_model(model, tmp_path / "tiny")
    images = tmp_path / "calibration"
    images.mkdir()
    for i, batch in enumerate(calibration[:2]):
        for j, image in enumerate(batch):
            Image.fromarray((image.permute(1, 2, 0) * 255).byte().numpy()).save(images / f"{i}-{j}.png")
    repository = tmp_path / "models"
    args = ["export", "--model", str(tmp_path / "tiny"), "--format", "openvino", "--output", str(repository)]
    assert main([*args, "--int8", "--calibration", str(images)]) == 0
    assert "int8 OpenVINO IR" in capsys.readouterr().out
    (version,) = repository.glob("*/1")  # OpenVINO Model Server: REPOSITORY/NAME/VERSION/model.xml + .bin
    assert sorted(p.name for p in version.iterdir()) == ["model.bin", "model.xml"]
    compiled = ov.Core().compile_model(str(version / "model.xml"), "CPU")
    # calibrated at the model's input size (224, through the eval transform), run at 64x64: any size runs
    x = calibration[2]
    with torch.no_grad():
        assert_close_relative(torch.from_numpy(compiled(x.numpy())[0]), model(x), 0.1)
    assert main(args) != 0
    assert "a version is never replaced" in capsys.readouterr().err
    assert (version / "model.xml").is_file()
    assert main([*args, "--int8"]) != 0
    assert "--int8 goes with --format openvino and --calibration" in capsys.readouterr().err
