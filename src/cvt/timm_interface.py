"""timm's model interface, for `CvT`: parameter groups for layer-wise learning rates (`group_matcher`, `layer_ids`).

Kept apart from cvt/model.py, which holds the architecture alone; `CvT` inherits `TimmInterface`'s methods.
The conventions are timm's, as its models document them:

- `group_matcher(coarse)` returns a dict of regular expressions, in order: a parameter belongs to the first entry
  that matches it; the captured numbers (and a suffix) order the groups; a suffix of `MATCH_PREV_GROUP` puts a
  parameter in the group before it; unmatched parameters (the head) form the last group. `coarse=True` gives one
  group per stage, `coarse=False` one per block. As in timm's hierarchical models (ConvNeXt's downsampling), a
  stage's token embedding (and class token) shares the group of its first block; the first stage's embedding is
  the stem, a group of its own, and the final norm joins the last block.
- `layer_ids` numbers those groups 0, 1, ... in that order (timm's `group_parameters(..., reverse=True)`), which is
  what layer-wise learning-rate decay scales by (`cvt.optim.param_groups`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

MATCH_PREV_GROUP = 99999  # a group suffix meaning "the same group as the one before"


def layer_ids(names: Iterable[str], matcher: dict[str, Any]) -> dict[str, int]:
    """The group number of each parameter name under a timm-style `group_matcher` dict (see the module docstring).

    Args:
        names: parameter names, e.g. `name for name, _ in model.named_parameters()`.
        matcher: {group: regex or [(regex, suffix tuple or None), ...] or None}.

    Returns:
        {name: group number}, numbered from 0 in the order the matcher sorts the groups.
    """
    rules = []
    for ordinal, spec in enumerate(matcher.values()):
        if spec is None:
            continue
        for pattern, suffix in [(spec, None)] if isinstance(spec, str) else spec:
            rules.append((re.compile(pattern), ordinal, tuple(suffix or ())))

    def key(name: str) -> tuple[float, ...]:
        for pattern, ordinal, suffix in rules:
            found = pattern.match(name)
            if found:
                return (ordinal, *map(float, found.groups()), *suffix)
        return (float("inf"),)  # unmatched (the head): the last group

    keys = {name: key(name) for name in names}
    number, numbers = -1, {}
    for k in sorted(set(keys.values())):
        if number < 0 or k[-1] != MATCH_PREV_GROUP:
            number += 1
        numbers[k] = number
    return {name: numbers[k] for name, k in keys.items()}


class TimmInterface:
    """timm's model methods over a CvT's `stages` (stage i: `stages.{i}.patch_embed`, `.cls_token`, `.blocks.{j}`),
    `norm` and `head`."""

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regular expressions grouping the parameters by stage (`coarse`) or by block, in timm's format."""
        if coarse:
            blocks: Any = r"^stages\.(\d+)"
        else:
            blocks = [
                (r"^stages\.(\d+)\.(?:patch_embed|cls_token|pos_embed)", (0,)),  # with the stage's first block
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm\.", (MATCH_PREV_GROUP,)),  # the final norm: with the last block
            ]
        return {"stem": r"^stages\.0\.patch_embed", "blocks": blocks}


__all__ = ["MATCH_PREV_GROUP", "TimmInterface", "layer_ids"]
