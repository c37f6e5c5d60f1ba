"""The manifest of a dataset a builder writes (`make_dataset`, `make_digits`): what is there, and whether to rebuild.

A builder writes `root/dataset.json` with its parameters (its `generator` and `version` among them) and
`"complete": false` before the first image, and again with `"complete": true` after the last, so an interrupted
build is redone and a finished one is found again at no cost.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MANIFEST = "dataset.json"
SPLITS = ("train", "val")


def prepare_tree(root: Path, params: dict[str, Any], *, overwrite: bool, what: str) -> bool:
    """Check `root` before a builder writes `params`' dataset there; clear what it may replace.

    Args:
        root: the dataset's directory.
        params: the builder's parameters as its manifest records them, `generator` and `version` included.
        overwrite: replace a finished tree the same builder made at the same version with other parameters.
        what: the dataset in a few words, for messages ("a generated dataset").

    Returns:
        True if `root` already holds a complete tree made with `params` (nothing to write), False if the builder
        should write it (the split folders of an older version or an unfinished build are removed first).

    Raises:
        ValueError: `root` holds another builder's dataset, the same dataset with other parameters (without
            `overwrite`), or files that are no dataset.
    """
    path = root / MANIFEST
    if not path.is_file():
        if root.exists() and any(root.iterdir()):
            raise ValueError(f"{root} is not empty and is not {what}; choose an empty or new directory")
        return False
    try:
        old = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} is not a readable dataset manifest ({err}); delete it or choose another directory"
        ) from err
    if not isinstance(old, dict) or old.get("generator") != params["generator"]:
        found = old.get("generator") if isinstance(old, dict) else None
        raise ValueError(f"{root} holds another dataset ({found}); choose another directory")
    recorded = {k: old.get(k) for k in params}
    if old.get("complete") and recorded == params:
        logger.info("%s already holds %s with these settings; nothing to do", root, what)
        return True
    if old.get("complete") and old.get("version") == params["version"] and not overwrite:
        raise ValueError(
            f"{root} holds {what} with other settings ({recorded}); "
            "pass overwrite=True (--overwrite) to replace it or choose another directory"
        )
    for split in SPLITS:
        shutil.rmtree(root / split, ignore_errors=True)
    return False
