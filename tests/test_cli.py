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


def test_list_prints_precomputed_counts_without_counting(monkeypatch, capsys):
    import cvt.cli.info

    def no_counting(*args, **kwargs):
        raise AssertionError("cvt list counted MACs (seconds per model) instead of using the precomputed table")

    monkeypatch.setattr(cvt.cli.info, "model_cost", no_counting)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "| cvt_13 | 19,997,480 | 4.57 | 16.27 |" in out  # the spec's figures
    assert "| cvt_w24 | 277,196,392 | 60.92 | 194.22 |" in out
