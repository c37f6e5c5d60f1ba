"""Publishing a model on the Hugging Face hub: `push_to_hub(model, repo_id)` saves it (weights, config, image
processor and model card, `cvt.save_model`) into a temporary folder of its own and uploads that folder with
huggingface_hub, without the marker that makes a folder cvt's locally (`cvt.outputs`).

    cvt.push_to_hub(model, "me/cvt-13-flowers")               # a transformers folder: pipeline() runs it on the hub
    cvt.push_to_hub(model, "me/cvt-demo", format="cvt")       # our format (any architecture, QuickGELU kept)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import save_model
from .outputs import MARKER


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    format: str = "hf",
    results: dict[str, Any] | None = None,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload `model` to the hub repository `repo_id` (created if missing); returns the commit's URL.

    Args:
        model: a `CvT`.
        repo_id: "user/name" or "org/name".
        format: "hf" (transformers' CvtForImageClassification, what the hub's widgets and `pipeline` run; refused
            for architectures transformers cannot run, see `save_model`) or "cvt".
        results: what a run measured, for the model card (`Checkpoint.results` of a training checkpoint).
        token: a hub token; default huggingface_hub's (HF_TOKEN, or `hf auth login`).
        private: create the repository private.
        revision: the branch to commit to.
        commit_message: default "Upload NAME (FORMAT format) with cvt".
    """
    from huggingface_hub import HfApi  # noqa: PLC0415 - only needed to publish

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="cvt-push-") as tmp:
        folder = save_model(model, Path(tmp) / "model", format=format, results=results)
        (folder / MARKER).unlink()  # the staging folder's own bookkeeping, not part of the model
        api.create_repo(repo_id, private=private, exist_ok=True)
        message = commit_message or f"Upload {model.model_name} ({format} format) with cvt"
        commit = api.upload_folder(repo_id=repo_id, folder_path=os.fspath(folder), revision=revision,
                                   commit_message=message)  # fmt: skip
    return str(getattr(commit, "commit_url", commit))


__all__ = ["push_to_hub"]
