"""The command line's surface: every option documented, one spelling per concept, global options anywhere."""

import argparse

import pytest

from cvt.cli import build_parser, main


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help():
    parser = build_parser()
    missing = []
    for name, sub in {"cvt": parser, **_subparsers(parser)}.items():
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"options without help text: {missing}"


def test_one_spelling_per_concept():
    subs = _subparsers(build_parser())

    def options(name):
        return {s for a in subs[name]._actions for s in a.option_strings}

    for name in ("info", "eval", "predict", "export", "attention", "train"):
        assert "--model" in options(name), name  # the model to use is --model everywhere
    assert "--arch" in options("convert")  # convert's --model named an architecture: now --arch (alias kept)
    for name in ("list", "info", "export", "ablations"):
        assert {"--input-size", "--res"} <= options(name), name  # --input-size, --res its alias
    for name in ("eval", "predict", "export", "attention", "train"):
        assert "--device" in options(name), name
    for name in ("eval", "predict"):
        json_action = next(a for a in subs[name]._actions if "--json" in a.option_strings)
        assert (json_action.nargs, json_action.const, json_action.metavar) == ("?", "-", "FILE"), name


def test_info_takes_model_option_and_the_old_positional(capsys):
    assert main(["info", "--model", "cvt_21", "--input-size", "384"]) == 0
    out = capsys.readouterr().out
    assert "31,622,696" in out and "GMACs @384x384: 24.849" in out  # the spec's figures
    assert main(["info", "cvt_21", "--res", "384"]) == 0
    captured = capsys.readouterr()
    assert "GMACs @384x384: 24.849" in captured.out and "deprecated, use --model cvt_21" in captured.err
    assert main(["info"]) == 2


def test_convert_model_is_a_deprecated_alias_of_arch(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "--arch ARCH, --model ARCH" in capsys.readouterr().out
    args = build_parser().parse_args(["convert", "a", "b", "--to", "cvt", "--model", "cvt_13"])
    assert args.arch == "cvt_13" and "--model is deprecated here, use --arch" in capsys.readouterr().err


def test_json_option_refuses_a_non_json_target(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--model", "m", "--json", "photo.jpg", "more.jpg"])  # would have overwritten photo.jpg
    assert exit_info.value.code == 2 and "takes a .json file or '-'" in capsys.readouterr().err


def test_verbose_after_the_sub_command():
    assert build_parser().parse_args(["configs", "-v"]).verbose is True
    assert build_parser().parse_args(["-v", "configs"]).verbose is True
    assert build_parser().parse_args(["configs"]).verbose is False


def test_train_device_option(tmp_path):
    from cvt.cli.train import build_config

    args = build_parser().parse_args(["train", "--config", "demo", "--device", "cpu", "--output", str(tmp_path)])
    assert build_config(args).device == "cpu"


@pytest.mark.parametrize("name", ["info", "export"])
def test_input_size_is_n_or_h_w_for_every_command(name, capsys):
    # before: parsed twice with different checks (export refused 3 values only when run, info after parsing)
    base = [name, "--model", "cvt_13", *(["--output", "m.onnx"] if name == "export" else [])]
    assert build_parser().parse_args([*base, "--input-size", "384"]).input_size == (384, 384)
    assert build_parser().parse_args([*base, "--res", "224", "192"]).input_size == (224, 192)
    assert build_parser().parse_args(base).input_size is None
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*base, "--input-size", "1", "2", "3"])
    assert exit_info.value.code == 2 and "--input-size takes N or H W, got 1 2 3" in capsys.readouterr().err
