"""Released weights from the Hugging Face hub: the local cache first, then the network, then a clear way out.

The hub repositories (`microsoft/cvt-13`, ...) hold the authors' weights in transformers' CvT layout: a
`config.json` and `model.safetensors` or `pytorch_model.bin`. Files go through huggingface_hub's own cache
(`HF_HUB_CACHE`, default ~/.cache/huggingface/hub), so a model downloaded once loads offline afterwards.
"""

from __future__ import annotations

import logging
import os
import socket
import urllib.parse
from pathlib import Path

from .checkpoint.formats import CONFIG_FILE, HF_WEIGHT_FILES

logger = logging.getLogger(__name__)


def _fetch(repo_id: str, *, revision: str | None, cache_dir: str | Path | None, local_only: bool) -> Path:
    """Download (or find in the cache) the config and one weights file; returns the snapshot folder."""
    from huggingface_hub import hf_hub_download  # noqa: PLC0415 - only needed for named weights
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError  # noqa: PLC0415

    def get(filename: str) -> Path:
        path = hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=local_only)
        return Path(path)

    config = get(CONFIG_FILE)
    for filename in HF_WEIGHT_FILES:
        try:
            get(filename)
            return config.parent
        except LocalEntryNotFoundError:
            if not local_only:
                raise  # the hub could not be reached and the cache lacks the file
        except EntryNotFoundError:  # the repository has no file of that name: try the next one
            pass
    raise LocalEntryNotFoundError(f"none of {HF_WEIGHT_FILES} in {repo_id}")


PROBE_TIMEOUT_S = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _hub_unreachable(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the hub at `endpoint` cannot be reached (no DNS, no route, refused, timed out), or None if a TCP
    connection opens within `timeout`. huggingface_hub retries a failed request five times with back-off
    (~25 s, a warning each); one probe first makes a machine without network fail at once."""
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None  # only the proxy knows: leave it to huggingface_hub
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname or endpoint, url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{host}:{port} cannot be reached ({err.strerror or type(err).__name__})"


def download_weights(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    official_file: str | None = None,
) -> Path:
    """The local folder holding `config.json` and the weights of a Hugging Face CvT repository.

    Looks in the cache first (no network access when the files are there), then downloads unless
    `HF_HUB_OFFLINE` is set or the hub cannot be reached (one connection attempt of a few seconds, instead of
    huggingface_hub's retries).

    Args:
        repo_id: hub repository, e.g. "microsoft/cvt-13".
        revision: branch, tag or commit; default the main branch.
        cache_dir: hub cache folder; default huggingface_hub's (`HF_HUB_CACHE`).
        official_file: the authors' file name for the same weights, named in the error as the alternative.

    Returns:
        The snapshot folder with `config.json` and `model.safetensors` or `pytorch_model.bin`.

    Raises:
        FileNotFoundError: neither the cache nor the hub has the files; the message says what to do instead.
    """
    from huggingface_hub import constants  # noqa: PLC0415
    from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: PLC0415

    try:
        return _fetch(repo_id, revision=revision, cache_dir=cache_dir, local_only=True)
    except LocalEntryNotFoundError:
        pass
    offline = constants.is_offline_mode()
    where = cache_dir or constants.HF_HUB_CACHE
    unreachable = None if offline else _hub_unreachable(constants.ENDPOINT)
    if unreachable:
        reason = f"the hub {unreachable}"
    elif not offline:
        logger.info("downloading %s from the Hugging Face hub into %s", repo_id, where)
        try:
            return _fetch(repo_id, revision=revision, cache_dir=cache_dir, local_only=False)
        except Exception as err:  # noqa: BLE001 - any network or hub failure ends in the same advice
            reason = f"the hub could not provide them ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    else:
        reason = "HF_HUB_OFFLINE is set"
    alternative = (
        f"download {official_file} from the authors' release (https://github.com/microsoft/CvT) and pass its path, "
        f"e.g. create_model(name, pretrained='path/to/{official_file}')"
        if official_file
        else "pass the path of a checkpoint file or directory instead"
    )
    raise FileNotFoundError(
        f"weights {repo_id} are not in the Hugging Face cache ({where}) and {reason}. "
        f"Connect to the internet once (unset HF_HUB_OFFLINE) to cache them, or {alternative}."
    )
