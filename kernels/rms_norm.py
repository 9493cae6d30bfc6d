"""RMSNorm over the channels of (B, C, H, W) images, with affine, then + residual and/or ReLU, in one pass.
Triton kernel + PyTorch twin. The DC-AE's trms2d: its ResBlocks, GLUMBConvs and attentions end in
norm(h) + x, and the decoder head is relu(norm(x)).

    out = x / sqrt(mean_c(x^2) + eps) * weight + bias  (+ residual)  (then ReLU)

In place by default: the result overwrites x (the DC-AE never reuses a pre-norm tensor), so the banded and
tiled decode holds no second copy of its largest tensors; `out=` writes elsewhere. The kernel keeps the
statistics and arithmetic in float32 and rounds once to the output's dtype; the twin is the eager recipe
(fp32 statistic, in-place ops in x's dtype), float64 throughout for float64 inputs.

Kernel: one program per BLOCK_P pixels (h * W + w) of one sample: a [BLOCK_P, BLOCK_C] tile, the sum of
squares reduced over the channel axis. Both layouts are the same kernel through strides; Triton specialises
a stride equal to 1, so each layout compiles with its own contiguous axis coalesced:
  channels-last (channel stride 1): the tile spans whole channel rows (BLOCK_C >= C), x stays in registers;
  NCHW (pixel stride 1): BLOCK_P contiguous pixels of BLOCK_C channels; when C > BLOCK_C a first loop sums
  the squares over channel chunks and a second re-reads the chunks (L1/L2-hot) to normalise them.
Device memory traffic: read x (and the residual), write out: 2-3 passes where the eager recipe makes ~7.
"""
import torch

from . import HAS_TRITON, size_free, triton, tl, use_triton

if HAS_TRITON:
    @triton.jit
    def _finish_tile(x, rstd, c, c_live, live, w_ptr, b_ptr, r_rows, o_rows, o_ptr, src, soc,
                     RESIDUAL: tl.constexpr, RELU: tl.constexpr):
        """One float32 tile x: x * rstd * weight + bias (+ residual) (ReLU), rounded once and stored."""
        w = tl.load(w_ptr + c, mask=c_live, other=0.0).to(tl.float32)
        bias = tl.load(b_ptr + c, mask=c_live, other=0.0).to(tl.float32)
        y = x * rstd[:, None] * w[None, :] + bias[None, :]
        if RESIDUAL:
            y += tl.load(r_rows + c[None, :] * src, mask=live, other=0.0).to(tl.float32)
        if RELU:
            y = tl.maximum(y, 0.0)
        tl.store(o_rows + c[None, :] * soc, y.to(o_ptr.dtype.element_ty), mask=live)

    @triton.jit(**size_free(sizes=["HW"], strides=["sxc", "src", "soc"]))  # NCHW channel stride = HW
    def _channel_rms_norm_kernel(x_ptr, r_ptr, w_ptr, b_ptr, o_ptr, C, HW, eps,
                                 sxb, sxc, sxp, srb, src, srp, sob, soc, sop,
                                 BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ONE_CHUNK: tl.constexpr,
                                 RESIDUAL: tl.constexpr, RELU: tl.constexpr, WIDE: tl.constexpr):
        b = tl.program_id(1).to(tl.int64)
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)     # pixel h * W + w
        p_live = p < HW
        c = tl.arange(0, BLOCK_C)
        if WIDE:  # offsets within a sample reach 2**31: 64-bit index arithmetic
            p = p.to(tl.int64)
            c = c.to(tl.int64)
        x_rows = x_ptr + b * sxb + p[:, None] * sxp                   # (BLOCK_P, 1) row starts
        r_rows = r_ptr + b * srb + p[:, None] * srp
        o_rows = o_ptr + b * sob + p[:, None] * sop
        if ONE_CHUNK:  # the whole channel row in registers: x is read once
            c_live = c < C
            live = p_live[:, None] & c_live[None, :]
            x = tl.load(x_rows + c[None, :] * sxc, mask=live, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / C + eps)      # (BLOCK_P,)
            _finish_tile(x, rstd, c, c_live, live, w_ptr, b_ptr, r_rows, o_rows, o_ptr, src, soc, RESIDUAL, RELU)
        else:  # channel chunks: sum of squares first, then normalise (x re-read from cache; in place is safe)
            ss = tl.zeros((BLOCK_P,), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + c
                live = p_live[:, None] & (cc < C)[None, :]
                x = tl.load(x_rows + cc[None, :] * sxc, mask=live, other=0.0).to(tl.float32)
                ss += tl.sum(x * x, axis=1)
            rstd = 1.0 / tl.sqrt(ss / C + eps)
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + c
                c_live = cc < C
                live = p_live[:, None] & c_live[None, :]
                x = tl.load(x_rows + cc[None, :] * sxc, mask=live, other=0.0).to(tl.float32)
                _finish_tile(x, rstd, cc, c_live, live, w_ptr, b_ptr, r_rows, o_rows, o_ptr, src, soc,
                             RESIDUAL, RELU)


def _check(x, weight, bias, residual, out):
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"channel_rms_norm expects a floating-point x of shape (B, C, H, W), got "
                         f"{tuple(x.shape)} {x.dtype}")
    C = x.shape[1]
    if tuple(weight.shape) != (C,) or tuple(bias.shape) != (C,):
        raise ValueError(f"channel_rms_norm: weight and bias must be ({C},) for x {tuple(x.shape)}; got "
                         f"{tuple(weight.shape)} and {tuple(bias.shape)}")
    for name, t in (("residual", residual), ("out", out)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"channel_rms_norm: {name} {tuple(t.shape)} must have x's shape {tuple(x.shape)}")


def channel_rms_norm_torch(x, weight, bias, eps=1e-5, *, residual=None, relu=False, out=None):
    """Twin: the eager recipe, memory-lean (one (B, 1, H, W) statistic besides the output, written into x
    unless `out` is given); the mean of squares in float32 (float64 for float64 x), the rest in x's dtype."""
    _check(x, weight, bias, residual, out)
    out = x if out is None else out
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rstd = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=acc)          # (B, 1, H, W)
    rstd = rstd.square_().div_(x.shape[1]).add_(eps).rsqrt_()
    torch.mul(x, rstd, out=out)
    torch.addcmul(bias.view(1, -1, 1, 1), out, weight.view(1, -1, 1, 1), out=out)
    if residual is not None:
        out.add_(residual)
    return out.relu_() if relu else out


def _strides(t):
    """(batch, channel, pixel) strides of a (B, C, H, W) tensor whose H, W flatten to one pixel axis
    (any contiguous, channels-last or row-sliced tensor), else None."""
    _, _, H, W = t.shape
    if H > 1 and W > 1 and t.stride(2) != W * t.stride(3):
        return None
    return t.stride(0), t.stride(1), t.stride(3) if W > 1 else t.stride(2)


def channel_rms_norm_triton(x, weight, bias, eps=1e-5, *, residual=None, relu=False, out=None,
                            block_p=None, block_c=None, num_warps=None, wide=None):
    """The kernel; the arguments after `out` are tuning (None: defaults per layout; wide: 64-bit offsets,
    by default when an offset within a sample reaches 2**31)."""
    _check(x, weight, bias, residual, out)
    out = x if out is None else out
    B, C, H, W = x.shape
    strides = [_strides(t) for t in (x, residual if residual is not None else x, out)]
    if None in strides:
        raise ValueError("channel_rms_norm_triton needs tensors whose H, W flatten to one pixel axis "
                         "(contiguous or channels-last, or row slices of those); use channel_rms_norm_torch")
    (sxb, sxc, sxp), (srb, src, srp), (sob, soc, sop) = strides
    # tiles of 8192 elements chosen by layout and C alone: a choice by image size would compile per size class
    cpow = triton.next_power_of_2(C)
    if sxc == 1 or sxp != 1:  # channels-last: whole channel rows
        block_c = block_c or min(cpow, 1024)
        block_p = block_p or max(8192 // block_c, 8)
    else:                     # NCHW: 64-128 bytes of contiguous pixels per channel
        block_p = block_p or (64 if cpow <= 128 else 32)
        block_c = block_c or min(cpow, 8192 // block_p)
    num_warps = num_warps or max(1, min(8, block_p * block_c // 1024))
    if wide is None:
        wide = max(sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:]))
                   for t in (x, out) + ((residual,) if residual is not None else ())) >= 2**31
    weight, bias = weight.contiguous(), bias.contiguous()
    grid = (triton.cdiv(H * W, block_p), B)
    _channel_rms_norm_kernel[grid](x, residual if residual is not None else x, weight, bias, out, C, H * W,
                                   float(eps), sxb, sxc, sxp, srb, src, srp, sob, soc, sop,
                                   BLOCK_P=block_p, BLOCK_C=block_c, ONE_CHUNK=block_c >= C,
                                   RESIDUAL=residual is not None, RELU=bool(relu), WIDE=bool(wide),
                                   num_warps=num_warps)
    return out


def channel_rms_norm(x, weight, bias, eps=1e-5, *, residual=None, relu=False, out=None):
    """RMSNorm over the channels of x (B, C, H, W) with weight and bias (C,), then + residual (B, C, H, W)
    when given, then ReLU when relu: x / sqrt(mean_c(x^2) + eps) * weight + bias (+ residual).
    IN PLACE: writes into x (or into `out`, in its layout) and returns it. Contiguous and channels-last
    tensors take the Triton kernel on CUDA; other layouts, and CPUs, the PyTorch twin."""
    tensors = [t for t in (x, weight, bias, residual, out) if t is not None]
    if use_triton(*tensors) and all(_strides(t) is not None for t in (x, residual, out) if t is not None):
        return channel_rms_norm_triton(x, weight, bias, eps, residual=residual, relu=relu, out=out)
    return channel_rms_norm_torch(x, weight, bias, eps, residual=residual, relu=relu, out=out)
