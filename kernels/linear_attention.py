"""ReLU linear attention (SANA's DiT self-attention and DC-AE's EfficientViT attention): Triton kernel + PyTorch twin.

Per head (dim D = 32), over tokens j:  out_i = sum_j v_j (relu(k_j) . relu(q_i)) / (sum_j relu(k_j) . relu(q_i) + eps)
computed linearly as KV = relu(K)^T V (D x D) and Ksum = sum_j relu(k_j), both in float32:
  pass 1, grid (heads, B, splits): each program reduces one token range of one head into a partial KV, Ksum;
  pass 2, same grid: each program sums the head's partials (deterministic, no atomics) and writes
          relu(q) KV / (relu(q) . Ksum + eps) for its token range.
So K and V are read once, Q read once, the output written once; nothing else touches device memory but
the (B, heads, splits, D, D) partials. Both layouts are the same kernel through strides, on
(B, heads, N, D) views: the DiT's tokens-major (B, N, C) slices of the fused qkv Linear output
(q, k, v = qkv.chunk(3, -1), no copies) and the DC-AE's channels-first (B, G*3*D, H, W) qkv.
"""
import torch

from . import HAS_TRITON, size_free, triton, tl, upcast, use_triton

if HAS_TRITON:
    def _kv(k_ptr, v_ptr, m_ptr, kv_ptr, ks_ptr, N, n_split, tokens_per_split,
            skb, skh, skn, skd, svb, svh, svn, svd, smb, smn,
            D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
        h, b, s = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2)
        heads = tl.num_programs(0)
        d = tl.arange(0, D)
        k_base = k_ptr + b * skb + h * skh
        v_base = v_ptr + b * svb + h * svh
        kv = tl.zeros((D, D), dtype=tl.float32)  # kv[i, j] = sum_n relu(k[n, i]) v[n, j]
        ks = tl.zeros((D,), dtype=tl.float32)
        start = s * tokens_per_split
        for n0 in range(start, start + tokens_per_split, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            live = n < N
            k = tl.load(k_base + n[:, None] * skn + d[None, :] * skd, mask=live[:, None], other=0.0)
            v = tl.load(v_base + n[:, None] * svn + d[None, :] * svd, mask=live[:, None], other=0.0)
            k = tl.maximum(k, 0.0).to(v.dtype)  # (a float scalar promotes bf16 to fp32 in some Triton versions)
            if HAS_MASK:  # padded tokens contribute nothing
                m = tl.load(m_ptr + b * smb + n * smn, mask=live, other=0.0)
                k = (k * m[:, None]).to(v.dtype)
            kv = tl.dot(tl.trans(k), v, kv, input_precision=PRECISION)  # 16-bit: exact products, fp32 sums
            ks += tl.sum(k.to(tl.float32), axis=0)
        part = (b * heads + h) * n_split + s
        tl.store(kv_ptr + part * D * D + d[:, None] * D + d[None, :], kv)
        tl.store(ks_ptr + part * D + d, ks)

    def _out(q_ptr, kv_ptr, ks_ptr, o_ptr, N, n_split, tokens_per_split, eps,
             sqb, sqh, sqn, sqd, sob, soh, son, sod,
             D: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_BF16: tl.constexpr, PRECISION: tl.constexpr):
        h, b, s = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2)
        heads = tl.num_programs(0)
        d = tl.arange(0, D)
        kv = tl.zeros((D, D), dtype=tl.float32)
        ks = tl.zeros((D,), dtype=tl.float32)
        part0 = (b * heads + h) * n_split
        for i in range(n_split):  # fixed order: the same inputs give the same bits
            kv += tl.load(kv_ptr + (part0 + i) * D * D + d[:, None] * D + d[None, :])
            ks += tl.load(ks_ptr + (part0 + i) * D + d)
        if SPLIT_BF16:  # fp32 KV as bf16 hi + lo: two bf16 dots keep ~16 mantissa bits, at tensor-core speed
            kv_hi = kv.to(tl.bfloat16)
            kv_lo = (kv - kv_hi.to(tl.float32)).to(tl.bfloat16)
        q_base = q_ptr + b * sqb + h * sqh
        o_base = o_ptr + b * sob + h * soh
        start = s * tokens_per_split
        for n0 in range(start, start + tokens_per_split, BLOCK_M):
            n = n0 + tl.arange(0, BLOCK_M)
            live = n < N
            q = tl.load(q_base + n[:, None] * sqn + d[None, :] * sqd, mask=live[:, None], other=0.0)
            q = tl.maximum(q, 0.0).to(q_ptr.dtype.element_ty)
            if SPLIT_BF16:
                num = tl.dot(q, kv_hi)
                num = tl.dot(q, kv_lo, num)
            else:
                num = tl.dot(q.to(tl.float32), kv, input_precision=PRECISION)
            den = tl.sum(q.to(tl.float32) * ks[None, :], axis=1)
            out = num / (den[:, None] + eps)
            tl.store(o_base + n[:, None] * son + d[None, :] * sod, out.to(o_ptr.dtype.element_ty), mask=live[:, None])

    # Each kernel twice, as Triton specialises integer arguments (1, multiple of 16, other). Tokens-major
    # (the DiT): every stride is 1 or a multiple of 16 for any N, so all stay specialised (aligned loads).
    # Channels-first (the DC-AE): the batch, head and channel strides are multiples of H*W, so their
    # alignment class is dropped and one compile serves every image size (measured: decode time unchanged,
    # docs/performance.md section 10).
    _kv_kernel = triton.jit(**size_free(sizes=["N", "n_split"]))(_kv)
    _out_kernel = triton.jit(**size_free(sizes=["N", "n_split"]))(_out)
    _kv_kernel_channels_first = triton.jit(**size_free(
        sizes=["N", "n_split"], strides=["skb", "skh", "skd", "svb", "svh", "svd"]))(_kv)
    _out_kernel_channels_first = triton.jit(**size_free(
        sizes=["N", "n_split"], strides=["sqb", "sqh", "sqd", "sob", "soh", "sod"]))(_out)


TRITON_HEAD_DIMS = (16, 32, 64, 128)  # tl.dot and tl.arange need powers of two >= 16; others use the twin
_SM_COUNT = {}


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 8  # interpreter: small grids
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def _attend_triton(q, k, v, out, eps, mask, *, channels_first=False, block_n=64, block_m=64, split=None,
                   num_warps=4, num_stages=3, reduce=None):
    """q, k, v, out: (B, heads, N, D) views with any strides; mask (B, N) or None. Writes out.
    channels_first: strides that are multiples of N (the DC-AE's), compiled once for every N.
    reduce: see linear_attention."""
    B, H, N, D = q.shape
    if D not in TRITON_HEAD_DIMS:
        raise ValueError(f"the Triton linear attention supports head_dim in {TRITON_HEAD_DIMS}, got {D}")
    block = max(block_n, block_m)
    if split is None:  # about 4 programs per SM, each over whole blocks of tokens
        split = triton.cdiv(4 * _num_sms(q.device), B * H)
    split = max(1, min(split, triton.cdiv(N, block)))
    tokens = triton.cdiv(triton.cdiv(N, split), block) * block
    split = triton.cdiv(N, tokens)
    kv = torch.empty((B, H, split, D, D), dtype=torch.float32, device=q.device)
    ks = torch.empty((B, H, split, D), dtype=torch.float32, device=q.device)
    precision = "tf32x3" if q.dtype == torch.float32 else "tf32"  # fp32 inputs keep fp32 accuracy
    if mask is not None:
        mask = mask.to(k.dtype)
    m, (smb, smn) = (mask, mask.stride()) if mask is not None else (k, (0, 0))
    grid = (H, B, split)
    kv_kernel, out_kernel = (_kv_kernel_channels_first, _out_kernel_channels_first) if channels_first else \
        (_kv_kernel, _out_kernel)
    kv_kernel[grid](k, v, m, kv, ks, N, split, tokens, *k.stride(), *v.stride(), smb, smn,
                    D=D, BLOCK_N=block_n, HAS_MASK=mask is not None, PRECISION=precision,
                    num_warps=num_warps, num_stages=num_stages)
    n_read = split  # partial sums pass 2 adds up
    if reduce is not None:  # sana_core.parallel: these tokens' sums, combined with other processes' first
        kv, ks = reduce(kv.sum(2), ks.sum(2))
        kv, ks, n_read = kv[:, :, None].contiguous(), ks[:, :, None].contiguous(), 1
    out_kernel[grid](q, kv, ks, out, N, n_read, tokens, float(eps), *q.stride(), *out.stride(),
                     D=D, BLOCK_M=block_m, SPLIT_BF16=q.dtype == torch.bfloat16, PRECISION=precision,
                     num_warps=num_warps, num_stages=num_stages)
    return out


def _attend_torch(q, k, v, eps, mask, reduce=None):
    """q, k, v: (B, heads, N, D); mask (B, N) or None -> (B, heads, N, D) float32 (float64 if given).
    reduce: see linear_attention."""
    q, k, v = upcast(q).relu(), upcast(k).relu(), upcast(v)
    if mask is not None:
        k = k * mask.to(k.dtype)[:, None, :, None]
    kv = k.transpose(-1, -2) @ v                   # (B, heads, D, D)
    ksum = k.sum(dim=2)                            # (B, heads, D)
    if reduce is not None:
        kv, ksum = reduce(kv, ksum)
    return (q @ kv) / (q @ ksum[..., None] + eps)


# --- DiT self-attention: tokens-major (B, N, C), heads contiguous along C (C = heads * head_dim) ---

def _check_dit(q, k, v, mask, head_dim):
    if q.ndim != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"linear_attention expects q, k, v of one shape (B, N, C); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"linear_attention expects q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] % head_dim:
        raise ValueError(f"linear_attention: width {q.shape[-1]} is not a multiple of head_dim {head_dim}")
    if mask is not None and tuple(mask.shape) != tuple(q.shape[:2]):
        raise ValueError(f"linear_attention: mask must be (B, N) = {tuple(q.shape[:2])}, got {tuple(mask.shape)}")


def _heads(t, head_dim):  # (B, N, C) -> (B, heads, N, head_dim) view
    return t.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def linear_attention_torch(q, k, v, eps=1e-15, mask=None, *, head_dim=32, reduce=None):
    """Twin: q, k, v (B, N, C) (views of the qkv output are fine); mask (B, N), 1 real / 0 padding, or None.

    Returns (B, N, C) in q's dtype: relu(q) KV / (relu(q) . Ksum + eps) per head, KV and Ksum in float32.
    """
    _check_dit(q, k, v, mask, head_dim)
    out = _attend_torch(_heads(q, head_dim), _heads(k, head_dim), _heads(v, head_dim), eps, mask, reduce)
    return out.transpose(1, 2).flatten(2).to(q.dtype)


def linear_attention_triton(q, k, v, eps=1e-15, mask=None, *, head_dim=32, reduce=None, **tuning):
    _check_dit(q, k, v, mask, head_dim)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)                  # (B, N, C)
    _attend_triton(_heads(q, head_dim), _heads(k, head_dim), _heads(v, head_dim), _heads(out, head_dim),
                   eps, mask, reduce=reduce, **tuning)
    return out


def linear_attention(q, k, v, eps=1e-15, mask=None, *, head_dim=32, reduce=None):
    """SANA DiT ReLU linear attention. q, k, v: (B, N, C), e.g. `qkv.chunk(3, dim=-1)` of the fused qkv
    Linear output (B, N, 3C) (strided views, no copy; apply q/k RMSNorm first where the model has it).
    mask: (B, N) with 1 for real tokens and 0 for padding (padded tokens are left out of KV and Ksum;
    their own outputs are still computed), or None. eps: the model's (1e-15 diffusers, 1e-8 original).
    reduce: None, or a function (KV (B, heads, D, D), Ksum (B, heads, D), float32 sums over these tokens)
    -> the sums to apply: the tokens are one part of the sequence (sana_core.parallel's row bands) and it
    adds the other parts' sums.
    Returns (B, N, C) in q's dtype, heads along C as the output projection expects."""
    if head_dim in TRITON_HEAD_DIMS and use_triton(q, k, v):
        return linear_attention_triton(q, k, v, eps, mask, head_dim=head_dim, reduce=reduce)
    return linear_attention_torch(q, k, v, eps, mask, head_dim=head_dim, reduce=reduce)


# --- DC-AE EfficientViT attention: channels-first (B, G * 3 * head_dim, H, W), per group [q | k | v] ---

def _groups(qkv, head_dim):  # (B, G*3D, H, W) -> q, k, v as (B, G, H*W, D) views
    if qkv.ndim != 4 or qkv.shape[1] % (3 * head_dim):
        raise ValueError(f"dcae_linear_attention expects qkv of shape (B, G*3*{head_dim}, H, W), "
                         f"got {tuple(qkv.shape)}")
    B, C3, H, W = qkv.shape
    x = qkv.reshape(B, C3 // (3 * head_dim), 3 * head_dim, H * W).transpose(-1, -2)
    return x[..., :head_dim], x[..., head_dim:2 * head_dim], x[..., 2 * head_dim:]


def _check_out(out, qkv, head_dim):
    B, C3, H, W = qkv.shape
    shape = (B, C3 // 3, H, W)
    if out is not None and (tuple(out.shape) != shape or out.dtype != qkv.dtype or out.stride(-1) != 1):
        raise ValueError(f"dcae_linear_attention: out must be {shape} of dtype {qkv.dtype} with unit stride "
                         f"along W; got {tuple(out.shape)} {out.dtype} stride {out.stride()}")


def dcae_linear_attention_torch(qkv, head_dim=32, *, eps=1e-15, out=None):
    """Twin: qkv (B, G*3*D, H, W) as diffusers' SanaMultiscaleLinearAttention builds it (to_q/k/v output
    concatenated with the multiscale branch): group g holds channels [q | k | v] at g*3D. Returns
    (B, G*D, H, W) in qkv's dtype (written into `out` when given), computed in float32 as diffusers'
    apply_linear_attention."""
    _check_out(out, qkv, head_dim)
    B, _, H, W = qkv.shape
    res = _attend_torch(*_groups(qkv, head_dim), eps, None)                    # (B, G, HW, D)
    res = res.transpose(-1, -2).reshape(B, -1, H, W).to(qkv.dtype)
    return res if out is None else out.copy_(res)


def dcae_linear_attention_triton(qkv, head_dim=32, *, eps=1e-15, out=None, **tuning):
    _check_out(out, qkv, head_dim)
    q, k, v = _groups(qkv, head_dim)
    B, G, _, D = q.shape
    if out is None:
        out = torch.empty((B, G * D, *qkv.shape[2:]), dtype=qkv.dtype, device=qkv.device)
    _attend_triton(q, k, v, out.view(B, G, D, -1).transpose(-1, -2), eps, None, channels_first=True, **tuning)
    return out


def dcae_linear_attention(qkv, head_dim=32, *, eps=1e-15, out=None):
    """DC-AE (EfficientViT LiteMLA) ReLU linear attention on the multiscale qkv (B, G*3*D, H, W) ->
    (B, G*D, H, W), into `out` (e.g. a channel slice of a bigger buffer) when given. The linear form for
    every H*W: diffusers' quadratic branch for H*W <= D is the same function (only the rounding differs)."""
    if head_dim in TRITON_HEAD_DIMS and use_triton(qkv):
        return dcae_linear_attention_triton(qkv, head_dim, eps=eps, out=out)
    return dcae_linear_attention_torch(qkv, head_dim, eps=eps, out=out)
