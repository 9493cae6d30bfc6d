"""adaLN-single modulation: LayerNorm (no affine) * (1 + scale) + shift, optionally after the gated residual
x + gate * y, in one pass over the tokens. Triton kernel + PyTorch twin.

shift, scale, gate are per sample: (B, C) or (B, 1, C) (strided views such as the chunks of
scale_shift_table[None] + t.reshape(B, 6, C) are fine; a leading 1 broadcasts over the batch).
The kernel keeps a whole row of C (up to 8192) in registers: one program per token, statistics in float32.
(A plain gated residual with no norm after it is one torch.addcmul(x, gate, y): one pass already.)
"""
import torch
import torch.nn.functional as F

from . import HAS_TRITON, size_free, triton, tl, upcast, use_triton

if HAS_TRITON:
    @triton.jit(**size_free(sizes=["N"]))
    def _adaln_kernel(x_ptr, y_ptr, g_ptr, shift_ptr, scale_ptr, r_ptr, o_ptr, N, C, eps,
                      sxb, sxn, syb, syn, sgb, sshb, sscb, srb, srn, sob, son,
                      BLOCK_C: tl.constexpr, RESIDUAL: tl.constexpr):
        row = tl.program_id(0)
        b, n = (row // N).to(tl.int64), row % N
        c = tl.arange(0, BLOCK_C)
        live = c < C
        x = tl.load(x_ptr + b * sxb + n * sxn + c, mask=live, other=0.0).to(tl.float32)
        if RESIDUAL:  # x + gate * y, stored rounded; the norm sees exactly what is stored
            y = tl.load(y_ptr + b * syb + n * syn + c, mask=live, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + b * sgb + c, mask=live, other=0.0).to(tl.float32)
            r = (x + g * y).to(r_ptr.dtype.element_ty)
            tl.store(r_ptr + b * srb + n * srn + c, r, mask=live)
            x = r.to(tl.float32)
        mean = tl.sum(x, axis=0) / C
        xc = tl.where(live, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / C + eps)
        shift = tl.load(shift_ptr + b * sshb + c, mask=live, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + b * sscb + c, mask=live, other=0.0).to(tl.float32)
        out = xc * rstd * (1.0 + scale) + shift
        tl.store(o_ptr + b * sob + n * son + c, out.to(o_ptr.dtype.element_ty), mask=live)


def _per_sample(t, B, C, name):  # (B, C) | (B, 1, C) | (1, C) | (C,) -> (B, C) view (batch stride 0 when shared)
    if t.numel() not in (C, B * C) or t.shape[-1] != C:
        raise ValueError(f"adaln: {name} must be (B, C) or (B, 1, C) with B={B}, C={C}; got {tuple(t.shape)}")
    return t.reshape(-1, C).expand(B, C)


def _check(x, name="x"):
    if x.ndim != 3:
        raise ValueError(f"adaln expects {name} of shape (B, N, C), got {tuple(x.shape)}")


def adaln_torch(x, shift, scale, eps=1e-6):
    """Twin: LayerNorm(x) over C (no affine) * (1 + scale) + shift; x (B, N, C) -> (B, N, C) in x's dtype,
    computed in float32."""
    _check(x)
    B, _, C = x.shape
    shift, scale = _per_sample(shift, B, C, "shift"), _per_sample(scale, B, C, "scale")
    x32 = upcast(x)
    out = F.layer_norm(x32, (C,), eps=eps) * (1 + scale.to(x32.dtype)[:, None]) + shift.to(x32.dtype)[:, None]
    return out.to(x.dtype)


def gated_residual_adaln_torch(x, y, gate, shift, scale, eps=1e-6):
    """Twin: r = x + gate * y (rounded to x's dtype), then adaln(r, shift, scale). Returns (r, adaln(r))."""
    _check(x)
    _check(y, "y")
    B, _, C = x.shape
    gate = _per_sample(gate, B, C, "gate")
    x32 = upcast(x)
    r = (x32 + gate.to(x32.dtype)[:, None] * y.to(x32.dtype)).to(x.dtype)
    return r, adaln_torch(r, shift, scale, eps)


def _launch(x, y, gate, shift, scale, eps, residual, num_warps=None):
    _check(x)
    B, N, C = x.shape
    if x.stride(2) != 1:
        x = x.contiguous()
    shift, scale = _per_sample(shift, B, C, "shift"), _per_sample(scale, B, C, "scale")
    shift = shift if shift.stride(1) == 1 else shift.contiguous()
    scale = scale if scale.stride(1) == 1 else scale.contiguous()
    out = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    if residual:
        _check(y, "y")
        if y.shape != x.shape:
            raise ValueError(f"gated_residual_adaln: y {tuple(y.shape)} must match x {tuple(x.shape)}")
        y = y if y.stride(2) == 1 else y.contiguous()
        gate = _per_sample(gate, B, C, "gate")
        gate = gate if gate.stride(1) == 1 else gate.contiguous()
        r = torch.empty_like(out)
    else:
        y, gate, r = x, shift, out  # unused placeholders
    block = triton.next_power_of_2(C)
    num_warps = num_warps or (4 if block <= 4096 else 8)  # measured on H100 at C = 2240: 4 beats 8 and 16
    _adaln_kernel[(B * N,)](x, y, gate, shift, scale, r, out, N, C, float(eps),
                            x.stride(0), x.stride(1), y.stride(0), y.stride(1), gate.stride(0),
                            shift.stride(0), scale.stride(0), r.stride(0), r.stride(1), out.stride(0), out.stride(1),
                            BLOCK_C=block, RESIDUAL=residual, num_warps=num_warps)
    return (r, out) if residual else out


def adaln_triton(x, shift, scale, eps=1e-6, **tuning):
    return _launch(x, None, None, shift, scale, eps, residual=False, **tuning)


def gated_residual_adaln_triton(x, y, gate, shift, scale, eps=1e-6, **tuning):
    return _launch(x, y, gate, shift, scale, eps, residual=True, **tuning)


def adaln(x, shift, scale, eps=1e-6):
    """LayerNorm(x) over C without affine, * (1 + scale) + shift. x (B, N, C); shift, scale (B, C) or
    (B, 1, C). Returns (B, N, C) in x's dtype (statistics and modulation in float32)."""
    if use_triton(x, shift, scale):
        return adaln_triton(x, shift, scale, eps)
    return adaln_torch(x, shift, scale, eps)


def gated_residual_adaln(x, y, gate, shift, scale, eps=1e-6):
    """The block seam in one pass: r = x + gate * y (the gated residual, in x's dtype) and
    adaln(r, shift, scale). x, y (B, N, C); gate, shift, scale (B, C) or (B, 1, C). Returns (r, normed)."""
    if use_triton(x, y, gate, shift, scale):
        return gated_residual_adaln_triton(x, y, gate, shift, scale, eps)
    return gated_residual_adaln_torch(x, y, gate, shift, scale, eps)
