"""Mix-FFN (GLUMBConv) middle: depthwise 3x3 conv + bias + GLU gating in one pass. Triton kernel + PyTorch twin.

The DiT's Mix-FFN is  Linear C->2H (+bias) -> SiLU -> depthwise 3x3 conv over 2H (+bias, zero padding 1)
-> split (x, gate) -> x * SiLU(gate) -> Linear H->C.  This file is the middle part, on tokens-major
tensors (B, h*w, 2H) -> (B, h*w, H), so the Linears on either side need no transposes. Token n sits at
row n // w, column n % w of the latent grid (diffusers' unflatten(1, (height, width))). The same kernel
takes channels-first (B, 2H, h, w) activations (the DC-AE's GLUMBConv) as a transposed view: it works on
strides.

Kernel: one program per (chunk of `rows` grid rows x BLOCK_X columns, BLOCK_C channels, sample). It walks
down its input rows once, keeping three output rows of float32 accumulators (x and gate) in registers, so
the input is read once from memory (plus 2 halo rows per chunk), the output written once.
"""
import torch
import torch.nn.functional as F

from . import HAS_TRITON, size_free, triton, tl, upcast, use_triton

if HAS_TRITON:
    @triton.jit
    def _w(w_ptr, c, c_live, tap):  # one tap's weights as a float32 (1, BLOCK_C) row
        return tl.load(w_ptr + c * 9 + tap, mask=c_live, other=0.0).to(tl.float32)[None, :]

    @triton.jit
    def _load_row(x_base, r, r_stop, height, width, col, c, c_live, sxn, sxc, hx):
        """Input row r at columns col-1, col, col+1, x and gate halves: six tiles, zero outside the grid."""
        r_col = r + 0 * col                                        # as a tensor: TRITON_INTERPRET mistypes scalar & tensor
        r_ok = (r_col >= 0) & (r_col < height) & (r_col < r_stop)
        ok_l = (r_ok & (col >= 1) & (col <= width))[:, None] & c_live[None, :]
        ok_c = (r_ok & (col < width))[:, None] & c_live[None, :]
        ok_r = (r_ok & (col + 1 < width))[:, None] & c_live[None, :]
        p = x_base + (r * width + col)[:, None] * sxn + c[None, :] * sxc
        return (tl.load(p - sxn, mask=ok_l, other=0.0), tl.load(p - sxn + hx, mask=ok_l, other=0.0),
                tl.load(p, mask=ok_c, other=0.0), tl.load(p + hx, mask=ok_c, other=0.0),
                tl.load(p + sxn, mask=ok_r, other=0.0), tl.load(p + sxn + hx, mask=ok_r, other=0.0))

    @triton.jit
    def _tap(vx, vg, w_top, w_mid, w_bot, g_top, g_mid, g_bot, ax, ag, bx, bg, nx, ng):
        """One dx column of input row r into output rows r-1 (dy=2, bottom taps), r (dy=1), r+1 (dy=0)."""
        vx, vg = vx.to(tl.float32), vg.to(tl.float32)
        return ax + vx * w_bot, ag + vg * g_bot, bx + vx * w_mid, bg + vg * g_mid, nx + vx * w_top, ng + vg * g_top

    def _dwconv_glu(x_ptr, w_ptr, b_ptr, o_ptr, HID, height, width, rows,
                    sxb, sxn, sxc, sob, son, soc,
                    BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr):
        # program: `rows` output rows x BLOCK_X columns x BLOCK_C channels of one sample. It walks down the
        # input rows once; input row r completes output row r-1, adds to row r and starts row r+1, so each
        # input element is loaded once (its dx neighbours hit L1). The 18 taps (x and gate halves) stay in
        # registers, and row r+1 is loaded before row r is computed (the loads are in flight meanwhile).
        n_chunks = tl.cdiv(height, rows)
        pid_yx, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        y0 = (pid_yx % n_chunks) * rows
        col = (pid_yx // n_chunks) * BLOCK_X + tl.arange(0, BLOCK_X)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)                # output channel (x half); gate is c + HID
        c_live = c < HID
        y_end = tl.minimum(y0 + rows, height)
        x_base = x_ptr + b * sxb
        o_base = o_ptr + b * sob
        hx = HID * sxc
        wg = w_ptr + HID * 9                                       # weight (2H, 9): tap dy*3 + dx
        x00, x01, x02 = _w(w_ptr, c, c_live, 0), _w(w_ptr, c, c_live, 1), _w(w_ptr, c, c_live, 2)
        x10, x11, x12 = _w(w_ptr, c, c_live, 3), _w(w_ptr, c, c_live, 4), _w(w_ptr, c, c_live, 5)
        x20, x21, x22 = _w(w_ptr, c, c_live, 6), _w(w_ptr, c, c_live, 7), _w(w_ptr, c, c_live, 8)
        g00, g01, g02 = _w(wg, c, c_live, 0), _w(wg, c, c_live, 1), _w(wg, c, c_live, 2)
        g10, g11, g12 = _w(wg, c, c_live, 3), _w(wg, c, c_live, 4), _w(wg, c, c_live, 5)
        g20, g21, g22 = _w(wg, c, c_live, 6), _w(wg, c, c_live, 7), _w(wg, c, c_live, 8)
        bias_x = tl.load(b_ptr + c, mask=c_live, other=0.0).to(tl.float32)[None, :]
        bias_g = tl.load(b_ptr + HID + c, mask=c_live, other=0.0).to(tl.float32)[None, :]
        zero = tl.zeros((BLOCK_X, BLOCK_C), dtype=tl.float32)
        ax, ag = zero + bias_x, zero + bias_g                      # output row r-1
        bx, bg = zero + bias_x, zero + bias_g                      # output row r
        lx, lg, cx, cg, rx, rg = _load_row(x_base, y0 - 1, y_end + 1, height, width, col, c, c_live, sxn, sxc, hx)
        for r in range(y0 - 1, y_end + 1):
            vlx, vlg, vcx, vcg, vrx, vrg = lx, lg, cx, cg, rx, rg
            lx, lg, cx, cg, rx, rg = _load_row(x_base, r + 1, y_end + 1, height, width, col, c, c_live, sxn, sxc, hx)
            nx, ng = zero + bias_x, zero + bias_g                  # output row r+1
            ax, ag, bx, bg, nx, ng = _tap(vlx, vlg, x00, x10, x20, g00, g10, g20, ax, ag, bx, bg, nx, ng)
            ax, ag, bx, bg, nx, ng = _tap(vcx, vcg, x01, x11, x21, g01, g11, g21, ax, ag, bx, bg, nx, ng)
            ax, ag, bx, bg, nx, ng = _tap(vrx, vrg, x02, x12, x22, g02, g12, g22, ax, ag, bx, bg, nx, ng)
            o = r - 1                                              # complete: store it if it is ours
            o_col = o + 0 * col                                    # as a tensor: TRITON_INTERPRET mistypes scalar & tensor
            keep = ((o_col >= y0) & (o_col < y_end) & (col < width))[:, None] & c_live[None, :]
            dst = o_base + (o * width + col)[:, None] * son + c[None, :] * soc
            tl.store(dst, (ax * ag * tl.sigmoid(ag)).to(o_ptr.dtype.element_ty), mask=keep)
            ax, ag, bx, bg = bx, bg, nx, ng

    # Twice, as linear_attention's kernels: tokens-major (the DiT) with every stride specialised; channels-first
    # (the DC-AE) with the alignment of its H*W-multiple strides dropped, so one compile serves every size.
    _dwconv_glu_kernel = triton.jit(**size_free(sizes=["height", "width", "rows"]))(_dwconv_glu)
    _dwconv_glu_kernel_channels_first = triton.jit(**size_free(
        sizes=["height", "width", "rows"], strides=["sxb", "sxc", "sob", "soc"]))(_dwconv_glu)


def _check(x, weight, bias, height, width):
    if x.ndim != 3 or x.shape[1] != height * width or x.shape[2] % 2:
        raise ValueError(f"depthwise_conv_glu expects x of shape (B, height*width, 2H) with height*width = "
                         f"{height}*{width}; got {tuple(x.shape)}")
    if tuple(weight.shape) != (x.shape[2], 1, 3, 3) or tuple(bias.shape) != (x.shape[2],):
        raise ValueError(f"depthwise_conv_glu expects the depthwise conv weight ({x.shape[2]}, 1, 3, 3) and bias "
                         f"({x.shape[2]},); got {tuple(weight.shape)} and {tuple(bias.shape)}")


def depthwise_conv_glu_torch(x, weight, bias, height, width):
    """Twin: x (B, h*w, 2H) tokens-major (already SiLU'd), weight (2H, 1, 3, 3), bias (2H,) -> (B, h*w, H)
    in x's dtype, computed in float32."""
    _check(x, weight, bias, height, width)
    B, N, C2 = x.shape
    grid = upcast(x).transpose(1, 2).reshape(B, C2, height, width)              # (B, 2H, h, w)
    y = F.conv2d(grid, upcast(weight).to(grid.dtype), upcast(bias).to(grid.dtype), padding=1, groups=C2)
    y, gate = y.chunk(2, dim=1)
    out = (y * F.silu(gate)).flatten(2).transpose(1, 2).to(x.dtype)             # (B, h*w, H)
    return out.contiguous() if x.stride(2) == 1 else out.transpose(1, 2).contiguous().transpose(1, 2)


def depthwise_conv_glu_triton(x, weight, bias, height, width, *, block_x=32, block_c=16, rows=None, num_warps=4,
                              num_stages=2):
    _check(x, weight, bias, height, width)
    B, N, C2 = x.shape
    hid = C2 // 2
    weight, bias = weight.reshape(C2, 9).contiguous(), bias.contiguous()       # (2H, 9): tap dy*3 + dx
    channels_first = x.stride(1) == 1 and x.stride(2) != 1  # a (B, 2H, h, w).flatten(2).transpose(1, 2) view
    if channels_first:  # the output in x's memory order
        out = torch.empty((B, hid, N), dtype=x.dtype, device=x.device).transpose(1, 2)
    else:
        out = torch.empty((B, N, hid), dtype=x.dtype, device=x.device)
    if max(sum((n - 1) * st for n, st in zip(t.shape[1:], t.stride()[1:])) for t in (x, out)) >= 2**31:
        raise ValueError(f"depthwise_conv_glu: {tuple(x.shape)} is too large for one call (32-bit offsets "
                         "within a sample); split the image into tiles")
    # BLOCK_X and BLOCK_C stay fixed (narrow grids mask columns): a choice by size would compile per size class
    tiles = triton.cdiv(width, block_x) * triton.cdiv(hid, block_c) * B
    if rows is None:  # long walks down the grid (fewer halo rows), but at least ~1024 programs to fill the GPU
        rows = 32
        while rows > 4 and triton.cdiv(height, rows) * tiles < 1024:
            rows //= 2
    grid = (triton.cdiv(height, rows) * triton.cdiv(width, block_x), triton.cdiv(hid, block_c), B)
    kernel = _dwconv_glu_kernel_channels_first if channels_first else _dwconv_glu_kernel
    kernel[grid](x, weight, bias, out, hid, height, width, rows, *x.stride(), *out.stride(),
                 BLOCK_X=block_x, BLOCK_C=block_c, num_warps=num_warps, num_stages=num_stages)
    return out


def depthwise_conv_glu(x, weight, bias, height, width):
    """Mix-FFN middle on tokens: x (B, height*width, 2H), the SiLU'd output of the inverted 1x1 conv/Linear;
    weight (2H, 1, 3, 3) and bias (2H,) of the depthwise conv (checkpoint layout). Returns (B, height*width, H):
    conv(x)[:H] * SiLU(conv(x)[H:]), zero padding at the grid's edges.
    Channels-first works too (DC-AE's GLUMBConv): pass x = t.flatten(2).transpose(1, 2) for t (B, 2H, h, w);
    the result is then a view of a channels-first tensor: .transpose(1, 2).unflatten(2, (h, w)) is (B, H, h, w)."""
    if use_triton(x, weight, bias):
        return depthwise_conv_glu_triton(x, weight, bias, height, width)
    return depthwise_conv_glu_torch(x, weight, bias, height, width)
