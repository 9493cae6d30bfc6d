"""Stored weights -> floats: GGUF block formats Q8_0, Q5_0, Q4_0 (blocks of 32) and Q4_K, Q5_K, Q6_K
(super-blocks of 256), and scaled fp8 (fp8 x a float32 scale per tensor or per row). Triton kernels + PyTorch twins.

A quantized tensor is a run of fixed-size byte blocks, each decoding to BLOCK consecutive values of a row
(rows are the last dimension; a row holds whole blocks). Layouts, as ggml defines them (d, dmin: float16;
all multi-byte values little-endian):
    Q8_0  34 B: d, 32 x int8 q                                  x = d * q
    Q4_0  18 B: d, 16 B nibbles (value j: low nibble of byte j, value 16+j: high nibble)   x = d * (q - 8)
    Q5_0  22 B: d, 4 B high bits (bit j of the uint32 -> value j), 16 B nibbles as Q4_0     x = d * (q - 16)
    Q4_K 144 B: d, dmin, 12 B: eight 6-bit scales and mins, 128 B nibbles; sub-block s of 32 values:
                byte 32*(s//2) + j, low nibble for even s, high for odd        x = d * sc[s] * q - dmin * m[s]
    Q5_K 176 B: as Q4_K with 32 B of fifth bits between the scales and the nibbles (bit s of byte j)
    Q6_K 210 B: 128 B low nibbles, 64 B high 2-bit pairs, 16 x int8 scales (one per 16 values), d;
                value i = 128*g + r: low nibble of byte 64*g + r%64 (high nibble when r >= 64), two high bits
                of byte 32*g + r%32 at shift 2*(r//32)                           x = d * sc[i//16] * (q - 32)
The Triton kernel decodes BLOCKS blocks per program, every value from a gather of the bytes it needs
(memory-bound: it writes 2-4x the bytes it reads). The twin is plain tensor arithmetic (any device).
The fp8 kernel is one pass (1 byte read, 2 written per bf16 value) where the twin's float32 product makes four.
"""
import torch

from . import HAS_TRITON, size_free, triton, tl, use_triton

FORMATS = {"Q8_0": (32, 34), "Q5_0": (32, 22), "Q4_0": (32, 18),  # name -> (values, bytes) per block
           "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
_CODES = {name: i for i, name in enumerate(FORMATS)}  # the kernel's FMT constant


def _f16(b):  # (n, 2) uint8 -> (n, 1) float32
    return b.contiguous().view(torch.float16).float()


def _k_scales(s):  # (n, 12) uint8 -> (n, 8) scales and (n, 8) mins, 6 bits each
    lo, hi, mixed = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = torch.cat([lo & 63, (mixed & 15) | ((lo >> 6) << 4)], dim=1)
    mins = torch.cat([hi & 63, (mixed >> 4) | ((hi >> 6) << 4)], dim=1)
    return scales.float(), mins.float()


def _nibbles(qs, group):  # (n, G * group) uint8 -> (n, G * 2 * group): per group its low nibbles, then high
    qs = qs.reshape(qs.shape[0], -1, 1, group)
    return torch.cat([qs & 15, qs >> 4], dim=2).reshape(qs.shape[0], -1)


def _bits(b, n_bits, shifts):  # (n, k) uint8 -> (n, len(shifts) * k): fields of n_bits at each shift, in order
    return torch.cat([(b >> s) & ((1 << n_bits) - 1) for s in shifts], dim=1)


def dequantize_blocks_torch(data, fmt, dtype=torch.float32):
    """Twin: uint8 blocks of `fmt` (any shape; its bytes are whole blocks) -> flat values in dtype, float32 math."""
    size = FORMATS[fmt][1]
    b = data.reshape(-1, size)
    n = b.shape[0]
    if fmt == "Q8_0":
        out = _f16(b[:, :2]) * b[:, 2:].view(torch.int8).float()
    elif fmt == "Q4_0":
        out = _f16(b[:, :2]) * (_nibbles(b[:, 2:], 16).float() - 8)
    elif fmt == "Q5_0":
        high = _bits(b[:, 2:6], 1, range(8)).reshape(n, 8, 4).transpose(1, 2).reshape(n, 32)  # bit j%8 of byte j//8
        out = _f16(b[:, :2]) * ((_nibbles(b[:, 6:], 16) | (high << 4)).float() - 16)
    elif fmt in ("Q4_K", "Q5_K"):
        scales, mins = _k_scales(b[:, 4:16])
        if fmt == "Q4_K":
            q = _nibbles(b[:, 16:], 32)
        else:
            q = _nibbles(b[:, 48:], 32) | (_bits(b[:, 16:48], 1, range(8)) << 4)  # fifth bit: bit s of byte j
        q = q.reshape(n, 8, 32).float()
        out = _f16(b[:, 0:2])[:, :, None] * scales[:, :, None] * q - _f16(b[:, 2:4])[:, :, None] * mins[:, :, None]
    elif fmt == "Q6_K":
        low = _nibbles(b[:, :128], 64).reshape(n, 2, 128)
        high = torch.stack([_bits(g, 2, (0, 2, 4, 6)) for g in b[:, 128:192].reshape(n, 2, 32).unbind(1)], dim=1)
        q = ((low | (high << 4)).float() - 32).reshape(n, 16, 16)
        out = _f16(b[:, 208:210])[:, :, None] * b[:, 192:208].view(torch.int8).float()[:, :, None] * q
    else:
        raise ValueError(f"unknown GGUF block format {fmt!r}; known: {', '.join(FORMATS)}")
    return out.reshape(-1).to(dtype)


if HAS_TRITON:
    @triton.jit
    def _f16_at(p):  # two bytes at p -> float32
        lo = tl.load(p).to(tl.uint16)
        hi = tl.load(p + 1).to(tl.uint16)
        return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _k_scale_min(base, s):  # 6-bit scale and min of sub-block s (0..7) of the Q4_K / Q5_K block at base
        a = tl.load(base + 4 + s).to(tl.int32)  # s < 4: the scale; s >= 4: top bits of the min
        c = tl.load(base + 8 + s).to(tl.int32)  # s < 4: the min; s >= 4: low bits of both
        e = tl.load(base + 4 + s % 4).to(tl.int32)  # s >= 4: top bits of the scale
        scale = tl.where(s < 4, a & 63, (c & 15) | ((e >> 6) << 4))
        mn = tl.where(s < 4, c & 63, (c >> 4) | ((a >> 6) << 4))
        return scale.to(tl.float32), mn.to(tl.float32)

    @triton.jit(**size_free(sizes=["n_blocks"]))  # one compile per format, whatever the layer's size
    def _dequant_kernel(src, out, n_blocks, FMT: tl.constexpr, QK: tl.constexpr, SIZE: tl.constexpr,
                        BLOCKS: tl.constexpr):
        blk = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)[:, None]  # (BLOCKS, 1)
        i = tl.arange(0, QK)[None, :]  # (1, QK) value within its block
        live = (blk < n_blocks) & (i < QK)  # (BLOCKS, QK)
        base = src + tl.where(blk < n_blocks, blk, 0).to(tl.int64) * SIZE  # dead rows read block 0
        if FMT == 0:  # Q8_0
            q = tl.load(base + 2 + i).to(tl.int8, bitcast=True).to(tl.float32)
            x = _f16_at(base) * q
        elif FMT == 1:  # Q5_0
            nib = (tl.load(base + 6 + i % 16) >> (4 * (i // 16))) & 15
            hb = (tl.load(base + 2 + i // 8) >> (i % 8)) & 1
            x = _f16_at(base) * ((nib | (hb << 4)).to(tl.float32) - 16.0)
        elif FMT == 2:  # Q4_0
            nib = (tl.load(base + 2 + i % 16) >> (4 * (i // 16))) & 15
            x = _f16_at(base) * (nib.to(tl.float32) - 8.0)
        elif FMT == 3 or FMT == 4:  # Q4_K, Q5_K
            s = i // 32
            scale, mn = _k_scale_min(base, s)
            if FMT == 3:
                q = (tl.load(base + 16 + 32 * (s // 2) + i % 32) >> (4 * (s % 2))) & 15
            else:
                q = (tl.load(base + 48 + 32 * (s // 2) + i % 32) >> (4 * (s % 2))) & 15
                q = q | (((tl.load(base + 16 + i % 32) >> s) & 1) << 4)
            x = _f16_at(base) * scale * q.to(tl.float32) - _f16_at(base + 2) * mn
        else:  # Q6_K
            g, r = i // 128, i % 128
            low = (tl.load(base + 64 * g + r % 64) >> (4 * (r // 64))) & 15
            high = (tl.load(base + 128 + 32 * g + r % 32) >> (2 * (r // 32))) & 3
            sc = tl.load(base + 192 + i // 16).to(tl.int8, bitcast=True).to(tl.float32)
            x = _f16_at(base + 208) * sc * ((low | (high << 4)).to(tl.float32) - 32.0)
        tl.store(out + blk.to(tl.int64) * QK + i, x.to(out.dtype.element_ty), mask=live)


def dequantize_blocks_triton(data, fmt, dtype=torch.float32, blocks=None):
    qk, size = FORMATS[fmt]
    if data.dtype != torch.uint8 or data.numel() % size:
        raise ValueError(f"{fmt} data must be uint8 whole blocks of {size} bytes, got {data.dtype} x {data.numel()}")
    data = data.contiguous()
    n = data.numel() // size
    out = torch.empty(n * qk, dtype=dtype, device=data.device)
    blocks = blocks or (4 if qk == 256 else 32)  # 1024 values per program
    _dequant_kernel[(triton.cdiv(n, blocks),)](data, out, n, FMT=_CODES[fmt], QK=qk, SIZE=size, BLOCKS=blocks)
    return out


def dequantize_blocks(data, fmt, dtype=torch.float32):
    """uint8 tensor of whole `fmt` blocks -> the flat (n_blocks * block values,) tensor they encode, in dtype."""
    if use_triton(data):
        return dequantize_blocks_triton(data, fmt, dtype)
    return dequantize_blocks_torch(data, fmt, dtype)


def dequantize_fp8_torch(data, scale, dtype=torch.float32):
    """Twin: fp8 `data` (rows, ...) times `scale` (None: 1; one float32, or one per row) in float32 -> dtype."""
    if scale is None:
        return data.to(dtype)
    return (data.float() * scale.float().reshape(-1, *[1] * (data.ndim - 1))).to(dtype)


if HAS_TRITON:
    @triton.jit(**size_free(sizes=["n", "cols"]))
    def _fp8_kernel(src, scale, out, n, cols, E5M2: tl.constexpr, SCALED: tl.constexpr, PER_ROW: tl.constexpr,
                    BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = i < n
        b = tl.load(src + i, mask=live, other=0)
        if E5M2:
            x = b.to(tl.float8e5, bitcast=True).to(tl.float32)
        else:
            x = b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        if SCALED:
            if PER_ROW:
                x = x * tl.load(scale + i // cols, mask=live, other=1.0)
            else:
                x = x * tl.load(scale)
        tl.store(out + i, x.to(out.dtype.element_ty), mask=live)


def dequantize_fp8_triton(data, scale, dtype=torch.float32, block=1024):
    if data.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"fp8 dequantization needs float8_e4m3fn or float8_e5m2 data, got {data.dtype}")
    data = data.contiguous()
    n, rows = data.numel(), data.shape[0] if data.ndim else 1
    if scale is not None:
        scale = scale.to(data.device, torch.float32).contiguous()
        if scale.numel() not in (1, rows):
            raise ValueError(f"fp8 scale must be one value or one per row ({rows}), got {scale.numel()}")
    out = torch.empty(data.shape, dtype=dtype, device=data.device)
    _fp8_kernel[(triton.cdiv(n, block),)](
        data.view(torch.uint8), out if scale is None else scale, out, n, max(n // rows, 1),
        E5M2=data.dtype == torch.float8_e5m2, SCALED=scale is not None,
        PER_ROW=scale is not None and scale.numel() > 1, BLOCK=block)
    return out


def dequantize_fp8(data, scale, dtype=torch.float32):
    """fp8 weight (rows, ...) x scale (None, one float32, or one per row) -> data's shape in dtype."""
    if use_triton(data):
        return dequantize_fp8_triton(data, scale, dtype)
    return dequantize_fp8_torch(data, scale, dtype)
