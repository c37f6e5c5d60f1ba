import errno
import json
import os
import stat

import pytest
import torch

from cvt.fileio import atomic_save, atomic_write, write_json


def test_atomic_write_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "ckpt.pt"
    atomic_save({"a": torch.ones(2)}, target)
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"partial")
        raise RuntimeError("killed mid-write")
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


@pytest.fixture
def umask():
    """Set the process umask for the test, restoring it afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["umask022", "umask077", "umask002"])  # fmt: skip
def test_new_files_get_the_umask_mode(tmp_path, umask, mask, expected):
    umask(mask)
    reference = tmp_path / "plain.txt"
    reference.write_text("x")  # what a plain open() gives under this umask: the reference
    assert stat.S_IMODE(reference.stat().st_mode) == expected
    atomic_save({"a": 1}, tmp_path / "ckpt.pt")
    write_json({"a": 1}, tmp_path / "sub" / "summary.json")
    for path in (tmp_path / "ckpt.pt", tmp_path / "sub" / "summary.json"):
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_rewrite_keeps_the_existing_mode(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "metrics.json"
    write_json({"epoch": 1}, target)
    target.chmod(0o640)  # the user's choice
    write_json({"epoch": 2}, target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert json.loads(target.read_text()) == {"epoch": 2}


def test_full_disk_names_the_file_not_the_temporary(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("old\n")
    full = rf"cannot write {path}: No space left on device"
    with pytest.raises(OSError, match=full) as info, atomic_write(path, "w"):
        raise OSError(errno.ENOSPC, "No space left on device")  # what a write on a full disk raises
    assert info.value.errno == errno.ENOSPC
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_every_writer_says_a_failed_write_one_way(tmp_path):
    # before: atomic_write, the training checkpoint and the run directory each worded it (and its advice) their way
    from cvt.fileio import write_error

    full = r"cannot write .*a\.json: No space left on device \(the disk is full: free space"
    with pytest.raises(OSError, match=full), atomic_write(tmp_path / "a.json", "w"):
        raise OSError(errno.ENOSPC, "No space left on device")
    said = write_error(tmp_path / "b", PermissionError(errno.EACCES, "Permission denied"))
    assert isinstance(said, PermissionError) and said.errno == errno.EACCES
    assert str(said.strerror).endswith("(no permission to write there: fix the directory's permissions or choose "
                                       "another output)")  # fmt: skip
    assert write_error(tmp_path / "c", said) is said  # said once, not again by the layer above
