"""Data: datasets (folder, CSV list, tar shards), robust decoding, the authors' augmentation recipe, Mixup/CutMix,
a generated dataset, and scikit-learn's digits as image files.

    from cvt.data import open_dataset, create_train_transform, Mixup, SoftTargetCrossEntropy
    train = open_dataset("data/shapes", split="train", transform=create_train_transform(64))
    transform = create_transform(**resolve_data_config(model=model))   # timm's style: the model's eval transform
"""

from .auto_augment import RandAugment, RandAugmentConfig, rand_augment_transform
from .datasets import FolderDataset, ImageDataset, ListDataset, open_dataset
from .decode import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, UnreadableImageError, is_image_file, load_image
from .digits import make_digits
from .mixup import Mixup, SoftTargetCrossEntropy, one_hot_smooth
from .resolve import create_transform, resolve_data_config, resolve_model_data_config
from .seeding import rng_scope, sample_seed
from .shards import TarShardDataset, expand_braces, expand_shards, index_shards, write_shards
from .synthetic import make_dataset
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomErasing,
    RandomResizedCrop,
    create_eval_transform,
    create_train_transform,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "FolderDataset",
    "ImageDataset",
    "ListDataset",
    "Mixup",
    "RandAugment",
    "RandAugmentConfig",
    "RandomErasing",
    "RandomResizedCrop",
    "SoftTargetCrossEntropy",
    "TarShardDataset",
    "UnreadableImageError",
    "create_eval_transform",
    "create_train_transform",
    "create_transform",
    "expand_braces",
    "expand_shards",
    "index_shards",
    "is_image_file",
    "load_image",
    "make_dataset",
    "make_digits",
    "one_hot_smooth",
    "open_dataset",
    "rand_augment_transform",
    "resolve_data_config",
    "resolve_model_data_config",
    "rng_scope",
    "sample_seed",
    "write_shards",
]
