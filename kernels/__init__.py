"""Triton kernels for SANA's hot paths, each beside a plain PyTorch twin (imported as sana_core.kernels).

Every public function picks the Triton kernel for CUDA tensors when Triton is importable and the
PyTorch twin otherwise (CPU, macOS, Windows without Triton). One switch forces either: the
environment variable SANA_KERNELS=auto|triton|torch (read at import) or set_backend(...) at run time.
Under TRITON_INTERPRET=1 the forced "triton" backend also runs on CPU tensors (that is how CI tests it).

    linear_attention(q, k, v, eps=1e-15, mask=None, *, head_dim=32)   DiT attention, (B, N, C) -> (B, N, C)
    dcae_linear_attention(qkv, head_dim=32, *, eps=1e-15, out=None)   DC-AE attention, (B, G*96, H, W) -> (B, G*32, H, W)
    depthwise_conv_glu(x, weight, bias, height, width)                Mix-FFN middle, (B, N, 2H) -> (B, N, H)
    adaln(x, shift, scale, eps=1e-6)                                  LayerNorm * (1 + scale) + shift, (B, N, C)
    gated_residual_adaln(x, y, gate, shift, scale, eps=1e-6)          (x + gate * y, adaln of it)
    channel_rms_norm(x, weight, bias, eps=1e-5, *, residual=None, relu=False, out=None)
                            DC-AE RMSNorm over C of (B, C, H, W), + residual, ReLU; in place (or into out)
    dequantize_blocks(data, fmt, dtype=torch.float32)                 GGUF Q8_0 ... Q6_K blocks (uint8) -> flat values
    dequantize_fp8(data, scale, dtype=torch.float32)                  fp8 x per-tensor / per-row scale -> dtype
    rows_fp8(x, y=None, gate=None, shift=None, scale=None, eps=1e-6)  (x + gate * y), its rows (or their adaLN)
                                                                      as e4m3 x one scale per token, (B, N, C)
"""
import inspect
import os

import torch

try:  # Triton is optional: the twins below need only PyTorch
    import triton
    import triton.language as tl
    HAS_TRITON = True
except Exception:  # not installed, or a broken install: fall back to the twins
    triton = tl = None
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")
_backend = "auto"


def set_backend(name: str) -> None:
    """'auto': Triton on CUDA tensors when available, else the twin; 'triton' or 'torch': always that one."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r} (check SANA_KERNELS)")
    if name == "triton" and not HAS_TRITON:
        raise RuntimeError("SANA kernel backend 'triton' was asked for but Triton is not importable; "
                           "install triton (Linux) or use 'auto'/'torch'")
    _backend = name


def get_backend() -> str:
    return _backend


def upcast(t):
    """The twins' accumulation dtype: float32, or float64 when given float64 (for references)."""
    return t if t.dtype == torch.float64 else t.float()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors) -> bool:
    """Whether a kernel call on these tensors runs the Triton kernel (True) or the PyTorch twin (False)."""
    if _backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if _backend == "triton":
        if not (on_cuda or _interpreting()):
            raise RuntimeError("SANA kernel backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for "
                               "CPU tests); got tensors on " + ", ".join(sorted({str(t.device) for t in tensors})))
        return True
    return HAS_TRITON and on_cuda


def size_free(sizes=(), strides=()) -> dict:
    """triton.jit options that compile a kernel once for every image size. Triton specialises integer
    arguments on being 1 or a multiple of 16: `sizes` (token counts, H*W) are not specialised at all;
    `strides` that are multiples of H*W (a channels-first tensor's) keep the unit-stride class (coalesced
    loads) but not the multiple-of-16 one. Otherwise the first image whose H*W changes class (1344x704: 924
    latent pixels) recompiles the DC-AE's kernels, ~1.7 s. The price: loads along such a stride are not
    vectorised (the DC-AE attention and GLUMBConv kernels alone up to 2x slower at 4096 px, the decode
    unchanged: docs/performance.md section 10). Triton before 3.2 cannot drop only the second class: those
    strides are then specialised (one compile per class)."""
    options = {"do_not_specialize": list(sizes)}
    if "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters:
        options["do_not_specialize_on_alignment"] = list(strides)
    return options


set_backend(os.environ.get("SANA_KERNELS", "auto").strip().lower() or "auto")

from .linear_attention import (linear_attention, linear_attention_torch, linear_attention_triton,  # noqa: E402
                               dcae_linear_attention, dcae_linear_attention_torch, dcae_linear_attention_triton)
from .mix_ffn import depthwise_conv_glu, depthwise_conv_glu_torch, depthwise_conv_glu_triton  # noqa: E402
from .adaln import (adaln, adaln_torch, adaln_triton,  # noqa: E402
                    gated_residual_adaln, gated_residual_adaln_torch, gated_residual_adaln_triton)
from .rms_norm import channel_rms_norm, channel_rms_norm_torch, channel_rms_norm_triton  # noqa: E402
from .dequant import (dequantize_blocks, dequantize_blocks_torch, dequantize_blocks_triton,  # noqa: E402
                      dequantize_fp8, dequantize_fp8_torch, dequantize_fp8_triton)
from .fp8 import quantize_rows_torch, rows_fp8, rows_fp8_torch, rows_fp8_triton  # noqa: E402
