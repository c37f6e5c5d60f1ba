"""The installed distribution: its name, version, license metadata and the data files it ships."""

import importlib.metadata
from importlib.resources import files

import pytest

import cvt
from cvt.cli import main


def test_distribution_name_and_version(capsys):
    # the metadata setuptools wrote at install time is the reference, not the code under test
    assert importlib.metadata.version("cvt-pytorch") == cvt.__version__
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"cvt {importlib.metadata.version('cvt-pytorch')}"


def test_license_metadata():
    meta = importlib.metadata.metadata("cvt-pytorch")
    assert meta["License-Expression"] == "MIT"  # PEP 639, not the deprecated License: text
    assert "LICENSE" in (meta.get_all("License-File") or [])


def test_py_typed_shipped():
    assert files("cvt").joinpath("py.typed").is_file()
