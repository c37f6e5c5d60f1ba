from cvt.cli import main


def test_list(capsys):
    assert main(["list", "--res", "224"]) == 0
    out = capsys.readouterr().out
    assert "| cvt_13 | 19,997,480 | 4.57 |" in out
    assert "| cvt_w24 | 277,196,392 | 60.92 |" in out


def test_info(capsys):
    assert main(["info", "cvt_21", "--res", "384"]) == 0
    out = capsys.readouterr().out
    assert "31,622,696" in out and "GMACs @384x384: 24.849" in out


def test_info_unknown_model(capsys):
    assert main(["info", "cvt_14"]) == 1
    assert "known models: cvt_13" in capsys.readouterr().err
