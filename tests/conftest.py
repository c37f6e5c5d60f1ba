import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _export_cache(tmp_path_factory):
    """ONNX exports of the "onnxruntime" backend go to one folder per test session, never the user's cache."""
    folder = tmp_path_factory.mktemp("cvt-cache")
    before = os.environ.get("CVT_CACHE_DIR")
    os.environ["CVT_CACHE_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("CVT_CACHE_DIR")
    else:
        os.environ["CVT_CACHE_DIR"] = before


@pytest.fixture
def one_thread():
    """Run the test with one torch thread: on a shared 2-core machine tiny models only wait for a second one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
