"""Inference-only rewrites of a CvT model: module swaps that keep its outputs.

`fold_batchnorm` folds each eval-mode BatchNorm of the convolutional projection into the depth-wise convolution
before it; the ONNX/TorchScript export of a plain model uses it alone. `rewrite_for_inference` goes further: it is
the "torch" backend of `cvt.optimize_for_inference` (`cvt.inference`), and its float32 form is what the
"onnxruntime" backend exports. Each rewrite keeps
the model's function exactly (fp32 outputs agree up to rounding) and says below why:

- BatchNorm with running statistics is a per-channel affine map: folded into the convolution's weight and bias.
- The key bias is dropped: it adds `q . b_k` to every score of a query, a constant that softmax ignores.
- The value bias moves into the output projection's bias: each query's attention weights sum to 1, so the
  attended values carry `b_v` unchanged and the projection turns it into `W_p b_v`.
- Projections that read the same tokens ("avg": k and v; "linear": q, k and v) become one matmul.
- QuickGELU `x * sigmoid(1.702 x)` equals `silu(1.702 x) / 1.702`: the 1.702 goes into fc1's weight and bias,
  the 1 / 1.702 into fc2's weight, leaving one in-place SiLU.
- Each block writes its residual stream once: the output projection accumulates into a copy of the residual
  (plus its bias), and the MLP half runs over row chunks whose hidden activations (4x the width) stay in cache and
  accumulate into that copy in place. Without chunks, the hidden tensor of a batch of 32 is 40-100 MB, which
  glibc serves with fresh `mmap`s: every forward pass page-faults it in again, four times over in the activation.
- The first convolution sees its input in channels-last layout, so its output is already in token order.
- With `dtype=torch.bfloat16` weights and activations are bfloat16, while every LayerNorm keeps float32
  parameters and statistics (as the authors' code computes them) and the final norm and head run in float32.

Everything here is traceable with `torch.jit.trace` and `torch.onnx.export`: no Python control flow depends on
tensor values, and under tracing, export or `torch.compile` the MLP runs as one chunk (same numbers).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .model import Attention, Block, ConvEmbed, ConvProjection, CvT, LayerNorm, Mlp, QuickGELU, conv_projector

QUICK_GELU_ALPHA = 1.702
DEFAULT_CHUNK_ELEMENTS = 1 << 21  # hidden activations per MLP chunk: 8 MB in fp32, 4 MB in bf16


@torch.no_grad()
def _fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A convolution computing `bn(conv(x))` with `bn` in eval mode (running statistics)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def fold_batchnorm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every "dw_bn" projection's BatchNorm into its depth-wise convolution (inference only).

    The convolution gains a bias and the BatchNorm becomes `nn.Identity`, so the model computes what it computed
    in eval mode, with the running statistics, one pass fewer over each feature map. The result is put in eval
    mode: a folded model cannot be trained as the original one would be.

    Args:
        model: a `CvT` or any module containing `ConvProjection`s.
        inplace: modify `model` itself instead of a deep copy.

    Returns:
        The folded model (in eval mode).
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    for module in model.modules():
        if isinstance(module, ConvProjection) and isinstance(getattr(module, "bn", None), nn.BatchNorm2d):
            module.conv = _fold_conv_bn(module.conv, module.bn)
            module.bn = nn.Identity()
    return model


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An `nn.Linear` holding copies of `weight` (out, in) and `bias`."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.to(weight.dtype)


def _not_tracing() -> bool:
    return not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())


class InferenceConvEmbed(nn.Module):
    """`ConvEmbed` that feeds its convolution channels-last input of the weights' dtype.

    A channels-last convolution output flattens straight into (B, HW, C) token order, with no transposing copy.
    The weight is stored channels-last too, or oneDNN reorders it on every call (at batch 1 that is 2.0 of the
    4.7 ms of CvT-13's third embedding; nothing measurable at batch 32).
    """

    def __init__(self, embed: ConvEmbed) -> None:
        super().__init__()
        self.proj, self.norm = embed.proj, embed.norm
        weight = self.proj.weight.detach().contiguous(memory_format=torch.channels_last)
        self.proj.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x.to(dtype=self.proj.weight.dtype, memory_format=torch.channels_last))
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, C, H, W) channels-last -> (B, HW, C), a view
        return self.norm(x), (h, w)


class InferenceAttention(nn.Module):
    """`Attention` with BatchNorm folded, the k bias dropped, the v bias moved into `proj`, shared matmuls merged.

    `forward` returns the attention context before the output projection `proj`, which `InferenceBlock` applies
    so that it can accumulate into the residual stream.
    """

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.num_heads, self.num_prefix_tokens, self.scale = attn.num_heads, attn.num_prefix_tokens, attn.scale
        self.conv_proj_q, self.conv_proj_k, self.conv_proj_v = attn.conv_proj_q, attn.conv_proj_k, attn.conv_proj_v
        q, k, v = attn.proj_q, attn.proj_k, attn.proj_v
        bias = attn.proj.bias if v.bias is None else attn.proj.bias + attn.proj.weight @ v.bias
        self.proj = _linear(attn.proj.weight, bias)
        self.proj_q = self.proj_k = self.proj_v = self.proj_kv = self.proj_qkv = None
        if self.conv_proj_k is None:  # "linear": q, k and v all read the normalised tokens
            q_bias = None if q.bias is None else torch.cat((q.bias, q.bias.new_zeros(2 * q.bias.shape[0])))
            self.proj_qkv = _linear(torch.cat((q.weight, k.weight, v.weight)), q_bias)
        elif self.conv_proj_q is None:  # "avg": k and v read the same pooled tokens
            self.proj_q = q
            self.proj_kv = _linear(torch.cat((k.weight, v.weight)), None)
        else:
            self.proj_q, self.proj_k, self.proj_v = q, _linear(k.weight, None), _linear(v.weight, None)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, N, C) -> (B, heads, N, head_dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int], prefix_only: bool = False) -> torch.Tensor:
        """Normalised tokens (B, N, C) -> attention context (B, N, C) before `proj`; (B, prefix, C) with
        `prefix_only`."""
        p = self.num_prefix_tokens
        if self.proj_qkv is not None:
            q, k, v = self.proj_qkv(x).chunk(3, dim=-1)
            q = q[:, :p] if prefix_only else q
        else:
            project = conv_projector(x, hw, p)
            if prefix_only:  # class tokens skip the convolution
                q = self.proj_q(x[:, :p])
            else:
                q = self.proj_q(x if self.conv_proj_q is None else project(self.conv_proj_q))
            if self.proj_kv is not None:
                k, v = self.proj_kv(project(self.conv_proj_k)).chunk(2, dim=-1)
            else:
                k, v = self.proj_k(project(self.conv_proj_k)), self.proj_v(project(self.conv_proj_v))
        x = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v), scale=self.scale)
        return x.transpose(1, 2).flatten(2)  # (B, heads, N, head_dim) -> (B, N, C)


class InferenceMlp(nn.Module):
    """`Mlp` with QuickGELU's 1.702 folded into fc1 and fc2, so the activation is one in-place SiLU."""

    def __init__(self, mlp: Mlp) -> None:
        super().__init__()
        quick = isinstance(mlp.act, QuickGELU)
        alpha = QUICK_GELU_ALPHA if quick else 1.0
        self.fc1 = _linear(mlp.fc1.weight * alpha, mlp.fc1.bias * alpha)
        self.act = nn.SiLU(inplace=True) if quick else mlp.act
        self.fc2 = _linear(mlp.fc2.weight / alpha, mlp.fc2.bias)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """fc1 and the activation: (..., C) -> (..., hidden)."""
        return self.act(self.fc1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden(x))


class InferenceBlock(nn.Module):
    """`Block` for inference: its residual stream is written once, the MLP in cache-sized row chunks.

    Args:
        block: the block to rewrite (its BatchNorms already folded).
        chunk_elements: hidden activations per MLP chunk (rows = chunk_elements // hidden width); 0 for no chunks.
    """

    def __init__(self, block: Block, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> None:
        super().__init__()
        self.norm1, self.attn = block.norm1, InferenceAttention(block.attn)
        self.norm2, self.mlp = block.norm2, InferenceMlp(block.mlp)
        self.chunk_elements = chunk_elements

    def forward(self, x: torch.Tensor, hw: tuple[int, int], prefix_only: bool = False) -> torch.Tensor:
        context = self.attn(self.norm1(x), hw, prefix_only)
        if prefix_only:  # the class tokens' rows alone (see `CvT.forward_features`)
            x = x[:, : self.attn.num_prefix_tokens]
        shape = x.shape
        context = context.flatten(0, 1)  # (B * N, C)
        proj, fc2 = self.attn.proj, self.mlp.fc2
        x = torch.add(x.flatten(0, 1), proj.bias).addmm_(context, proj.weight.t())  # x + proj(context), a new buffer
        rows = max(1, self.chunk_elements // self.mlp.fc1.out_features) if self.chunk_elements else x.shape[0]
        chunks = x.split(rows) if _not_tracing() else (x,)
        for chunk in chunks:  # in place: each chunk of the residual stream gets its MLP while it is in cache
            chunk.addmm_(self.mlp.hidden(self.norm2(chunk)), fc2.weight.t()).add_(fc2.bias)
        return x.view(shape)


class FloatLayerNorm(LayerNorm):
    """LayerNorm that returns float32 whatever its input dtype (the final norm of a bfloat16 model)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


def rewrite_for_inference(
    model: CvT,
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> nn.Module:
    """A copy of `model` rewritten for fast inference; `model` itself is left unchanged.

    See the module docstring for each rewrite. In float32 the logits equal the eval-mode model's up to rounding
    (1e-5 relative). The copy takes images of any floating dtype and returns float32 logits.

    Args:
        model: a `CvT` (any configuration).
        dtype: float32, or bfloat16 to run matmuls, convolutions and attention in bfloat16.
        compile: wrap the result in `torch.compile`; on the CPU with inductor's freezing, which folds the frozen
            weights into the graph and prepacks the linear layers' weights for oneDNN's matmul (JIT AVX-512 kernels
            on any x86 CPU; torch's default float32 GEMM is MKL's, which read 41% of OpenVINO's oneDNN MatMul on
            an AMD EPYC: README, Performance).
        chunk_elements: hidden activations per MLP row chunk; 0 runs each MLP in one piece.

    Returns:
        The rewritten model in eval mode (an `OptimizedModule` around it with `compile`).
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, not {dtype}")
    on_cpu = next(model.parameters()).device.type == "cpu"
    if dtype == torch.bfloat16 and on_cpu and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        warnings.warn(
            "this CPU has no native bfloat16 kernels (oneDNN needs AVX512-BF16 or AMX): torch falls back to scalar "
            "code, far slower than float32",
            stacklevel=2,
        )
    model = fold_batchnorm(model)
    for stage in model.stages:
        stage.patch_embed = InferenceConvEmbed(stage.patch_embed)
        for i, block in enumerate(stage.blocks):
            stage.blocks[i] = InferenceBlock(block, chunk_elements)
    if dtype != torch.float32:
        model.to(dtype)
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.float()  # statistics and affine parameters in float32, as in the authors' code
        norm = FloatLayerNorm(model.norm.normalized_shape, eps=model.norm.eps)
        norm.load_state_dict(model.norm.state_dict())
        model.norm = norm
        model.head.float()
    model.requires_grad_(False)
    if not compile:
        return model
    return torch.compile(model, options={"freezing": True} if on_cpu else None)  # per model: the global stays off


__all__ = [
    "FloatLayerNorm",
    "InferenceAttention",
    "InferenceBlock",
    "InferenceConvEmbed",
    "InferenceMlp",
    "fold_batchnorm",
    "rewrite_for_inference",
]
