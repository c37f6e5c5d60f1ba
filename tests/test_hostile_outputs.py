"""Issue 23, class 1 (outputs that destroy inputs or files that are not ours) and the export options of class 7,
tried as an adversarial user would: every writer (`cvt convert`, `cvt export`, `save_model`, push staging,
`write-shards`, training, `cvt attention`) under one rule, `cvt.outputs`."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from PIL import Image

import cvt
from cvt.cli import main
from cvt.data import make_dataset, open_dataset, write_shards
from cvt.outputs import MARKER, OutputError
from cvt.train import TrainConfig, train

TINY = {"dims": [16, 32, 48], "depths": [1, 2, 3], "heads": [1, 1, 2]}  # transformers' CvT runs it too

pytestmark = pytest.mark.usefixtures("one_thread")


def digest(path):
    """Every file under `path` (or the file itself) -> sha256 of its bytes: what "untouched" means below."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p.relative_to(path) if path.is_dir() else p.name): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}  # fmt: skip


def error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and ".tmp" not in err, err
    return err.splitlines()[-1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """3 classes x 4 training + 2 validation images of 32x32."""
    root = tmp_path_factory.mktemp("data") / "shapes"
    return make_dataset(root, num_classes=3, train_per_class=4, val_per_class=2, image_size=32)


def tiny_config(data, output, **kw):
    base = {"model_kwargs": dict(TINY), "data": str(data), "input_size": 32, "batch_size": 4, "num_workers": 0,
            "epochs": 2, "warmup_epochs": 0, "lr": 1e-3, "amp": "none", "output": str(output),
            "progress": False}  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def run_dir(shapes, tmp_path_factory):
    """A run of two epochs of 3 steps stopped after step 4: best.pt from epoch 1, last.pt a state to resume."""
    out = tmp_path_factory.mktemp("runs") / "x"
    train(tiny_config(shapes, out, max_steps=4))
    return out


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = cvt.create_model("cvt_13", num_classes=3, **TINY).eval()
    model.class_names = ["disk", "ring", "square"]
    return model


@pytest.fixture
def own(tiny_model, tmp_path):
    return cvt.save_model(tiny_model, tmp_path / "own")


# --- class 1: an output that is an input --------------------------------------------------------------------------


def test_convert_onto_its_own_training_checkpoint_is_refused_and_resume_still_works(run_dir, shapes, capsys):
    last = run_dir / "last.pt"
    before = digest(last)
    assert main(["convert", str(last), str(last), "--to", "official"]) == 1
    assert error_line(capsys) == (f"cvt convert: error: the output {last} is the input {last}: writing it would "
                                  "destroy the input; choose another output")  # fmt: skip
    assert digest(last) == before
    # the same file reached through `..`, a symbolic link and a hard link
    (run_dir / "alias.pt").symlink_to(last)
    os.link(last, run_dir / "hard.pt")
    try:
        for other, alias in ((run_dir / ".." / run_dir.name / "last.pt", ""), (run_dir / "alias.pt", " (the same one"),
                             (run_dir / "hard.pt", " (the same one")):  # fmt: skip
            assert main(["convert", str(last), str(other), "--to", "official"]) == 1
            assert f"the output {other} is the input {last}{alias}" in error_line(capsys)
    finally:
        (run_dir / "alias.pt").unlink()
        (run_dir / "hard.pt").unlink()
    assert digest(last) == before
    (run_dir / MARKER).unlink()  # a run directory from before the marker is known by its last.pt
    summary = train(tiny_config(shapes, run_dir, resume="auto"))  # the training state survived
    assert summary["completed"] and summary["global_step"] == 6


def test_export_onto_the_checkpoint_it_reads_is_refused(run_dir, own, capsys):
    best = run_dir / "best.pt"
    before = digest(best)
    assert main(["export", "--model", str(best), "--output", str(best), "--format", "torchscript"]) == 1
    assert f"the output {best} is the input {best}" in error_line(capsys)
    assert digest(best) == before
    # a file of a model folder is part of that input; a new file in the folder is not
    weights = own / "model.safetensors"
    assert main(["export", "--model", str(own), "--output", str(weights), "--format", "torchscript"]) == 1
    assert f"the output {weights} is the input {weights}" in error_line(capsys)
    # a folder output that contains the input
    assert main(["convert", str(weights), str(own), "--to", "cvt"]) == 1
    assert f"the output {own} contains the input {weights}" in error_line(capsys)


def test_convert_a_model_folder_onto_itself_is_refused(own, capsys):
    before = digest(own)
    assert main(["convert", str(own), str(own), "--to", "hf"]) == 1
    assert f"the output {own} is the input {own}" in error_line(capsys)
    assert main(["convert", str(own), str(own / "model.safetensors"), "--to", "official"]) == 1
    assert "is the input" in error_line(capsys)
    assert digest(own) == before


# --- class 1: folders that hold files cvt did not write ----------------------------------------------------------


def test_convert_into_a_folder_of_the_users_files_needs_overwrite(own, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("# my notes\n")
    (folder / "config.json").write_text('{"my": "settings"}\n')
    before = digest(folder)
    assert main(["convert", str(own), str(folder), "--to", "hf"]) == 1
    assert error_line(capsys) == (
        f"cvt convert: error: {folder} holds files cvt did not write (README.md, config.json): choose a new or "
        "empty folder, or pass --overwrite (overwrite=True) to write into it, replacing files of the same names"
    )
    assert digest(folder) == before
    assert main(["convert", str(own), str(folder), "--to", "hf", "--overwrite"]) == 0
    assert cvt.load_model(folder).class_names == ["disk", "ring", "square"]
    assert main(["convert", str(own), str(folder), "--to", "hf"]) == 0  # marked as cvt's now: a rerun needs nothing


def test_rerun_into_a_folder_cvt_wrote_needs_no_overwrite(own, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["convert", str(own), str(out), "--to", "hf"]) == 0
    assert json.loads((out / MARKER).read_text())["format"] == "cvt.output"
    assert main(["convert", str(own), str(out), "--to", "hf"]) == 0
    assert main(["convert", str(own), str(out), "--to", "cvt"]) == 0  # another format, same owner
    assert cvt.checkpoint.read_checkpoint(out).format == "cvt"


def test_a_folder_where_a_file_is_written_is_named_with_what_to_do(own, tmp_path, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    assert main(["convert", str(own), str(folder), "--to", "official"]) == 1
    assert error_line(capsys) == (f"cvt convert: error: {folder} is a folder, and the output here is a file: give a "
                                  f"file path (e.g. {folder / 'model.pth'})")  # fmt: skip
    assert main(["export", "--model", str(own), "--output", str(folder), "--format", "torchscript"]) == 1
    assert f"{folder} is a folder, and the output here is a file: give a file path" in error_line(capsys)
    assert not any(folder.iterdir())
    (tmp_path / "f").write_text("x")
    assert main(["convert", str(own), str(tmp_path / "f" / "m.pth"), "--to", "official"]) == 1
    assert f"{tmp_path / 'f'} is a file, so {tmp_path / 'f' / 'm.pth'} cannot be created" in error_line(capsys)


def test_atomic_write_over_a_folder_names_the_folder_not_a_temporary_file(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError) as info, cvt.fileio.atomic_write(tmp_path / "d") as f:
        f.write(b"x")
    assert str(tmp_path / "d") in str(info.value) and ".tmp" not in str(info.value)
    assert list(tmp_path.iterdir()) == [tmp_path / "d"]


def test_save_model_follows_the_rule(tiny_model, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(OutputError, match=r"holds files cvt did not write \(config.json\)"):
        cvt.save_model(tiny_model, folder)
    assert (folder / "config.json").read_text() == "{}" and sorted(p.name for p in folder.iterdir()) == ["config.json"]
    cvt.save_model(tiny_model, folder, overwrite=True)
    cvt.save_model(tiny_model, folder, format="hf")  # ours from now on
    assert cvt.load_model(folder).class_names == tiny_model.class_names
    with pytest.raises(OutputError, match="is a file, and the output here is a folder"):
        cvt.save_model(tiny_model, folder / "config.json")
    with pytest.raises(OutputError, match="is a folder, and the output here is a file"):
        cvt.save_model(tiny_model, folder, format="official")


def test_push_stages_in_a_folder_of_its_own_and_uploads_no_marker(own, monkeypatch, capsys):
    staged = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False, **kw):
            pass

        def upload_folder(self, *, repo_id, folder_path, **kw):
            staged["folder"] = folder_path
            staged["files"] = sorted(p.name for p in os.scandir(folder_path))
            return "https://huggingface.co/me/x/commit/0"

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    before = digest(own)
    assert main(["push", "--model", str(own), "me/x"]) == 0
    assert staged["files"] == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    assert own.parent.resolve() not in Path(staged["folder"]).resolve().parents  # a temporary folder of its own
    assert digest(own) == before and not os.path.exists(staged["folder"])


# --- class 1: write-shards ----------------------------------------------------------------------------------------


def test_write_shards_never_writes_over_or_around_its_images(shapes, tmp_path, capsys):
    source = tmp_path / "images"
    shutil.copytree(shapes / "train", source)
    before = digest(source)
    assert main(["write-shards", str(source), str(source)]) == 1
    assert f"the output {source} is the input {source}" in error_line(capsys)
    assert main(["write-shards", str(source), str(tmp_path)]) == 1
    assert f"the output {tmp_path} contains the input {source}" in error_line(capsys)
    assert main(["write-shards", str(source), str(source / "disk" / "shards")]) == 1
    assert f"lies inside the dataset {source}" in error_line(capsys)
    dataset = open_dataset(source)
    with pytest.raises(OutputError, match="contains the input"):
        write_shards(dataset.samples, dataset.classes, tmp_path)  # the library sees the images' folders too
    assert digest(source) == before


def test_write_shards_into_a_foreign_folder_needs_overwrite(shapes, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("chapter 1")
    assert main(["write-shards", str(shapes), str(out), "--split", "train"]) == 1
    assert f"{out} holds files cvt did not write (thesis.tex)" in error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert main(["write-shards", str(shapes), str(out), "--split", "train", "--overwrite"]) == 0
    assert main(["write-shards", str(shapes), str(out), "--split", "train", "--shard-size", "5"]) == 0  # ours now
    assert (out / "thesis.tex").read_text() == "chapter 1"
    assert len(open_dataset(out)) == 12 and len(list(out.glob("*.tar"))) == 3
    # a rerun with fewer shards replaces the dataset: the third shard of the last write would not match the manifest
    assert main(["write-shards", str(shapes), str(out), "--split", "train", "--shard-size", "6"]) == 0
    assert len(open_dataset(out)) == 12 and sorted(p.name for p in out.glob("*.tar")) == [
        "shard-000000.tar", "shard-000001.tar"]  # fmt: skip


# --- class 1: training outputs ------------------------------------------------------------------------------------


def test_training_output_equal_to_or_containing_the_data_is_refused(shapes, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    before = digest(data)
    for output, what in ((data, "is the input"), (tmp_path, "contains the input"), (data / "train", "inside")):
        with pytest.raises(OutputError, match=what):
            train(tiny_config(data, output, max_steps=1))
    assert digest(data) == before


def test_training_into_a_foreign_folder_needs_overwrite(shapes, tmp_path, capsys):
    out = tmp_path / "project"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    args = ["train", "--config", "demo", "--data", str(shapes), "--output", str(out)]
    for setting in ("max_steps=1", "input_size=32", "num_workers=0", "progress=False", "batch_size=4"):
        args += ["--set", setting]
    (out / "notes.txt").write_text("keep me")
    assert main(args) == 1
    assert f"{out} holds files cvt did not write (config.json, notes.txt)" in error_line(capsys)
    assert (out / "config.json").read_text() == '{"mine": true}' and len(list(out.iterdir())) == 2
    assert main([*args, "--overwrite"]) == 0  # the run's config.json replaces the user's, the rest is left
    assert json.loads((out / "config.json").read_text())["overwrite"] is True and (out / "last.pt").is_file()
    assert (out / "notes.txt").read_text() == "keep me"


def test_attention_map_never_replaces_its_image(own, tmp_path, capsys):
    image = tmp_path / "cat.png"
    Image.new("RGB", (40, 40), "white").save(image)
    before = digest(image)
    assert main(["attention", "--model", str(own), str(image), "--output", str(image)]) == 1
    assert f"the output {image} is the input {image}" in error_line(capsys)
    assert digest(image) == before


# --- class 7: export options ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [["0"], ["-3"], ["100000"], ["224", "0"]])
def test_export_input_size_out_of_range_is_refused_at_parse_time(own, tmp_path, capsys, size):
    with pytest.raises(SystemExit) as info:
        main(["export", "--model", str(own), "--output", str(tmp_path / "m.onnx"), "--input-size", *size])
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()  # argparse's usage, then one line of error
    assert "Traceback" not in err and lines[0].startswith("usage: cvt export")
    bad = next(s for s in size if not 1 <= int(s) <= 1024)
    assert lines[-1].startswith(f"cvt export: error: argument --input-size/--res: input size {bad} is outside 1-1024")
    assert not (tmp_path / "m.onnx").exists()


def _supported_opsets():
    """The reference: the opsets torch's ONNX exporter writes itself (its operator library's own version up to the
    highest it declares), and the range the installed onnx knows, read here from torch and onnx directly."""
    from torch.onnx import _constants
    from torch.onnx._internal.exporter import _constants as exporter_constants

    return (exporter_constants.TORCHLIB_OPSET, min(_constants.ONNX_MAX_OPSET, onnx.defs.onnx_opset_version()))


@pytest.mark.parametrize("opset", ["1", "0", "-5", "1000"])
def test_export_opset_outside_what_the_exporter_supports_is_refused_at_parse_time(own, tmp_path, capsys, opset):
    low, high = _supported_opsets()
    with pytest.raises(SystemExit) as info:
        main(["export", "--model", str(own), "--output", str(tmp_path / "m.onnx"), "--opset", opset])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --opset: opset {opset} is outside the opsets the installed exporter writes, {low}-{high}" in err
    assert not (tmp_path / "m.onnx").exists()


def test_export_onnx_refuses_an_opset_or_example_size_before_exporting(tiny_model, tmp_path, monkeypatch):
    def no_export(*args, **kwargs):
        raise AssertionError("exported before checking")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    low, high = _supported_opsets()
    with pytest.raises(ValueError, match=f"opset 1 is outside the opsets the installed exporter writes, {low}-{high}"):
        cvt.export_onnx(tiny_model, tmp_path / "n.onnx", opset=1)
    # 16 pixels leave a 1x1 token grid in the last stage, which the exporter would fix as a constant; by hand, the
    # grids are floor((H - 3) / 4) + 1, then floor((g - 1) / 2) + 1 twice: 2 or more from H = 19
    with pytest.raises(ValueError, match=r"input size 16x16 leaves a token grid of \(1, 1\) .* use 19 or more"):
        cvt.export_onnx(tiny_model, tmp_path / "n.onnx", input_size=16)
    assert not (tmp_path / "n.onnx").exists()


@pytest.mark.slow
def test_export_writes_the_opset_asked_for_at_both_ends_of_the_range(tiny_model, tmp_path):
    for opset in _supported_opsets():
        cvt.export_onnx(tiny_model, tmp_path / "m.onnx", opset=opset, input_size=64, check=False)
        model = onnx.load(tmp_path / "m.onnx")
        assert {entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")} == {opset}
