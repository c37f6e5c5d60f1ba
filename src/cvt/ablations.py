"""The paper's ablations (Wu et al. 2021, Section 4.4, Tables 5-8) as data: each one a set of `CvTConfig` overrides.

Every ablation changes CvT-13 along one axis the paper studies: the learned position embedding, the token embedding
(overlapping convolution vs non-overlapping patches), the stride of the key/value projection, and the projection
method per stage (convolutional vs position-wise linear). `ablation_config("linear_proj")` is the CvT-13 of
Table 8a; `ablation_config("linear_proj", base=small_cfg)` applies the same change to any other CvT.

Paper figures are copied from the paper's tables as printed ("-" where a table has no such column). Two places
where the paper disagrees with itself are kept as printed and noted on the rows: the text of Section 4.4 says k/v
stride 2 costs 0.3% top-1 while Table 7 prints 82.3 vs 81.6 (0.7); and it says linear -> convolutional projection
goes from 80.6% to 81.5% while Table 8 prints 81.6. The paper's "FLOPs" are multiply-accumulates (4.53G for
CvT-13, where our count, which reproduces the authors' code, gives 4.57 GMACs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .config import CvTConfig, reject_unknown_fields

BASELINE = "cvt_13"


@dataclass(frozen=True)
class PaperRow:
    """One row of one of the paper's ablation tables, as printed (None where the table has no such column).

    Attributes:
        table: the table, e.g. "Table 7".
        row: the row letter in that table.
        label: the row's setting in the table's own words.
        params_m: parameters in millions.
        gflops: GFLOPs (in fact GMACs) per 224x224 image.
        top1: ImageNet-1k top-1 (%).
    """

    table: str
    row: str
    label: str
    params_m: float | None = None
    gflops: float | None = None
    top1: float | None = None


@dataclass(frozen=True)
class Ablation:
    """One architecture the paper's ablations train: CvT-13 with `overrides` applied.

    Attributes:
        name: short identifier, used by `cvt ablations` and the study script.
        description: what changes, in words.
        overrides: `CvTConfig` fields to replace; per-stage fields are given for CvT-13's three stages.
        paper: the rows of the paper's tables that trained this architecture (the baseline is in all four).
        spec_params: exact parameter count the spec gives (measured on the authors' code), if any.
        spec_gmacs: GMACs @224 the spec gives, if any.
        note: caveats: where the figures come from, or where the paper contradicts itself.
    """

    name: str
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)
    paper: tuple[PaperRow, ...] = ()
    spec_params: int | None = None
    spec_gmacs: float | None = None
    note: str = ""


# Non-overlapping (ViT-style) patches: kernel == stride, no padding, at CvT-13's strides 4, 2, 2.
_PATCHES = {"embed_kernel": (4, 2, 2), "embed_padding": (0, 0, 0)}

ABLATIONS: tuple[Ablation, ...] = (
    Ablation(
        name=BASELINE,
        description="CvT-13 as released: conv token embedding, conv projection (k/v stride 2), no position embedding",
        paper=(
            PaperRow("Table 5", "f", "CvT-13, pos. emb. N/A", params_m=20, top1=81.6),
            PaperRow("Table 6", "d", "conv. embed, no pos. embed", params_m=20.0, top1=81.6),
            PaperRow("Table 7", "b", "conv. proj. k/v stride 2", params_m=20, gflops=4.53, top1=81.6),
            PaperRow("Table 8", "d", "conv. projection in stages 1, 2, 3", top1=81.6),
        ),
        spec_params=19_997_480,
        spec_gmacs=4.57,
    ),
    Ablation(
        name="pos_embed",
        description="learned position embedding added after the token embedding in every stage",
        overrides={"pos_embed": (True, True, True)},
        paper=(
            PaperRow("Table 5", "c", "CvT-13, pos. emb. every stage", params_m=20, top1=81.5),
            PaperRow("Table 6", "c", "conv. embed + pos. embed", params_m=20.3, top1=81.4),
        ),
        note="Tables 5c and 6c describe the same model and print different top-1 (81.5, 81.4)",
    ),
    Ablation(
        name="pos_embed_first",
        description="learned position embedding in the first stage only",
        overrides={"pos_embed": (True, False, False)},
        paper=(PaperRow("Table 5", "d", "CvT-13, pos. emb. first stage", params_m=20, top1=81.4),),
    ),
    Ablation(
        name="pos_embed_last",
        description="learned position embedding in the last stage only",
        overrides={"pos_embed": (False, False, True)},
        paper=(PaperRow("Table 5", "e", "CvT-13, pos. emb. last stage", params_m=20, top1=81.4),),
    ),
    Ablation(
        name="patch_embed",
        description="non-overlapping patch embedding (kernel = stride = 4, 2, 2, padding 0), no position embedding",
        overrides=dict(_PATCHES),
        paper=(PaperRow("Table 6", "a", "no conv. embed, no pos. embed", params_m=19.5, top1=80.7),),
        note="Section 4.4's text says this drops 0.8% top-1; Table 6 prints 80.7 vs 81.6",
    ),
    Ablation(
        name="patch_embed_pos_embed",
        description="non-overlapping patch embedding plus a learned position embedding in every stage",
        overrides={**_PATCHES, "pos_embed": (True, True, True)},
        paper=(PaperRow("Table 6", "b", "no conv. embed, pos. embed", params_m=19.9, top1=81.1),),
    ),
    Ablation(
        name="kv_stride_1",
        description="convolutional projection with stride 1 for keys and values (no squeezing)",
        overrides={"stride_kv": (1, 1, 1)},
        paper=(PaperRow("Table 7", "a", "conv. proj. k/v stride 1", params_m=20, gflops=6.55, top1=82.3),),
        spec_params=19_997_480,
        spec_gmacs=6.64,
        note="Section 4.4's text says stride 2 costs 0.3% top-1; Table 7 prints 82.3 vs 81.6",
    ),
    Ablation(
        name="linear_proj",
        description="position-wise linear projection for q, k, v in every stage (no conv, no squeezing)",
        overrides={"qkv_method": ("linear", "linear", "linear")},
        paper=(PaperRow("Table 8", "a", "conv. projection in no stage", top1=80.6),),
        note="Section 4.4's text says 80.6 -> 81.5 with conv. projection everywhere; Table 8d prints 81.6",
    ),
    Ablation(
        name="conv_proj_stage1",
        description="convolutional projection in stage 1, position-wise linear projection in stages 2-3",
        overrides={"qkv_method": ("dw_bn", "linear", "linear")},
        paper=(PaperRow("Table 8", "b", "conv. projection in stage 1", top1=80.8),),
    ),
    Ablation(
        name="conv_proj_stage12",
        description="convolutional projection in stages 1-2, position-wise linear projection in stage 3",
        overrides={"qkv_method": ("dw_bn", "dw_bn", "linear")},
        paper=(PaperRow("Table 8", "c", "conv. projection in stages 1, 2", top1=81.0),),
    ),
    Ablation(
        name="avg_proj",
        description="average-pooling projection: k/v through AvgPool2d(3, stride 2, ceil_mode), q unchanged",
        overrides={"qkv_method": ("avg", "avg", "avg")},
        note="an option of the authors' code, not in the paper's tables",
    ),
)

_BY_NAME = {a.name: a for a in ABLATIONS}
PAPER_TABLES = ("Table 5", "Table 6", "Table 7", "Table 8")


def list_ablations() -> list[str]:
    """Names of the ablations, baseline first."""
    return list(_BY_NAME)


def get_ablation(name: str) -> Ablation:
    """The ablation called `name`; an unknown name raises a ValueError listing the known ones."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown ablation {name!r}; known ablations: {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def ablation_config(
    name: str,
    base: CvTConfig | None = None,
    *,
    input_size: tuple[int, int] | None = None,
    **extra: Any,
) -> CvTConfig:
    """The architecture of one ablation.

    Args:
        name: an ablation from `list_ablations()`.
        base: the model to change; CvT-13 by default. Must have three stages.
        input_size: the (H, W) the model is trained at; position embeddings (if any) are laid out for it
            instead of the base's `pos_embed_size`, so no resampling happens at that size.
        **extra: further `CvTConfig` fields to set after the ablation's overrides (e.g. `num_classes=10`).

    Returns:
        `base` with the ablation's overrides (and `extra`) applied.
    """
    ablation = get_ablation(name)
    base = base if base is not None else CvTConfig()
    if base.num_stages != 3:
        raise ValueError(f"the paper's ablations are defined for three stages; the base has {base.num_stages}")
    reject_unknown_fields(CvTConfig, extra, "CvTConfig")
    overrides = {**ablation.overrides, **extra}
    if input_size is not None and "pos_embed_size" not in extra:
        overrides["pos_embed_size"] = tuple(input_size)
    return dataclasses.replace(base, **overrides)


def paper_rows(table: str | None = None) -> list[tuple[PaperRow, Ablation]]:
    """Every (paper row, ablation it trains), in the order of the paper's tables; one table if given."""
    rows = [(row, a) for a in ABLATIONS for row in a.paper if table is None or row.table == table]
    return sorted(rows, key=lambda pair: (pair[0].table, pair[0].row))


def _literal(value: Any) -> str:
    # per-stage values that agree are written once (CvTConfig broadcasts a scalar to every stage)
    if isinstance(value, (tuple, list)) and len(set(value)) == 1:
        value = value[0]
    if isinstance(value, str):
        return value  # a bare word: `cvt train --set` reads what is not a Python literal as a string
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(repr(v) for v in value) + ")"
    return repr(value)


def train_overrides(name: str) -> list[str]:
    """The `cvt train` flags that turn a CvT-13 config into this ablation, quoted for a POSIX shell.

    E.g. `["--set model_kwargs.stride_kv=1"]` for "kv_stride_1"; empty for the baseline.
    """
    flags = []
    for key, value in get_ablation(name).overrides.items():
        text = f"model_kwargs.{key}={_literal(value)}"
        flags.append(f'--set "{text}"' if any(c in text for c in "()' ") else f"--set {text}")
    return flags
