"""Checkpoints in and out: the authors' `.pth`, Hugging Face CvT, and this project's own formats; pure I/O.

Reading turns any supported file into a `Checkpoint`: a state dict in our key layout plus whatever the file says
about the architecture, the evaluation preprocessing and the class names. The format is detected from the content,
never from the file name:

- the authors' release: a bare state dict with keys `stage{i}.…` (also wrapped in {"state_dict": …} or
  {"model": …}, or with DistributedDataParallel's `module.` prefix);
- Hugging Face transformers: a `CvtForImageClassification` / `CvtModel` folder (config.json + model.safetensors
  or pytorch_model.bin), or the weights file alone;
- ours: a folder with `model.safetensors` and a `config.json` {"format": "cvt", "version": 1, …}, or a training
  checkpoint {"format": "cvt.train", "version": 1, "model": …} written by `cvt.train`.

Key conversion is a pure dict -> dict function per foreign layout (a handful of regex rules); every historical
quirk gets one small named repair function. Pickles are read with `weights_only=True`, so a file that carries code
is refused before any of it runs. Building a model from a `Checkpoint` is `cvt.factory`'s job, above this package;
the package knows formats, not the registered variants (`cvt.variants`), which it never imports.

    formats     names, versions, CheckpointError, the recorded metadata
    layouts     key layouts and repairs, strict loading of a state dict
    hf_config   transformers' config.json <-> CvTConfig, preprocessor_config.json <-> DataConfig
    card        the model card (README.md) of a saved folder
    infer       the architecture from the weights' shapes
    safe_load   format sniffing and the safe reader of one weights file
    training    the "cvt.train" training-checkpoint format (its only writer and reader)
    read        any file or folder -> Checkpoint
    save        save_model
"""

from .formats import SAVE_FORMATS, CheckpointError
from .hf_config import config_from_hf, config_to_hf
from .infer import check_config_fits
from .layouts import cvt_to_hf, cvt_to_official, hf_to_cvt, load_state_dict_strict, official_to_cvt
from .read import Checkpoint, checkpoint_files, read_checkpoint
from .save import save_model
from .training import read_training_checkpoint, write_training_checkpoint

# what callers outside the package use; the repairs, format sniffing and file names stay in their modules
__all__ = [
    "SAVE_FORMATS",
    "Checkpoint",
    "CheckpointError",
    "check_config_fits",
    "config_from_hf",
    "config_to_hf",
    "checkpoint_files",
    "cvt_to_hf",
    "cvt_to_official",
    "hf_to_cvt",
    "load_state_dict_strict",
    "official_to_cvt",
    "read_checkpoint",
    "read_training_checkpoint",
    "save_model",
    "write_training_checkpoint",
]
