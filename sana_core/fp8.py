"""fp8 compute (`dtype="fp8_e4m3fn_fast"`, ComfyUI's name): the DiT blocks' matmuls in float8_e4m3fn.

Each block's Linear and 1x1-conv layers (attn.qkv, attn.proj, cross_attn.q_linear, cross_attn.proj,
mlp.inverted_conv, mlp.point_conv: ~97% of the DiT's FLOPs) become Fp8Linear: the weight stored as e4m3 with
one float32 scale per output channel, the activation as e4m3 with one scale per token, multiplied by
torch._scaled_mm (rowwise scales, bf16 out, the scales applied in its epilogue). The activations are quantized
in the pass that produces them (sana_core.kernels.rows_fp8): the adaLN before qkv and the Mix-FFN; a
quantizing pass of its own for the attention outputs and the GLU output (whose kernel holds 16 channels of a
token, not its row, so it cannot know the row's scale). Embedders, t_block, caption k/v and the final layer
keep their dtype (they see few tokens).

fp8 compute trades accuracy for speed. On an H200 (bench/fp8.py, docs/performance.md section 12), 1.6B CFG
step: 0.79x bf16's time at 4096 px, 0.86x at 1024 px (CUDA graph); 3.5-3.8% relative error per layer against
bf16, 7.4% on the final latent of 20 steps. LoRAs merge into weight x scale and are stored back in fp8
(convert_weight / set_weight: ComfyUI's ModelPatcher and sana_core.lora both use them).
Fallback: fp8 tensor cores need CUDA compute capability 8.9 (Ada, Hopper) or newer. Elsewhere (older GPUs,
the CPU) the same layers dequantize their fp8 weights at every call and compute in the activations' dtype
(bf16 on a GPU): the memory of fp8 weights, the speed of bf16 (a message says so at load).
"""
import functools
import logging
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import dequantize_fp8, rows_fp8

log = logging.getLogger(__name__)

FP8_COMPUTE = "fp8_e4m3fn_fast"  # ComfyUI's weight_dtype name for fp8 matmuls
E4M3_MAX = 448.0
BLOCK_LAYERS = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.proj", "mlp.inverted_conv.conv",
                "mlp.point_conv.conv")


class Fp8Rows(NamedTuple):
    """An activation (B, N, C) as fp8 rows: q (B, N, C) float8_e4m3fn, s (B, N) float32; value = q * s."""
    q: torch.Tensor
    s: torch.Tensor


def _capability(index):
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)  # asked at every fp8 layer call
def fp8_unavailable(device) -> str | None:
    """Why fp8 matmuls cannot run on `device` (None: they can)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the DiT runs on the {device.type.upper()}, which has no fp8 matmuls"
    if not hasattr(torch, "_scaled_mm"):
        return f"this PyTorch ({torch.__version__}) has no torch._scaled_mm"
    major, minor = _capability(device.index if device.index is not None else torch.cuda.current_device())
    if (major, minor) < (8, 9):
        return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no fp8 tensor cores "
                f"(they need 8.9: Ada, Hopper or newer)")
    return None


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (N, K) float8_e4m3fn and (N,) float32 scales, one per output channel."""
    w = weight.float()
    scale = (w.abs().amax(1) / E4M3_MAX).clamp_min(1e-12)
    return (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


class Fp8Linear(nn.Module):
    """A Linear (or 1x1 Conv2d) on tokens (..., K) -> (..., N): `weight` float8_e4m3fn in the original layer's
    shape, (N, K) or (N, K, 1, 1), times `scale_weight` (N,) float32, one scale per output channel.
    Takes activations as a tensor (quantized here, one pass) or as Fp8Rows (quantized by their producer).
    Where fp8 matmuls cannot run (fp8_unavailable) it computes with the dequantized weight instead.
    ComfyUI's ModelPatcher treats it as one of its scaled-fp8 cast layers (comfy/ops.py): convert_weight /
    set_weight let it patch LoRAs into weight x scale and store the result back in fp8 (values beyond the
    layer's fp8 range saturate), and a low-VRAM load leaves the weight on the CPU (copied at each call, as
    here always where it is not on the input's device) with its patches as weight_function, applied here."""
    comfy_cast_weights = False  # ComfyUI: True while low-VRAM loading leaves the weight to be cast at each call
    weight_function = []  # ComfyUI's low-VRAM patches: fp8 weight -> patched fp8 weight
    bias_function = []

    def __init__(self, weight, scale, bias):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale_weight = nn.Parameter(scale, requires_grad=False)
        self.bias = bias  # (N,) Parameter or None
        n, k = weight.shape[0], weight[0].numel()
        self.tensor_cores = n % 16 == 0 and k % 16 == 0  # torch._scaled_mm's rule

    @classmethod
    def from_layer(cls, layer: nn.Module) -> "Fp8Linear":
        """From a Linear / 1x1 Conv2d, plain or sana_core.quantized (an e4m3 weight with a per-tensor or
        per-row scale is kept as it is; any other is dequantized and quantized per output channel)."""
        shape = getattr(layer, "weight_shape", None) or layer.weight.shape
        if getattr(layer, "qtype", None) == "fp8_e4m3fn" and not layer.weight_function:  # no patches to bake in
            weight = layer.weight.data.reshape(shape)
            scale = getattr(layer, "scale_weight", None)
            scale = torch.ones((), device=weight.device) if scale is None else scale.data.float()
            scale = scale.expand(shape[0]).contiguous()
        else:
            dense = layer.dequantized_weight(torch.float32, layer.weight.device) if hasattr(
                layer, "dequantized_weight") else layer.weight.float()
            weight, scale = quantize_weight(dense.reshape(shape[0], -1))
        return cls(weight.reshape(shape), scale, layer.bias)

    def fp8_weight(self, device) -> torch.Tensor:
        """The e4m3 weight on device, ComfyUI's on-the-fly patches applied."""
        weight = self.weight.to(device, non_blocking=True)
        for f in self.weight_function:
            weight = f(weight)
        return weight

    def cast_bias(self, device, dtype):
        bias = None if self.bias is None else self.bias.to(device, dtype)
        for f in self.bias_function:
            bias = f(bias)
        return bias

    def dequantized_weight(self, dtype, device) -> torch.Tensor:
        """The weight in the original layer's shape (sana_core.operations.matmul_weight reads it)."""
        return dequantize_fp8(self.fp8_weight(device), self.scale_weight.to(device), dtype)

    def convert_weight(self, weight, inplace=False, **kwargs):
        """ComfyUI: the float value of `weight` (this layer's, as float32) = weight x scale per output channel."""
        scale = self.scale_weight.to(weight.device, weight.dtype).reshape(-1, *[1] * (weight.ndim - 1))
        return weight.mul_(scale) if inplace else weight * scale

    def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
        """ComfyUI: store a (patched) float weight as fp8 with this layer's scales (rounded to nearest; seed,
        for ComfyUI's stochastic rounding, unused). The scales stay: ComfyUI restores only `weight` on unpatching."""
        scale = self.scale_weight.to(weight.device, torch.float32).reshape(-1, *[1] * (weight.ndim - 1))
        q = (weight.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        if return_weight:
            return q
        if inplace_update:
            self.weight.data.copy_(q)
        else:
            self.weight = nn.Parameter(q, requires_grad=False)

    def forward(self, x):
        if isinstance(x, Fp8Rows):
            return self._scaled_mm(x)
        if x.ndim == 4:  # called as a 1x1 conv on a (B, K, h, w) grid (MixFFN's layer-by-layer path)
            out = self.forward(x.flatten(2).transpose(1, 2))
            return out.transpose(1, 2).unflatten(2, x.shape[2:])
        if x.ndim == 3 and takes_fp8_rows(self, x):
            return self._scaled_mm(Fp8Rows(*rows_fp8(x)[1:]))
        return F.linear(x, self.dequantized_weight(x.dtype, x.device).flatten(1), self.cast_bias(x.device, x.dtype))

    def _scaled_mm(self, rows: Fp8Rows):  # -> (..., N) bfloat16
        q, s = rows
        weight, scale = self.fp8_weight(q.device).flatten(1), self.scale_weight.to(q.device)  # (N, K), (N,)
        out = torch._scaled_mm(q.reshape(-1, q.shape[-1]), weight.t(), scale_a=s.reshape(-1, 1), scale_b=scale[None],
                               bias=self.cast_bias(q.device, torch.bfloat16), out_dtype=torch.bfloat16)  # (B*N, N_out)
        return out.reshape(*q.shape[:-1], -1)

    def extra_repr(self):
        return f"{self.weight[0].numel()} -> {self.weight.shape[0]}, fp8_e4m3fn x per-channel scale"


def takes_fp8_rows(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether layer computes x in fp8 (its producer may then hand it over as Fp8Rows, quantized in its own
    pass): an Fp8Linear whose sizes suit the tensor cores, bf16 activations on a GPU with fp8 matmuls."""
    return (isinstance(layer, Fp8Linear) and layer.tensor_cores and x.dtype == torch.bfloat16
            and fp8_unavailable(x.device) is None)


def residual_adaln_fp8(x, residual, shift, scale):
    """transformer.residual_adaln with the adaLN output as Fp8Rows: (x, Fp8Rows), one pass."""
    gate, y = residual if residual is not None else (None, None)
    if y is not None and gate is None:
        gate = x.new_ones(x.shape[-1])
    r, q, s = rows_fp8(x, y, gate, shift, scale)
    return (x if r is None else r), Fp8Rows(q, s)


def use_fp8_compute(model: nn.Module, device=None) -> nn.Module:
    """Make every DiT block's Linear / 1x1-conv layer an Fp8Linear (in place; returns the model). `device`:
    where the model will compute (default: where its weights are), for the fallback message."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    for block in model.blocks:
        for name in BLOCK_LAYERS:
            parent, _, child = name.rpartition(".")
            owner = block.get_submodule(parent)
            if not isinstance(getattr(owner, child), Fp8Linear):  # a second call changes nothing
                setattr(owner, child, Fp8Linear.from_layer(getattr(owner, child)))
    reason = fp8_unavailable(device)
    if reason:
        log.warning("%s: %s, so the DiT computes in %s from its fp8 weights (the memory of fp8, not its speed)",
                    FP8_COMPUTE, reason, model.dtype)
    else:
        log.info("%s: the DiT blocks' matmuls run in fp8 (e4m3) on %s", FP8_COMPUTE, device)
    return model
