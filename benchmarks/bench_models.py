"""Speed and peak memory of our CvT against transformers' CvT on the same weights, measured side by side.

    .venv/bin/python benchmarks/bench_models.py --readme --markdown perf.md   # the README's table (~20 min, 2 cores)
    .venv/bin/python benchmarks/bench_models.py                        # every row, training and memory too (~45 min)
    .venv/bin/python benchmarks/bench_models.py --models cvt_13 --batch 1 --reps 3 --no-train --no-memory
    .venv/bin/python benchmarks/bench_models.py --extra official=my_pkg.cvt:build   # one more implementation
    .venv/bin/python benchmarks/bench_models.py --device cuda        # the same rows on a GPU

`--readme` is the bounded run behind the README's Performance table: CvT-13 and CvT-21 at 224, inference at batch 1
and 32, float32 and bfloat16 (where the CPU has native bf16), the compiled implementations at batch 1 and in
bfloat16 (float32 at batch 32 gained nothing from compiling in earlier runs), 3 reps, no training or memory rows.
`--markdown FILE` writes the machine, the GEMM peaks and the table, ready to paste. The first run on a machine also
exports each model to ONNX once (~30 s each, cached under ~/.cache/cvt or $CVT_CACHE_DIR).

Method (so the figures can be judged):
- Each row runs in a fresh Python process, `torch.set_num_threads(2)` (`--threads`), so that nothing of one row
  (allocator, thread pools, torch.compile) carries into the next: when all rows shared one process, CvT-21's
  batch-32 ratio read 1.03x after the CvT-13 and compiled rows, and 1.77x for the same row alone. The row builds every
  implementation on the same weights (ours, converted to transformers' layout with `cvt.checkpoint.cvt_to_hf`),
  warms each up, then runs them in alternation, `--reps` turns each, and reports the median call: a load change
  on a shared machine hits all of them alike. At batch 1 each turn is 5 calls whose first is not timed: the other
  models' turns leave the caches cold, which a model served alone never sees.
- Implementations: `ours` is the plain eval-mode model (what `cvt.create_model(...).eval()` runs); `ours-opt` is
  `cvt.optimize_for_inference(model)` (the "torch" backend), `ours-opt-compiled` the same with `compile=True`
  (torch.compile; inductor freezing on the CPU); `ours-ort` is `backend="onnxruntime"`, our own ONNX export run by
  onnxruntime with the row's threads; `ours-ov` is `backend="openvino"` in the row's dtype and `ours-ov-int8` its
  NNCF int8 model (float32 rows; "% GEMM peak" over the float32 peak); `hf-ov` is the peer a CPU user of
  transformers picks, `ov.convert_model` on `CvtForImageClassification`, compiled as ours is; `ours-auto` is
  `backend="auto"` with the row's batch size, the backend it measured fastest (CPU only: elsewhere `ours-opt`); `hf` is
  `transformers.CvtForImageClassification` and `hf-compiled` the same under `torch.compile`, what a user of
  transformers can do (`--no-compile` leaves both compiled rows out, `--compile-where` keeps them in some; compiling
  takes ~40 s a row on 2 cores; `--no-onnx` leaves onnxruntime out). Ours is timed with its default QuickGELU
  (what the released weights need; transformers computes GELU, one kernel fewer per block), and before timing its
  logits with act="gelu" are checked against transformers' on the same weights.
- Inference runs under `torch.inference_mode()`; a training step is forward + cross-entropy + backward +
  `AdamW.step()` (default settings for both), in train mode (drop path on, as configured).
- bf16: the same models converted to bfloat16 (`optimize_for_inference(model, dtype=torch.bfloat16)` for ours,
  `.to(torch.bfloat16)` for transformers). Measured only where oneDNN has native bf16 (AVX512-BF16/AMX); on
  other CPUs torch falls back to scalar kernels about 100x slower, and the rows say so instead (`--force-bf16`).
- Peak memory (Linux): each (implementation, row) runs again in a fresh subprocess that builds the model, returns
  freed heap to the OS (`malloc_trim`), resets the kernel's peak-RSS mark (`/proc/self/clear_refs`), runs two
  steps and reads the mark (`VmHWM`): "peak RSS" is the process's largest resident set during those steps (model,
  activations, gradients, optimizer state, allocator slack: what the OS must provide), "(step)" its increase
  over the resident set just before them. Python-level tracers (tracemalloc) do not see torch's allocations.
- Ratios: "vs hf fp32" is against transformers in float32 in the same process (a bfloat16 row times `hf-fp32`
  beside the others for it), "vs hf same dtype" against transformers in the row's dtype.
- GEMM peaks: the fastest of 20 2048x2048 products into a reused output, measured in a fresh process at the start
  of the run with the row's threads, for every GEMM at hand: torch's float32 (MKL/oneDNN), NumPy's float32
  (OpenBLAS), onnxruntime's float32 (MLAS, a one-node MatMul graph) and torch's bfloat16 (oneDNN; AVX512-BF16 or
  AMX where the CPU has them). "% GEMM peak" is the model's FLOPs per second (2 x MACs as `cvt.count_macs` counts
  them; x3 for a training step) over the best float32 GEMM in float32 rows and over the bfloat16 GEMM in bfloat16
  rows (a peak read low when the shared machine was busy at that moment, and rows then passed 100%).
- Allocator: by default every process first calls `cvt.allocator.keep_freed_memory()`, as the `cvt` commands do,
  so that glibc reuses freed buffers instead of unmapping them: no implementation pays page faults and the ratios
  compare computation. `--allocator glibc` leaves glibc's defaults, what a script that does not call it gets: then
  transformers' batch-32 forward page-faults ~560,000 times and ours-opt's not once, but glibc's adaptive
  thresholds also depend on every allocation the process made before, so within a row each implementation's
  figure depends on the others run beside it (transformers at batch 1 read 7.5 img/s beside ours alone and 8.6
  beside the compiled models too).
- `--extra label=module:factory`: `factory(cfg: cvt.CvTConfig) -> nn.Module` mapping images to logits (or to an
  object with `.logits`); compared for speed only, on its own weights.
- `--device cuda`: models, inputs and the matmul peak on the GPU, every timed call closed by
  `torch.cuda.synchronize()`, bf16 always measured, and memory as the peak of `torch.cuda.max_memory_allocated`
  over the two steps in the fresh subprocess ("(step)": its rise over the allocation before them).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import cvt
from cvt.allocator import keep_freed_memory
from cvt.checkpoint import config_to_hf, cvt_to_hf
from cvt.flops import model_cost

# (task, batch, input size) rows of the default table
INFER_BATCHES = (1, 32)
TRAIN_ROWS = ((32, 224), (64, 64))


@dataclasses.dataclass
class Row:
    model: str
    task: str  # "infer" or "train"
    dtype: str
    batch: int
    size: int
    results: dict[str, float] = dataclasses.field(default_factory=dict)  # implementation -> images/s
    memory: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)  # impl -> (peak, step) MiB
    note: str = ""


def machine(device: str = "cpu") -> str:
    if device != "cpu":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    name = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads, torch {torch.__version__}, oneDNN ISA {_onednn_isa()}"


def _onednn_isa() -> str:
    code = "import torch; torch.nn.functional.conv2d(torch.ones(2, 8, 8, 8), torch.ones(8, 1, 3, 3), groups=8)"
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout
    for line in out.splitlines():
        if ",isa:" in line:
            return line.split(",isa:", 1)[1].strip()
    return "unknown"


def native_bf16(device: str = "cpu") -> bool:
    return device != "cpu" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on CPU), so a timer reads the work's end."""
    if device != "cpu":
        torch.cuda.synchronize(device)


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 20, device: str = "cpu") -> float:
    """The best rate of `reps` n x n matmuls into a reused output: what the machine gives when nothing interferes."""
    if device != "cpu":
        n = max(n, 8192)  # a GPU needs a larger product to reach its peak
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


def numpy_matmul_gflops(n: int = 2048, reps: int = 20) -> float:
    """`matmul_gflops` for NumPy's BLAS (OpenBLAS in NumPy's wheels) in float32."""
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=out)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


def onnxruntime_matmul_gflops(threads: int, n: int = 2048, reps: int = 20) -> float:
    """`matmul_gflops` for onnxruntime's own GEMM (MLAS): a one-node MatMul graph in a session of `threads`."""
    import numpy as np  # noqa: PLC0415
    from onnx import TensorProto, helper  # noqa: PLC0415

    from cvt.export import onnx_session  # noqa: PLC0415

    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in ("a", "b")]
    output = helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", inputs, [output])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    session = onnx_session(proto.SerializeToString(), threads=threads)
    rng = np.random.default_rng(0)
    feed = {name: rng.standard_normal((n, n), dtype=np.float32) for name in ("a", "b")}
    session.run(None, feed)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


def openvino_matmul_gflops(threads: int, precision: str, n: int = 2048, reps: int = 20) -> float:
    """`matmul_gflops` for OpenVINO's CPU MatMul (oneDNN): a one-node graph with a constant weight, compiled with
    `threads` and `precision` ("f32" or "bf16") as the inference precision."""
    import numpy as np  # noqa: PLC0415
    import openvino as ov  # noqa: PLC0415
    import openvino.opset13 as ops  # noqa: PLC0415

    rng = np.random.default_rng(0)
    a = ops.parameter([n, n], np.float32)
    graph = ov.Model([ops.matmul(a, ops.constant(rng.standard_normal((n, n), dtype=np.float32)), False, False)], [a])
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    request = ov.Core().compile_model(graph, "CPU", config).create_infer_request()
    x = rng.standard_normal((n, n), dtype=np.float32)
    request.infer({0: x})
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        request.infer({0: x})
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


def peaks_child(spec: dict[str, Any]) -> None:
    """Runs in a fresh process (BLAS pools sized by the environment `in_child` sets): prints every GEMM's peak."""
    device, threads, bf16 = spec["device"], spec["threads"], spec["bf16"]
    peaks = {"torch float32": matmul_gflops(torch.float32, device=device)}
    if device == "cpu":
        peaks["numpy float32"] = numpy_matmul_gflops()
        if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
            peaks["onnxruntime float32"] = onnxruntime_matmul_gflops(threads)
        if importlib.util.find_spec("openvino"):
            peaks["openvino float32"] = openvino_matmul_gflops(threads, "f32")
            if bf16:
                peaks["openvino bfloat16"] = openvino_matmul_gflops(threads, "bf16")
    # without native bf16 a 2048 matmul takes minutes: show the fallback's rate on a smaller one
    peaks["torch bfloat16"] = matmul_gflops(
        torch.bfloat16, n=2048 if bf16 else 256, reps=20 if bf16 else 1, device=device
    )
    print(json.dumps(peaks))


def dtype_peaks(gemms: dict[str, float]) -> dict[str, float]:
    """The peak each row is measured against: the best GEMM of any library in the row's dtype (int8 rows are
    measured against the float32 peak: they show what quantization gains over the best float32 kernel)."""
    best = {dtype: max(v for k, v in gemms.items() if k.endswith(dtype)) for dtype in ("float32", "bfloat16")}
    return {**best, "int8": best["float32"]}


# ---- implementations ----


def build(
    impl: str,
    name: str,
    dtype: torch.dtype,
    extras: dict[str, str],
    train: bool,
    act: str = "quick_gelu",
    device: str = "cpu",
    batch: int | None = None,
) -> nn.Module:
    """One implementation of `name` with the shared weights (seeded), in train or eval mode, on `device` (`batch`:
    the batch it will run, for the backends that pick a setting by it)."""
    torch.manual_seed(0)
    ours = cvt.create_model(name, act=act)
    if impl == "ours":
        return ours.train(train).to(device, dtype)
    if impl in ("ours-opt", "ours-opt-compiled"):
        return cvt.optimize_for_inference(ours.to(device).eval(), dtype=dtype, compile=impl == "ours-opt-compiled")
    if impl in ("ours-ort", "ours-auto", "ours-ov"):  # converted backends (cached), and the one "auto" measures best
        backend = {"ours-ort": "onnxruntime", "ours-auto": "auto", "ours-ov": "openvino"}[impl]
        return cvt.optimize_for_inference(ours.to(device).eval(), dtype=dtype, backend=backend, batch_size=batch)
    if impl == "ours-ov-int8":  # NNCF int8 calibrated on smooth random images (speed does not depend on them)
        return cvt.optimize_for_inference(
            ours.eval(), "int8", backend="openvino", calibration=smooth_images(), batch_size=batch
        )
    if impl == "hf-ov":  # the peer: ov.convert_model on transformers' model, compiled as ours is
        import openvino as ov  # noqa: PLC0415

        from cvt.openvino_backend import OpenVinoModel, compile_openvino  # noqa: PLC0415

        hf = build("hf", name, torch.float32, extras, False, act, device)
        with torch.no_grad():
            ir = ov.convert_model(
                hf, example_input=torch.randn(2, 3, 224, 224), input=[ov.PartialShape([-1, 3, -1, -1])]
            )
        throughput = batch is not None and batch >= 8
        return OpenVinoModel(compile_openvino(ir, dtype, threads=torch.get_num_threads(), throughput=throughput), ours)
    if impl == "hf-fp32":  # the reference of every row, whatever the row's dtype
        return build("hf", name, torch.float32, extras, train, act, device)
    if impl in ("hf", "hf-compiled"):
        import transformers  # noqa: PLC0415 - only the benchmark needs it

        transformers.logging.set_verbosity_error()
        hf = transformers.CvtForImageClassification(transformers.CvtConfig(**config_to_hf(ours.cfg)))
        hf.load_state_dict(cvt_to_hf(ours.state_dict()), strict=True)
        hf = hf.train(train).to(device, dtype)
        return torch.compile(hf) if impl == "hf-compiled" else hf
    module, _, factory = extras[impl].partition(":")
    return getattr(importlib.import_module(module), factory)(ours.cfg).train(train).to(device, dtype)


def smooth_images(batches: int = 4, batch: int = 8) -> list[torch.Tensor]:
    """Calibration batches for the int8 rows: upsampled noise, smooth as photographs are."""
    coarse = torch.randn(batches * batch, 3, 14, 14, generator=torch.Generator().manual_seed(2))
    return list(F.interpolate(coarse, size=(224, 224), mode="bilinear").split(batch))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def make_step(model: nn.Module, task: str, x: torch.Tensor) -> Callable[[], None]:
    if task == "infer":

        def infer() -> None:
            with torch.inference_mode():
                logits(model, x)

        return infer
    target = torch.randint(0, 1000, (x.shape[0],), generator=torch.Generator().manual_seed(0)).to(x.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the same fast update for all

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(logits(model, x), target).backward()
        optimizer.step()

    return train_step


def implementations(
    row: Row, extras: dict[str, str], compiled: bool = False, onnx: bool = True, device: str = "cpu"
) -> list[str]:
    """The implementations timed side by side in `row` (`onnx`: include onnxruntime on our export and OpenVINO)."""
    if row.task != "infer":
        return ["ours", "hf", *extras]
    names = ["ours", "ours-opt"] + (["ours-opt-compiled"] if compiled else [])
    if row.dtype == "float32" and onnx and device == "cpu":
        names += ["ours-ort"]  # onnxruntime runs float32 on CPU
    if onnx and device == "cpu" and importlib.util.find_spec("openvino"):
        names += ["ours-ov", "hf-ov"] + (["ours-ov-int8"] if row.dtype == "float32" else [])
    if onnx and device == "cpu":
        names += ["ours-auto"]  # elsewhere "auto" is ours-opt
    names += ["hf"] + (["hf-compiled"] if compiled else [])
    if row.dtype != "float32":
        names.append("hf-fp32")
    return names + list(extras)


def takes_float32_images(impl: str) -> bool:
    """Whether `impl` is fed the float32 images (it converts them itself) rather than images of the row's dtype."""
    return impl.startswith("ours-") or impl in ("hf-fp32", "hf-ov")


# ---- measurements ----


def check_logits(name: str, device: str = "cpu") -> str:
    """Max |ours - transformers| / max |transformers| on 4 images, for the plain and the optimized model."""
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        ref = logits(build("hf", name, torch.float32, {}, False, device=device), x)
        diffs = [
            (
                (logits(build(impl, name, torch.float32, {}, False, "gelu", device), x) - ref).abs().max()
                / ref.abs().max()
            ).item()
            for impl in ("ours", "ours-opt")
        ]
    return f"{name} logits vs transformers (act=gelu): ours {diffs[0]:.1e}, ours-opt {diffs[1]:.1e} (max rel.)"


def in_child(kind: str, spec: dict[str, Any]) -> Any:
    """Run `kind` ("time", "memory" or "peaks") of `spec` in a fresh Python process and return what it prints
    (JSON). BLAS libraries that size their thread pools from the environment get `spec["threads"]` threads."""
    threads = str(spec["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps({"kind": kind, **spec})],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode:
        raise RuntimeError(f"{kind} measurement of {spec.get('row', '')} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child(spec: dict[str, Any]) -> None:
    """The `--child` entry point: one row's timing, or one implementation's memory, printed as JSON."""
    torch.set_num_threads(spec["threads"])
    if spec["allocator"] == "kept" and not keep_freed_memory():
        raise RuntimeError("--allocator kept: glibc's mallopt is not available here (use --allocator glibc)")
    if spec["kind"] == "memory":
        memory_child(spec)
        return
    if spec["kind"] == "peaks":
        peaks_child(spec)
        return
    row = Row(**spec["row"])
    time_row(row, spec["extras"], spec["reps"], spec["compiled"], spec["onnx"], spec["device"])
    print(json.dumps(row.results))


def time_row(row: Row, extras: dict[str, str], reps: int, compiled: bool, onnx: bool, device: str = "cpu") -> None:
    dtype = getattr(torch, row.dtype)
    x = torch.randn(row.batch, 3, row.size, row.size, generator=torch.Generator().manual_seed(0)).to(device)
    steps = {}
    for impl in implementations(row, extras, compiled, onnx, device):
        model = build(impl, row.model, dtype, extras, row.task == "train", device=device, batch=row.batch)
        steps[impl] = make_step(model, row.task, x if takes_float32_images(impl) else x.to(dtype))
        for _ in range(2 if row.batch == 1 else 1):
            steps[impl]()
    times: dict[str, list[float]] = {impl: [] for impl in steps}
    # a batch of 1 is quick and noisier: each turn is a block of calls, the first one untimed, since the other
    # implementations' turns leave the caches cold (a model served alone runs warm, call after call)
    block = 5 if row.batch == 1 else 1
    for _ in range(reps):
        for impl, step in steps.items():
            for call in range(block):
                sync(device)
                start = time.perf_counter()
                step()
                sync(device)
                if call or block == 1:
                    times[impl].append(time.perf_counter() - start)
    row.results = {impl: row.batch / statistics.median(t) for impl, t in times.items()}


def memory_row(row: Row, spec: dict[str, Any]) -> None:
    """Peak memory of each implementation of `row`, each in its own fresh process (`spec`: the shared settings)."""
    for impl in implementations(row, spec["extras"], False, spec["onnx"], spec["device"]):
        peak, step = in_child("memory", {**spec, "row": dataclasses.asdict(row), "impl": impl})
        row.memory[impl] = (peak, step)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 2**10  # kB


def memory_child(spec: dict[str, Any]) -> None:
    """Runs in a fresh process: prints [peak RSS over two steps, that peak - RSS before them] in MiB (on a GPU:
    the peak of allocated device memory and its rise over the allocation before the steps)."""
    row, device = Row(**spec["row"]), spec["device"]
    dtype = getattr(torch, row.dtype)
    model = build(spec["impl"], row.model, dtype, spec["extras"], row.task == "train", device=device)
    x = torch.randn(row.batch, 3, row.size, row.size).to(device)
    step = make_step(model, row.task, x if takes_float32_images(spec["impl"]) else x.to(dtype))
    if device != "cpu":
        before = torch.cuda.memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        step()
        step()
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        print(json.dumps([peak, peak - before]))
        return
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what building the model freed, so "before" is honest
    before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark to the current RSS (Linux >= 4.0)
    step()
    step()  # a training step's optimizer state exists from the first step on
    peak = _status_mib("VmHWM")
    print(json.dumps([peak, peak - before]))


# ---- report ----


def table(rows: list[Row], peaks: dict[str, float], macs: dict[tuple[str, int], int], memory: str = "RSS") -> str:
    """The markdown table: img/s, the ratio to transformers in float32 and in the row's dtype, and the fraction of
    the peak (`dtype_peaks`: the best float32 GEMM of torch, NumPy and onnxruntime, or torch's bfloat16 GEMM)."""
    lines = [
        "| model | task | dtype | batch | input | implementation | img/s | vs hf fp32 | vs hf same dtype "
        f"| % GEMM peak | peak {memory} MiB (step) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.note:
            lines.append(f"| {row.model} | {row.task} | {row.dtype} | {row.batch} | {row.size} | {row.note} ||||||")
            continue
        same = row.results.get("hf")
        fp32 = row.results.get("hf-fp32", same if row.dtype == "float32" else None)
        for impl, speed in row.results.items():
            flops = 2 * macs[(row.model, row.size)] * (3 if row.task == "train" else 1)
            peak = peaks["float32" if impl in ("hf-fp32", "ours-ov-int8") else row.dtype]
            frac = f"{100 * speed * flops / 1e9 / peak:.0f}%" if peak else "-"
            ratios = [f"{speed / ref:.2f}x" if ref else "-" for ref in (fp32, same)]
            mem = row.memory.get(impl)
            mem_text = f"{mem[0]:.0f} ({mem[1]:.0f})" if mem else "-"
            lines.append(
                f"| {row.model} | {row.task} | {row.dtype} | {row.batch} | {row.size} | {impl} | {speed:.2f} | "
                f"{ratios[0]} | {ratios[1]} | {frac} | {mem_text} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["cvt_13", "cvt_21"])
    parser.add_argument("--batch", type=int, nargs="+", default=list(INFER_BATCHES), help="inference batch sizes")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per implementation (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--allocator",
        choices=["kept", "glibc"],
        default="kept",
        help="kept: cvt.allocator.keep_freed_memory() in every process (default); glibc: glibc's defaults",
    )
    parser.add_argument("--no-train", action="store_true", help="skip the training-step rows")
    parser.add_argument("--no-infer", action="store_true", help="skip the inference rows")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile inference rows")
    parser.add_argument(
        "--compile-where",
        nargs="+",
        metavar="DTYPE:BATCH",
        help="time the torch.compile implementations only in these inference rows (e.g. float32:1 bfloat16:32)",
    )
    parser.add_argument(
        "--no-onnx", action="store_true", help="leave out the converted backends (ours-ort, ours-ov*, hf-ov, ours-auto)"
    )
    parser.add_argument(
        "--readme",
        action="store_true",
        help="the README's table, bounded (~20 min on 2 cores): CvT-13 and CvT-21 at 224, inference at batch 1 "
        "and 32 in float32 and bfloat16, compiled where it matters, 3 reps, no memory or training rows",
    )
    parser.add_argument(
        "--short",
        action="store_true",
        help="a quick look: CvT-13 at 224, inference at batch 1 and 32, float32 and bfloat16, 2 reps, none compiled",
    )
    parser.add_argument("--markdown", metavar="FILE", help="also write the machine, the peaks and the table to FILE")
    parser.add_argument("--force-bf16", action="store_true", help="time bf16 even without native bf16 kernels")
    parser.add_argument("--extra", action="append", default=[], metavar="LABEL=MODULE:FACTORY")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def apply_presets(args: argparse.Namespace) -> None:
    """The rows of `--readme` and `--short`."""
    if args.readme:
        args.models, args.batch, args.dtypes, args.reps = ["cvt_13", "cvt_21"], [1, 32], ["float32", "bfloat16"], 3
        args.no_train = args.no_memory = True
        # float32 at batch 32 is left uncompiled: there compiling won nothing for either model in earlier runs
        args.compile_where = args.compile_where or ["float32:1", "bfloat16:1", "bfloat16:32"]
    if args.short:
        args.models, args.batch, args.dtypes, args.reps = ["cvt_13"], [1, 32], ["float32", "bfloat16"], 2
        args.no_train = args.no_memory = args.no_compile = True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    apply_presets(args)
    torch.set_num_threads(args.threads)
    device = args.device
    if device != "cpu" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device")
    extras = dict(spec.split("=", 1) for spec in args.extra)
    bf16_ok = native_bf16(device) or args.force_bf16
    host = machine(device)
    print(f"machine: {host}; allocator: {args.allocator}", flush=True)
    gemms = in_child("peaks", {"threads": args.threads, "device": device, "bf16": bf16_ok, "allocator": "glibc"})
    peaks = dtype_peaks(gemms)
    peak_text = "GEMM peaks (2048x2048, best of 20): " + ", ".join(f"{k} {v:.0f}" for k, v in gemms.items())
    print(peak_text + " GFLOP/s", flush=True)

    rows = []
    for name in args.models:
        if not args.no_infer:
            print(check_logits(name, device), flush=True)
            rows += [Row(name, "infer", dt, b, 224) for dt in args.dtypes for b in args.batch]
        if not args.no_train:
            rows += [Row(name, "train", "float32", b, s) for b, s in TRAIN_ROWS]
    macs = {(r.model, r.size): model_cost(cvt.model_config(r.model), (r.size, r.size))[1] for r in rows}
    spec = {
        "extras": extras,
        "threads": args.threads,
        "device": device,
        "allocator": args.allocator,
        "onnx": not args.no_onnx,
    }
    started = time.perf_counter()
    for row in rows:
        if row.dtype == "bfloat16" and not bf16_ok:
            row.note = "not measured: no native bf16 on this CPU (scalar fallback, ~100x slower; --force-bf16)"
        else:
            compiled = not args.no_compile and (
                args.compile_where is None or f"{row.dtype}:{row.batch}" in args.compile_where
            )
            timing = {"row": dataclasses.asdict(row), "reps": args.reps, "compiled": compiled}
            row.results = in_child("time", {**spec, **timing})
            if not args.no_memory:
                memory_row(row, spec)
        print("\n".join(table([row], peaks, macs).splitlines()[2:]), flush=True)
    print()
    memory = "RSS" if device == "cpu" else "GPU"
    report = table(rows, peaks, macs, memory)
    print(report)
    minutes = (time.perf_counter() - started) / 60
    if args.markdown:
        command = " ".join(["benchmarks/bench_models.py", *(sys.argv[1:] if argv is None else argv)])
        header = [
            f"Measured with `{command}` ({minutes:.0f} min): {host}; allocator: {args.allocator}.",
            "",
            f'{peak_text} GFLOP/s. "% GEMM peak" is the model\'s FLOPs per second over the best float32 GEMM '
            f"({peaks['float32']:.0f}) in float32 and int8 rows, over the best bfloat16 GEMM ({peaks['bfloat16']:.0f}) "
            "in bfloat16 rows.",
            "",
        ]
        with open(args.markdown, "w") as f:
            f.write("\n".join(header) + "\n" + report + "\n")
    if args.json:
        with open(args.json, "w") as f:
            result = {
                "machine": host,
                "gemm_gflops": gemms,
                "peaks": peaks,
                "minutes": minutes,
                "rows": [dataclasses.asdict(r) for r in rows],
            }
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
