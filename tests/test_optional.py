"""Optional dependencies missing, and how the command line reports failures: one line, the right exit code."""

import sys

import pytest

import cvt
import cvt.cli.info
from cvt._optional import MissingExtraError
from cvt.checkpoint import save_model
from cvt.cli import main
from cvt.train.run_dir import RunDir


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    model = cvt.create_model("cvt_13", dims=(16, 32, 48), depths=(1, 1, 1), heads=(1, 1, 2), num_classes=3)
    return save_model(model, tmp_path_factory.mktemp("model") / "tiny")


@pytest.mark.parametrize("module", ["onnx", "onnxscript", "onnxruntime"])
def test_onnx_export_without_the_export_extra(tiny_checkpoint, tmp_path, monkeypatch, capsys, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    code = main(["export", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip().splitlines() == [err.strip()]  # one line, no traceback
    assert f"needs {module}, which is not installed: pip install 'cvt-pytorch[export]'" in err
    assert not (tmp_path / "m.onnx").exists()


def test_tensorboard_without_its_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(MissingExtraError, match=r"tensorboard=True\) needs tensorboard.*'cvt-pytorch\[tensorboard\]'"):
        RunDir(tmp_path / "run", main=True).start({}, tensorboard=True)


def test_unexpected_errors_show_a_traceback_only_with_verbose(monkeypatch, capsys):
    def broken(args):
        raise KeyError("stage9")

    monkeypatch.setattr(cvt.cli.info, "run_list", broken)  # add_parser reads it when main builds the parser
    assert main(["list"]) == 1
    err = capsys.readouterr().err
    assert err == "cvt list: error: KeyError: 'stage9' (cvt list -v shows the traceback)\n"
    assert main(["list", "-v"]) == 1  # -v after the sub-command, as before it
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "raise KeyError" in err
    assert main(["-v", "list"]) == 1 and "Traceback" in capsys.readouterr().err


def test_exit_codes_usage_2_failure_1(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--no-such-option"])
    assert exit_info.value.code == 2  # argparse: a usage error
    assert main(["info", "cvt_14"]) == 1  # a valid command that fails
    assert "known models: cvt_13" in capsys.readouterr().err


def test_arguments_that_cannot_work_together_are_usage_errors(capsys):
    assert main(["train"]) == 2  # parsed, but neither --config, --model nor --resume
    assert (
        capsys.readouterr().err
        == "cvt train: error: pass --config, --model with --data, or --resume with a checkpoint\n"
    )
