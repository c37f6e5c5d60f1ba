"""Does the installed transformers prepare images as our evaluation transform does? A check run on every Hugging Face
folder we write.

`preprocessor_to_hf` picks the image processor whose settings express our protocol. Whether transformers then
computes it is a fact of its version: 5.x centre-crops at floor((W - w) / 2) in every image processor (its PIL and
torchvision backends alike), where torchvision, timm and our `CenterCrop` round half to even, so on an image whose
margin after resizing is 3 (mod 4) pixels its crop sits one pixel up or left of ours, and no processor setting moves
it back (two floor crops compose to a floor crop). `processor_deviation` runs the folder's processor through
`AutoImageProcessor`, as `pipeline` does, on generated images with each margin modulo 4 and compares the pixels.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import DataConfig
from ..data.transforms import create_eval_transform

logger = logging.getLogger(__name__)

TOLERANCE = 1e-5  # normalised pixels: the same resampling code gives the same values
# measured by benchmarks/processor_agreement.py (README, "Hugging Face processor"): what a one-pixel shift costs
MEASURED = (
    "measured on 104 crops of real photos (15 with such a margin), pipeline() and `cvt predict` agreed on top-1 for "
    "all 104 with random-weight models (tiny and CvT-13), and CvT-13's top-5 order differed for 11 of the 15"
)


def probe_images(data: DataConfig) -> list[Image.Image]:
    """Generated images whose margins after our resize are 0, 1, 2 and 3 pixels along each side in turn."""
    height, width = data.input_size
    if data.crop_mode == "squash":
        base = (height + 37, width + 53)  # any size: there is no crop
    else:
        base = (int(height / data.crop_pct), int(width / data.crop_pct))
    rng = np.random.default_rng(0)
    sizes = [(base[0], base[1] + k) for k in range(4)] + [(base[0] + k, base[1]) for k in range(1, 4)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def processor_deviation(folder: str | Path, data: DataConfig) -> str | None:
    """Why transformers' processor of `folder` does not prepare images as `data` says, or None when it does.

    Args:
        folder: a Hugging Face folder with preprocessor_config.json.
        data: the protocol the processor should compute.

    Returns:
        A one-line explanation with the size of the deviation; None when every probe image matches, or when
        transformers is not installed (then nothing can be checked; logged at info level).
    """
    if importlib.util.find_spec("transformers") is None:
        logger.info("transformers is not installed: the image processor of %s is not checked", folder)
        return None
    import transformers

    processor = transformers.AutoImageProcessor.from_pretrained(str(folder))
    ours = create_eval_transform(data)
    differ, largest = 0, 0.0
    probes = probe_images(data)
    for image in probes:
        theirs = processor(image, return_tensors="pt")["pixel_values"][0]
        mine = ours(image)
        gap = float((theirs - mine).abs().max()) if theirs.shape == mine.shape else float("inf")
        differ += gap > TOLERANCE
        largest = max(largest, gap)
    if not differ:
        return None
    cause = (
        "it centre-crops at floor((W - w) / 2) where cvt, timm and torchvision round, so an image whose margin after "
        "resizing is 3 (mod 4) pixels is cut one pixel up or left, and no processor setting expresses the rounding; "
        f"{MEASURED}"
        if data.crop_mode == "center"
        else "see README, 'Hugging Face processor'"
    )
    return (
        f"transformers {transformers.__version__}'s {type(processor).__name__} prepares {differ} of {len(probes)} "
        f"probe images differently from cvt's evaluation transform (up to {largest:.2f} after normalisation): "
        f"{cause}. `cvt predict` and cvt.load_model(folder) keep the exact protocol"
    )


__all__ = ["processor_deviation", "probe_images"]
