"""The paper's ablations: every variant builds, and its cost differs from CvT-13 by what is counted here by hand."""

import functools
import importlib.util
import json
import shlex
from pathlib import Path

import pytest
import torch

from cvt.ablations import (
    ABLATIONS,
    BASELINE,
    PAPER_TABLES,
    ablation_config,
    get_ablation,
    list_ablations,
    paper_rows,
    train_overrides,
)
from cvt.cli import main
from cvt.config import CvTConfig
from cvt.flops import count_params, model_cost
from cvt.model import CvT
from cvt.train import apply_overrides, load_config
from cvt.variants import model_config

CVT_13_PARAMS = 19_997_480  # shared/SPEC.md
DIMS, DEPTHS = (64, 192, 384), (1, 2, 10)
GRIDS_224 = (56, 28, 14)  # token grids of the three stages at 224
TINY = CvTConfig(dims=(16, 48, 96), depths=(1, 1, 1))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


@functools.cache
def cost(name: str) -> tuple[int, int]:
    """(params, MACs) of an ablation of CvT-13 at 224, counted once per test session."""
    return model_cost(ablation_config(name), (224, 224))


def meta_params(cfg: CvTConfig) -> int:
    with torch.device("meta"):
        return count_params(CvT(cfg))


# Hand counts of what each ablation adds to (+) or removes from (-) CvT-13 at 224.
POS_EMBED = [g * g * c for g, c in zip(GRIDS_224, DIMS, strict=True)]  # 56*56*64, 28*28*192, 14*14*384
# dw conv (C*3*3, no bias) + BatchNorm (weight, bias) for each of q, k, v, in every block of a stage
CONV_PROJ = [d * 3 * (c * 9 + 2 * c) for c, d in zip(DIMS, DEPTHS, strict=True)]
# patch embedding conv weights: kernel 4/2/2 instead of 7/3/3 (biases unchanged)
PATCH = 64 * 3 * (4 * 4 - 7 * 7) + 192 * 64 * (2 * 2 - 3 * 3) + 384 * 192 * (2 * 2 - 3 * 3)
EXPECTED_DELTA = {
    BASELINE: 0,
    "pos_embed": sum(POS_EMBED),
    "pos_embed_first": POS_EMBED[0],
    "pos_embed_last": POS_EMBED[2],
    "patch_embed": PATCH,
    "patch_embed_pos_embed": PATCH + sum(POS_EMBED),
    "kv_stride_1": 0,
    "linear_proj": -sum(CONV_PROJ),
    "conv_proj_stage1": -(CONV_PROJ[1] + CONV_PROJ[2]),
    "conv_proj_stage12": -CONV_PROJ[2],
    "avg_proj": -sum(CONV_PROJ),  # average pooling has no parameters, and q is not projected spatially
}


def test_hand_counts():
    # the figures the deltas are built from, written out
    assert POS_EMBED == [200_704, 150_528, 75_264] and sum(POS_EMBED) == 426_496
    assert CONV_PROJ == [2_112, 12_672, 126_720]
    assert PATCH == -436_416


def test_every_ablation_has_an_expected_delta():
    assert list_ablations() == list(EXPECTED_DELTA)


@pytest.mark.parametrize("name", list(EXPECTED_DELTA))
def test_param_delta_vs_cvt_13(name):
    assert meta_params(ablation_config(name)) - CVT_13_PARAMS == EXPECTED_DELTA[name]


@pytest.mark.parametrize("name", list(EXPECTED_DELTA))
def test_builds_and_trains_tiny(name):
    # a narrow CvT-13 with one block per stage, at 32x32; position embeddings laid out for 224 get resampled
    cfg = ablation_config(name, TINY, num_classes=5)
    model = CvT(cfg).train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.logsumexp(-1).mean().backward()
    # every parameter trains, except the q projection of the last block, which `forward` leaves out (the head
    # reads the class token, whose query skips the convolution)
    unused = {n for n, p in model.named_parameters() if p.grad is None}
    assert unused <= {f"stages.2.blocks.0.attn.conv_proj_q.{s}" for s in ("conv.weight", "bn.weight", "bn.bias")}
    # token grids: 32 / 4, / 8, / 16 for both overlapping convs and non-overlapping patches
    with torch.no_grad():
        maps = model.eval().forward_intermediates(x, intermediates_only=True)
    assert [tuple(m.shape[-2:]) for m in maps] == [(8, 8), (4, 4), (2, 2)]


def test_ablation_axes():
    patch = ablation_config("patch_embed")
    assert patch.embed_kernel == patch.embed_stride == (4, 2, 2) and patch.embed_padding == (0, 0, 0)
    assert ablation_config("conv_proj_stage1").qkv_method == ("dw_bn", "linear", "linear")
    assert ablation_config("kv_stride_1").stride_kv == (1, 1, 1)
    model = CvT(ablation_config("linear_proj", TINY))
    assert not any("conv_proj" in n for n, _ in model.named_parameters())


def test_kv_stride_1_counts_spec_gmacs():
    params, macs = cost("kv_stride_1")
    assert params == CVT_13_PARAMS
    assert macs / 1e9 == pytest.approx(6.64, rel=0.01)  # spec: 6.64 GMACs; the paper prints 6.55G


def test_mac_deltas_by_hand():
    (_, base), (_, patch) = cost(BASELINE), cost("patch_embed")
    # same output grids, smaller kernels: H*W*C_out*C_in*(k'^2 - k^2) per stage
    assert patch - base == 56 * 56 * 64 * 3 * (16 - 49) + 28 * 28 * 192 * 64 * (4 - 9) + 14 * 14 * 384 * 192 * (4 - 9)
    (_, linear), (_, kv1) = cost("linear_proj"), cost("kv_stride_1")
    # k/v stride 1 attends over the same tokens as linear projection and adds 3 dw convs per block: H*W*C*9 each
    dw = sum(d * 3 * g * g * c * 9 for g, c, d in zip(GRIDS_224, DIMS, DEPTHS, strict=True))
    assert dw == 33_868_800
    assert kv1 - linear == dw


def test_on_a_narrow_base_at_small_size():
    base = CvTConfig(dims=(16, 48, 96), depths=(1, 1, 2), heads=(1, 3, 6), num_classes=10)
    cfg = ablation_config("pos_embed", base, input_size=(32, 32))
    assert cfg.dims == base.dims and cfg.pos_embed_size == (32, 32)
    assert meta_params(cfg) - meta_params(base) == 8 * 8 * 16 + 4 * 4 * 48 + 2 * 2 * 96
    per_stage = dict(mlp_ratio=4.0, embed_kernel=3, embed_stride=2, embed_padding=1, qkv_method="dw_bn", qkv_kernel=3)
    per_stage.update(stride_q=1, stride_kv=2, cls_token=False, pos_embed=False, drop_path_rate=0.0)
    two_stage = CvTConfig(dims=(16, 32), depths=(1, 1), heads=(1, 1), **per_stage)
    with pytest.raises(ValueError, match="three stages"):
        ablation_config("pos_embed", two_stage)


def test_unknown_ablation_lists_known():
    with pytest.raises(ValueError, match="known ablations: cvt_13, pos_embed"):
        get_ablation("no_such")


def test_paper_figures():
    # every table holds the CvT-13 baseline at the spec's 81.6
    for table in PAPER_TABLES:
        assert [r.top1 for r, a in paper_rows(table) if a.name == BASELINE] == [81.6]
    # the spec's summary: linear projection everywhere 80.6 -> 81.6 (Table 8); k/v stride 1 at 6.64 GMACs
    assert [r.top1 for r, _ in paper_rows("Table 8")] == [80.6, 80.8, 81.0, 81.6]
    assert get_ablation("kv_stride_1").spec_gmacs == 6.64
    assert sum(len(a.paper) for a in ABLATIONS) == 4 + 4 + 2 + 4  # rows c-f of Table 5 (a-b are DeiT-S), 6, 7, 8


def test_cli(capsys):
    assert main(["ablations", "--only", "kv_stride_1"]) == 0
    out = capsys.readouterr().out
    assert "| Table 7 | a | conv. proj. k/v stride 1 | kv_stride_1 | 19,997,480 | 0 | 6.64 | +2.08 | 6.64 |" in out
    assert "| 20 | 6.55 | 82.3 | +0.7 |" in out
    assert "| Table 7 | b | conv. proj. k/v stride 2 | cvt_13 | 19,997,480 | 0 | 4.57 | 0 | 4.57 |" in out
    assert main(["ablations", "--only", "nope"]) == 1


@pytest.mark.parametrize("name", list(EXPECTED_DELTA))
def test_train_flags_rebuild_the_ablation(name):
    # the flags `cvt ablations --train-commands` prints, read back by a shell and by `cvt train`'s override parser
    words = shlex.split(" ".join(train_overrides(name)))
    assert words[::2] == ["--set"] * (len(words) // 2)
    cfg = apply_overrides(load_config("cvt_13_224"), words[1::2])
    assert model_config(cfg.model, **cfg.model_kwargs) == ablation_config(name)


def test_cli_train_commands(capsys):
    assert main(["ablations", "--train-commands", "--only", "kv_stride_1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].endswith("--config cvt_13_224 --data /data/imagenet --output runs/ablations/cvt_13")
    assert out[3].endswith("--output runs/ablations/kv_stride_1 --set model_kwargs.stride_kv=1")


def _study_module():
    path = Path(__file__).parents[1] / "benchmarks" / "ablation_study.py"
    spec = importlib.util.spec_from_file_location("ablation_study", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_model_kwargs_rebuild_the_variant():
    study = _study_module()
    cfg = ablation_config("patch_embed", study.study_base([32, 64, 128], [1, 1, 2], [1, 2, 4]), input_size=(48, 48))
    kwargs = study.model_kwargs(cfg)
    assert kwargs == {
        "dims": [32, 64, 128],
        "depths": [1, 1, 2],
        "heads": [1, 2, 4],
        "embed_kernel": [4, 2, 2],
        "embed_padding": [0, 0, 0],
        "pos_embed_size": [48, 48],
        "drop_path_rate": [0.0, 0.0, 0.0],
    }
    assert model_config("cvt_13", **kwargs) == cfg


def test_study_summary_and_table():
    study = _study_module()
    runs = [
        {"variant": v, "final_top1": t, "best_top1": t + 1, "wall_time_s": 10.0 * (i + 1), "params": 5, "gmacs": 0.002}
        for v, tops in (("cvt_13", (60.0, 70.0, 80.0)), ("linear_proj", (50.0, 50.0, 53.0)))
        for i, t in enumerate(tops)
    ]
    base, linear = study.summarise(runs, ["cvt_13", "linear_proj"])
    assert (base["mean"], base["std"], base["min"], base["max"], base["wall_s"]) == (70.0, 10.0, 60.0, 80.0, 20.0)
    assert linear["mean"] == 51.0 and linear["std"] == pytest.approx(3**0.5)  # deviations -1, -1, 2: var 6 / 2
    table = study.markdown_table([base, linear], 48).splitlines()
    assert table[2].startswith("| cvt_13 | 70.0 ± 10.0 | 60.0-80.0 | - | 71.0 | 5 | 2.0 | 20 s | 5f: 81.6, 6d: 81.6")
    assert table[3].startswith("| linear_proj | 51.0 ± 1.7 | 50.0-53.0 | -19.0 | 52.0 | 5 | 2.0 | 20 s | 8a: 80.6 |")


def test_study_peers_row_and_options():
    study = _study_module()
    base = {"variant": "cvt_13", "mean": 97.0, "std": 0.5, "min": 96.5, "max": 97.5, "best_mean": 97.2}
    base.update(params=5, gmacs=0.004, wall_s=20.0)
    peer = {"name": "scikit-learn SVC (RBF, C=1, gamma='scale')", "val_top1": 350 / 355 * 100, "fit_s": 0.06}
    table = study.markdown_table([base], 32, [peer]).splitlines()
    assert table[3] == (
        "| peer: scikit-learn SVC (RBF, C=1, gamma='scale'), raw 8x8 pixels | 98.6 (deterministic) | - | +1.6 "
        "| - | - | - | 0.1 s | - |"
    )
    args = study.parse_args(["--dataset", "digits", "--variants", "all"])
    assert args.variants == list_ablations() and len(args.variants) == 11
    assert (args.image_size, str(args.out)) == (32, "runs/ablation_study/digits")
    assert (args.num_classes, args.train_per_class, args.data_seed) == (None, None, None)  # not recorded as used
    shapes = study.parse_args(["--variants", "kv_stride_1", "cvt_13", "kv_stride_1"])
    assert shapes.variants == ["kv_stride_1", "cvt_13"] and (shapes.image_size, shapes.num_classes) == (48, 4)
    assert shapes.data_seed == 0
    with pytest.raises(SystemExit):
        study.parse_args(["--dataset", "digits", "--num-classes", "4"])  # the digits have a fixed split
    with pytest.raises(SystemExit):
        study.parse_args(["--dataset", "digits", "--data-seed", "1"])
    words = ["--out", "runs/a b", "--seeds", "0", "1"]
    assert shlex.split(study.command_line(words)) == ["python", "benchmarks/ablation_study.py", *words]


def test_study_refuses_a_run_directory_with_other_settings(tmp_path):
    study = _study_module()
    args = study.parse_args(["--out", str(tmp_path), "--epochs", "3"])
    cfg = study.train_config(args, "cvt_13", 0, tmp_path / "data")
    run_dir = Path(cfg.output)
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({**cfg.to_dict(), "epochs": 8}))
    (run_dir / "summary.json").write_text(json.dumps({"completed": True, "final_top1": 50.0}))
    with pytest.raises(SystemExit, match=r"seed0 holds a run with other settings \(epochs\); choose another --out"):
        study.run_one(cfg)
    (run_dir / "config.json").write_text(json.dumps({**cfg.to_dict(), "resume": "auto"}))
    assert study.run_one(cfg)["final_top1"] == 50.0  # the same run, finished: read back, not trained


def _check_study_output(out, variants, seeds):
    record = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in record["runs"]] == [(v, s) for v in variants for s in seeds]
    assert all(0.0 <= r["final_top1"] <= 100.0 and r["wall_time_s"] > 0 for r in record["runs"])
    assert record["train_wall_s"] == pytest.approx(sum(r["wall_time_s"] for r in record["runs"]))
    table = (out / "ablations_table.md").read_text()
    assert all(f"| {v} |" in table for v in variants)
    assert f"command: `{record['command']}`" in table and f"dataset: {record['dataset_label']}" in table
    assert (out / "ablations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return record, table


@pytest.mark.slow
def test_study_end_to_end(tmp_path):
    from cvt.data.synthetic import VERSION

    study = _study_module()
    argv = ["--out", str(tmp_path), "--variants", "cvt_13", "kv_stride_1", "--seeds", "0", "--epochs", "1"]
    argv += ["--num-classes", "2", "--train-per-class", "8", "--val-per-class", "4", "--image-size", "32"]
    argv += ["--batch-size", "8"]
    assert study.main(argv) == 0
    record, table = _check_study_output(tmp_path, ["cvt_13", "kv_stride_1"], [0])
    assert record["command"] == "python benchmarks/ablation_study.py " + shlex.join(argv)
    assert record["dataset"]["version"] == VERSION and f"shapes v{VERSION} " in table
    assert record["peers"] == [] and "peer:" not in table
    summary = tmp_path / "runs" / "cvt_13" / "seed0" / "summary.json"
    stamp = summary.stat().st_mtime_ns
    assert study.main(argv) == 0  # finished runs are read back, not trained again
    assert summary.stat().st_mtime_ns == stamp
    assert "0 run(s) trained, 2 read back" in (tmp_path / "ablations_table.md").read_text()
    with pytest.raises(SystemExit, match="other settings"):  # a changed budget is not mistaken for a finished run
        study.main([*argv, "--lr", "1e-3"])


@pytest.mark.slow
def test_study_end_to_end_on_digits(tmp_path):
    study = _study_module()
    argv = ["--dataset", "digits", "--out", str(tmp_path), "--variants", "linear_proj", "--seeds", "0", "1"]
    argv += ["--epochs", "1", "--image-size", "16", "--dims", "16", "32", "64", "--depths", "1", "1", "1"]
    argv += ["--heads", "1", "1", "2", "--batch-size", "64"]
    assert study.main(argv) == 0
    record, table = _check_study_output(tmp_path, ["linear_proj"], [0, 1])
    assert record["dataset"]["generator"] == "cvt.data.make_digits" and record["dataset"]["version"] == 1
    assert record["dataset"]["images"] == {"train": 1442, "val": 355}
    # scikit-learn's classifiers on the raw 8x8 pixels of the fixed split: 350 and 339 of 355 val images right
    assert [round(p["val_top1"], 2) for p in record["peers"]] == [98.59, 95.49]
    assert "| peer: scikit-learn SVC" in table and "| peer: scikit-learn LogisticRegression" in table
