"""cvt: CvT (Convolutional vision Transformer) faithful to the authors' code, with training, evaluation and export."""

from . import data  # cvt.data.resolve_data_config / create_transform, as timm.data
from .checkpoint import save_model
from .config import CvTConfig, DataConfig, PretrainedCfg
from .export import export_onnx, export_torchscript
from .factory import create_model, load_model, resolve_model
from .features import CvTFeatures
from .flops import count_macs, count_params, model_cost
from .inference import optimize_for_inference
from .model import CvT
from .publish import push_to_hub
from .variants import list_models, model_config

# imported on first use, with transformers: `import cvt` stays light (`cvt.hf_backbone`)
_LAZY = {"hf_backbone_config": "hf_backbone", "register_transformers": "hf_backbone"}

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

__all__ = [
    "CvT",
    "CvTConfig",
    "CvTFeatures",
    "DataConfig",
    "PretrainedCfg",
    "count_macs",
    "data",
    "count_params",
    "create_model",
    "export_onnx",
    "export_torchscript",
    "hf_backbone_config",
    "list_models",
    "load_model",
    "model_config",
    "model_cost",
    "optimize_for_inference",
    "push_to_hub",
    "register_transformers",
    "resolve_model",
    "save_model",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'cvt' has no attribute {name!r}")
