"""fp8 (e4m3) activations for fp8 matmuls: one float32 scale per token (row), the quantization done in the
pass that produces the matmul's input. Triton kernel + PyTorch twin.

A row v of C values is stored as q = v / s in float8_e4m3fn with s = max|v| / 448 (e4m3's largest value), so
v ~ q * s; the matmul (torch._scaled_mm, rowwise scales) multiplies the scales back in its epilogue.
One kernel, one program per token with the whole row in registers (C up to 8192, as adaln's), three uses:

    rows_fp8(x)                                   quantize rows: attention outputs, the GLU output
    rows_fp8(x, y, gate)                          r = x + gate * y (stored, x's dtype), then quantize r
    rows_fp8(x, y, gate, shift=, scale=)          r as above (y None: r = x), then adaLN(r) quantized: the input
                                                  of qkv and of the Mix-FFN, never written in bf16

Returns (r or None, q (B, N, C) float8_e4m3fn, s (B, N) float32). A separate PyTorch quantization (abs, amax,
divide, cast: four passes) made fp8 matmuls slower than bf16 on an H200 (issue 20); this is one pass.
"""
import torch
import torch.nn.functional as F

from . import HAS_TRITON, size_free, triton, tl, upcast, use_triton

E4M3_MAX = 448.0
MIN_SCALE = 1e-12  # an all-zero row: q = 0 with a tiny scale, never a division by zero

if HAS_TRITON:
    @triton.jit(**size_free(sizes=["N"]))
    def _rows_fp8_kernel(x_ptr, y_ptr, g_ptr, shift_ptr, scale_ptr, r_ptr, q_ptr, s_ptr, N, C, eps,
                         sxb, sxn, syb, syn, sgb, sshb, sscb,
                         BLOCK_C: tl.constexpr, RESIDUAL: tl.constexpr, NORM: tl.constexpr):
        row = tl.program_id(0)
        b, n = (row // N).to(tl.int64), row % N
        c = tl.arange(0, BLOCK_C)
        live = c < C
        x = tl.load(x_ptr + b * sxb + n * sxn + c, mask=live, other=0.0).to(tl.float32)
        if RESIDUAL:  # x + gate * y, stored rounded; what follows sees exactly what is stored
            y = tl.load(y_ptr + b * syb + n * syn + c, mask=live, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + b * sgb + c, mask=live, other=0.0).to(tl.float32)
            r = (x + g * y).to(r_ptr.dtype.element_ty)
            tl.store(r_ptr + row.to(tl.int64) * C + c, r, mask=live)
            x = r.to(tl.float32)
        if NORM:  # LayerNorm (no affine) * (1 + scale) + shift, float32 statistics
            mean = tl.sum(x, axis=0) / C
            xc = tl.where(live, x - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / C + eps)
            shift = tl.load(shift_ptr + b * sshb + c, mask=live, other=0.0).to(tl.float32)
            scale = tl.load(scale_ptr + b * sscb + c, mask=live, other=0.0).to(tl.float32)
            x = xc * rstd * (1.0 + scale) + shift
        x = tl.where(live, x, 0.0)
        s = tl.maximum(tl.max(tl.abs(x), axis=0) / 448.0, 1e-12)
        q = tl.minimum(tl.maximum(x / s, -448.0), 448.0)
        tl.store(q_ptr + row.to(tl.int64) * C + c, q.to(q_ptr.dtype.element_ty), mask=live)
        tl.store(s_ptr + row, s)


def _per_sample(t, B, C, name):  # (B, C) | (B, 1, C) | (1, C) | (C,) -> (B, C) view (batch stride 0 when shared)
    if t.numel() not in (C, B * C) or t.shape[-1] != C:
        raise ValueError(f"rows_fp8: {name} must be (B, C) or (B, 1, C) with B={B}, C={C}; got {tuple(t.shape)}")
    t = t.reshape(-1, C).expand(B, C)
    return t if t.stride(1) == 1 else t.contiguous()


def _check(x, y, gate, shift, scale):
    if x.ndim != 3:
        raise ValueError(f"rows_fp8 expects x of shape (B, N, C), got {tuple(x.shape)}")
    if (y is None) != (gate is None) or (shift is None) != (scale is None):
        raise ValueError("rows_fp8: pass y with gate, and shift with scale")
    if y is not None and y.shape != x.shape:
        raise ValueError(f"rows_fp8: y {tuple(y.shape)} must match x {tuple(x.shape)}")


def quantize_rows_torch(v):
    """Twin of the quantization alone: float rows (..., C) -> (q float8_e4m3fn, s float32 (...)), float32 math."""
    v = upcast(v)
    s = (v.abs().amax(-1) / E4M3_MAX).clamp_min(MIN_SCALE)
    q = (v / s[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, s.float()


def rows_fp8_torch(x, y=None, gate=None, shift=None, scale=None, eps=1e-6):
    """Twin: (r or None, q, s) as the module docstring says, computed in float32 (the adaLN output unrounded)."""
    _check(x, y, gate, shift, scale)
    B, _, C = x.shape
    r = None
    if y is not None:
        x32 = upcast(x)
        r = (x32 + upcast(_per_sample(gate, B, C, "gate"))[:, None] * upcast(y)).to(x.dtype)
        x = r
    v = upcast(x)
    if shift is not None:
        v = (F.layer_norm(v, (C,), eps=eps) * (1 + upcast(_per_sample(scale, B, C, "scale"))[:, None])
             + upcast(_per_sample(shift, B, C, "shift"))[:, None])
    return (r, *quantize_rows_torch(v))


def rows_fp8_triton(x, y=None, gate=None, shift=None, scale=None, eps=1e-6, num_warps=None):
    _check(x, y, gate, shift, scale)
    B, N, C = x.shape
    x = x if x.stride(2) == 1 else x.contiguous()
    q = torch.empty((B, N, C), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((B, N), dtype=torch.float32, device=x.device)
    residual, norm = y is not None, shift is not None
    if residual:
        y = y if y.stride(2) == 1 else y.contiguous()
        gate = _per_sample(gate, B, C, "gate")
        r = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    else:
        y, gate, r = x, s, x  # unused placeholders
    if norm:
        shift, scale = _per_sample(shift, B, C, "shift"), _per_sample(scale, B, C, "scale")
    else:
        shift = scale = s
    block = triton.next_power_of_2(C)
    # measured on an H200 at 32768 tokens (bench/fp8.py --sweep), plain quantization: C = 2240 2 warps 0.117 ms,
    # 4: 0.121, 8: 0.132; C = 5600 4 warps 0.193 ms, 8: 0.200. With the norm: adaln's 4 warps
    num_warps = num_warps or (4 if residual or norm or block > 4096 else 2)
    _rows_fp8_kernel[(B * N,)](x, y, gate, shift, scale, r, q, s, N, C, float(eps),
                               x.stride(0), x.stride(1), y.stride(0), y.stride(1), gate.stride(0),
                               shift.stride(0), scale.stride(0),
                               BLOCK_C=block, RESIDUAL=residual, NORM=norm, num_warps=num_warps)
    return (r if residual else None), q, s


def rows_fp8(x, y=None, gate=None, shift=None, scale=None, eps=1e-6):
    """x (B, N, C) -> (r, q, s): r = x + gate * y when y is given (else None); q, s: the rows of r (or x), or of
    their adaLN when shift and scale are given, as float8_e4m3fn (B, N, C) times float32 scales (B, N).
    gate, shift, scale: per sample, (B, C) or (B, 1, C)."""
    if use_triton(x):
        return rows_fp8_triton(x, y, gate, shift, scale, eps)
    return rows_fp8_torch(x, y, gate, shift, scale, eps)
