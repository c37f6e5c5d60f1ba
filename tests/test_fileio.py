import pytest
import torch

from cvt.fileio import atomic_save, atomic_write


def test_atomic_write_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "ckpt.pt"
    atomic_save({"a": torch.ones(2)}, target)
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"partial")
        raise RuntimeError("killed mid-write")
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind
