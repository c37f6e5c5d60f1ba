"""The model a server runs: its optimized copy for logits, its preprocessing, labels and attention maps.

Blocking work only (decoding, the model, PNG encoding): the server calls it from worker threads.
"""

from __future__ import annotations

import io
import threading

import torch
from PIL import Image
from torch import nn

from ..attention_map import attention_overlay, class_token_attention, denormalize
from ..data import create_eval_transform, load_image
from ..data.decode import DEFAULT_MAX_PIXELS
from ..model import CvT
from ..predict import inference_model


class ServedModel:
    """A CvT ready to answer requests.

    Args:
        model: the model (kept as it is for attention maps; logits come from its `optimize_for_inference` copy).
        name: the name clients address it by.
        backend: the `optimize_for_inference` backend ("auto" routes each batch to the faster one for its size).
        device: where it runs.
        max_pixels: the decompression-bomb guard: encoded images with more pixels are refused before decoding.
    """

    def __init__(
        self,
        model: CvT,
        name: str,
        *,
        backend: str = "auto",
        device: str | torch.device = "cpu",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.model, self.name, self.backend, self.device = model, name, backend, torch.device(device)
        self.fast: nn.Module = inference_model(model, device, optimize=True, backend=backend)
        self.transform = create_eval_transform(model.data_config)
        self.input_shape = (3, *model.data_config.input_size)
        self.num_classes = model.num_classes
        names = model.class_names
        self.labels = [str(n) for n in names] if names else [str(i) for i in range(model.num_classes)]
        self.max_pixels = max_pixels
        self._attention_lock = threading.Lock()  # the attention hooks go on the one model: one map at a time

    def preprocess(self, data: bytes) -> torch.Tensor:
        """An encoded image -> the model's input (3, H, W), as `cvt predict` prepares it.

        Raises:
            cvt.data.UnreadableImageError: not an image, corrupt, or above `max_pixels`.
        """
        return self.transform(load_image(data, name="the image", max_pixels=self.max_pixels))

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 logits (B, classes) on the CPU for a batch of model inputs (B, 3, H, W)."""
        return self.fast(images.to(self.device, torch.float32)).float().cpu()

    def top_k(self, logits: torch.Tensor, k: int) -> list[list[dict[str, float | str]]]:
        """Each row's `k` most probable classes as transformers' image-classification pipeline answers:
        [{"label", "score"}], softmax scores, best first, `k` capped at the number of classes."""
        top = logits.float().softmax(dim=-1).topk(min(k, self.num_classes), dim=-1)
        return [
            [{"label": self.labels[i], "score": p} for p, i in zip(values, indices, strict=True)]
            for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]

    def attention_png(self, data: bytes) -> bytes:
        """The class token's last-block attention (mean of heads) over the preprocessed image, as a PNG."""
        image = self.preprocess(data)
        with self._attention_lock:
            result = class_token_attention(self.model, image[None].to(self.device))
        cfg = self.model.data_config
        overlay = attention_overlay(denormalize(image, cfg.mean, cfg.std), result.mean[0])
        buffer = io.BytesIO()
        Image.fromarray(overlay.numpy(), "RGB").save(buffer, format="PNG")
        return buffer.getvalue()
