"""Optional dependencies: import one, or fail with a message that names the extra that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which `cvt-pytorch[extra]` brings it."""


def require(module: str, *, package: str, extra: str, purpose: str) -> ModuleType:
    """Import `module`, or raise `MissingExtraError` naming `package` and the extra that installs it.

    Args:
        module: what to import, e.g. "onnxruntime" or "sklearn.datasets".
        package: the distribution that provides it, e.g. "scikit-learn".
        extra: the extra of cvt-pytorch that depends on `package`, e.g. "export".
        purpose: what needs it, for the message, e.g. "ONNX export".
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{purpose} needs {package}, which is not installed: pip install 'cvt-pytorch[{extra}]'"
        ) from err
