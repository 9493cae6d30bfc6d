"""DC-AE f32c32, SANA's autoencoder (arXiv 2410.10733): 32x spatial compression, 32 channels.

Decoder, shallow to deep stage i = 0..5, widths [128, 256, 512, 512, 1024, 1024]: stages 0-2 are
ResBlocks, stages 3-5 EfficientViT blocks (ReLU linear attention over multi-scale Q/K/V, then a
GLU MBConv), RMSNorm over channels and SiLU everywhere; it upsamples by nearest-2x + 3x3 conv with a
channel-duplicating shortcut and ends with RMSNorm -> ReLU -> 3x3 conv to RGB. The encoder mirrors it.

Parameter names are diffusers' `AutoencoderDC` names, except that the attention's Q/K/V projection is
one 1x1 conv `attn.to_qkv.weight` (3*inner, C, 1, 1) as in the original mit-han-lab files (diffusers
splits it into to_q/to_k/to_v) and `attn.to_out.weight` is a 1x1 conv (C, 2*inner, 1, 1).

Memory: every block keeps its temporaries under WORK_BYTES by running on bands of rows (convolutions:
exact, with the rows of context they need) or on groups of heads (attention: heads are independent).
Layout: stages 0-2 and the head (most of the work, at up to full resolution) run channels-last, the
layout cuDNN computes convolutions in (NCHW would be transposed around every convolution); stages 3-5
stay NCHW for the attention and depthwise kernels. (Choosing tiles by free memory and replaying small
decodes from a CUDA graph is the caller's: sana_core.runtime.Runtime.decode.)
Tiling: only stages 3-5 mix information globally (linear attention), and they run at 1/8 of the
output size, so `decode_tiled` runs them on the whole latent and tiles only the purely convolutional
stages 0-2 + output head, each tile reading `overlap` pixels of context around it. With the default
overlap (the receptive field of those stages, 56 px) tiled equals untiled: no seams, no blending.
`encode_tiled` is the mirror image: the input convolution and stages 0-2 of the encoder (ResBlocks and the
downsamplings, everything at full to 1/4 resolution) run on tiles aligned to 8 px with their receptive field
(36 px, rounded up to 40) of context, stages 3-5 and the output on the whole 1/8-resolution features.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import channel_rms_norm, dcae_linear_attention, depthwise_conv_glu  # Triton on CUDA, else twins
from .checkpoints import (CheckpointError, default_device, default_dtype, describe, guess_component,
                          load_weights, read_checkpoint, strip_prefix)

SCALING_FACTOR = 0.41407  # latent = encode(image) * 0.41407 (no shift)
WORK_BYTES = 1 << 30      # temporaries of one block stay under this (bands of rows / groups of heads)
DEFAULT_TILE = 1024       # decode_tiled / encode_tiled: tile side in image pixels (bench/dcae_tiling.py)
MEMORY_MARGIN = 1.25      # activation_bytes: safety factor on the activation estimate (cuDNN workspaces)


@dataclass(frozen=True)
class DCAEConfig:
    """Per stage i (shallow to deep): width, number of blocks, and `scales`: None for a stage of
    ResBlocks, else the multi-scale kernel sizes of its EfficientViT blocks (SANA: (5,))."""
    decoder_widths: tuple = (128, 256, 512, 512, 1024, 1024)
    decoder_depths: tuple = (3, 3, 3, 3, 3, 3)
    decoder_scales: tuple = (None, None, None, (5,), (5,), (5,))
    encoder_widths: tuple | None = (128, 256, 512, 512, 1024, 1024)  # None: the file has no encoder
    encoder_depths: tuple | None = (2, 2, 2, 3, 3, 3)
    encoder_scales: tuple | None = (None, None, None, (5,), (5,), (5,))
    head_dim: int = 32
    latent_channels: int = 32
    image_channels: int = 3
    scaling_factor: float = SCALING_FACTOR
    upsample_interpolate: bool = True  # decoder: conv3x3(nearest 2x) ("interpolate"), else pixel_shuffle(conv3x3)
    downsample_unshuffle: bool = False  # encoder: pixel_unshuffle(conv3x3) ("pixel_unshuffle"), else stride-2 conv
    decoder_out_act: str = "relu"  # before the decoder's last conv (diffusers decoder_conv_act_fn): relu or silu
    decoder_in_shortcut: bool = True  # + the latent repeated over channels after the decoder's first conv
    encoder_out_shortcut: bool = True  # + the channel-averaged features after the encoder's last conv

    @property
    def variant(self) -> str:
        for name, known in (("dc-ae-f32c32-sana", FULL_CONFIG), ("dc-ae-lite-f32c32-sana", LITE_CONFIG)):
            if all(getattr(self, f) == getattr(known, f) for f in ("decoder_widths", "decoder_depths",
                                                                   "decoder_scales", "upsample_interpolate")):
                return name
        return "custom-dc-ae-" + "-".join(map(str, self.decoder_widths))


FULL_CONFIG = DCAEConfig()  # dc-ae-f32c32-sana-1.0 and -1.1 (same architecture, different weights)
# dc-ae-lite-f32c32-sana-1.1: the same encoder, a lighter decoder of ResBlocks only (no stage 0: its output conv
# upsamples), pixel-shuffle upsampling and SiLU before the output conv (efficientvit's model zoo)
LITE_CONFIG = DCAEConfig(decoder_depths=(0, 3, 5, 4, 4, 4), decoder_scales=(None,) * 6, upsample_interpolate=False,
                         decoder_out_act="silu")


# ---------------------------------------------------------------------------------------------
# functional pieces


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor = None) -> torch.Tensor:
    """A 1x1 convolution as a matmul: F.conv2d's function through cuBLAS, which needs no per-shape plan (cuDNN
    builds one for every new image size: most of a first decode's ~150 ms of planning). x (B, C, H, W), NCHW
    or channels-last; weight (O, C, 1, 1) -> (B, O, H, W) in x's layout."""
    w = weight.flatten(1)  # (O, C)
    if x.stride(1) == 1 and x.shape[1] > 1:  # channels-last
        return F.linear(x.permute(0, 2, 3, 1), w, bias).permute(0, 3, 1, 2)
    y = torch.matmul(w, x.flatten(2))  # (B, O, H*W)
    if bias is not None:
        y += bias[:, None]
    return y.unflatten(2, x.shape[2:])


def empty_in_layout(like: torch.Tensor, *shape) -> torch.Tensor:
    """An uninitialised tensor of `shape` in the memory layout of `like` (channels-last or contiguous)."""
    channels_last = not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last)
    return torch.empty(shape, dtype=like.dtype, device=like.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def banded(fn, x: torch.Tensor, *, halo: int, row_bytes: int, scale: int = 1) -> torch.Tensor:
    """fn(x) computed on bands of rows of x (B, C, H, W), each with `halo` rows of context on both
    sides, so that fn's temporaries (row_bytes per input row) stay under WORK_BYTES. Exact for an fn
    whose output rows (scale per input row) depend on input rows at most `halo` away."""
    H = x.shape[2]
    rows = max(WORK_BYTES // max(row_bytes, 1), 8)
    if rows >= H:
        return fn(x)
    out = None
    for r0 in range(0, H, rows):
        r1 = min(r0 + rows, H)
        a, b = max(r0 - halo, 0), min(r1 + halo, H)
        y = fn(x[:, :, a:b])
        if out is None:
            out = empty_in_layout(y, y.shape[0], y.shape[1], H * scale, y.shape[3])
        out[:, :, r0 * scale:r1 * scale] = y[:, :, (r0 - a) * scale:(r1 - a) * scale]
        del y
    return out


def _split(length: int, tile: int) -> list:
    """[start, end) intervals covering `length` in ceil(length / tile) near-equal parts."""
    n = -(-length // tile)
    edges = [round(i * length / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _phase_weight(w: torch.Tensor) -> torch.Tensor:
    """3x3 conv of a nearest-2x upsampled input == per output phase (row parity a, column parity b) a
    2x2 conv of the low-resolution input: taps on rows (i-1, i) for even output rows, (i, i+1) for
    odd ones, i.e. kernel rows (0 | 1+2) and (0+1 | 2). (O, I, 3, 3) -> (4 * O, I, 2, 2), output
    channel (2a + b) * O + o (each phase a block of channels), summed in float32."""
    dtype, w = w.dtype, w.float()
    r = torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2], w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2)  # (O, I, a*2+p, 3)
    p = torch.stack([r[..., 0], r[..., 1] + r[..., 2], r[..., 0] + r[..., 1], r[..., 2]], 3)       # (O, I, a*2+p, b*2+q)
    p = p.view(*w.shape[:2], 2, 2, 2, 2).permute(2, 4, 0, 1, 3, 5)           # (a, b, O, I, p, q)
    return p.reshape(-1, w.shape[1], 2, 2).to(dtype)


# ---------------------------------------------------------------------------------------------
# modules


class RMSNorm2d(nn.Module):
    """RMSNorm over the channels of (B, C, H, W), with bias (efficientvit's trms2d), then + residual
    and/or ReLU, fused; IN PLACE (x is overwritten and returned)."""

    def __init__(self, channels: int, eps: float = 1e-5, *, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(channels, dtype=dtype, device=device))

    def forward(self, x, residual=None, relu=False):  # (B, C, H, W), contiguous or channels-last
        return channel_rms_norm(x, self.weight, self.bias, self.eps, residual=residual, relu=relu)


class ResBlock(nn.Module):
    """x + norm(conv2(silu(conv1(x))))."""

    def __init__(self, channels: int, *, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, **kw)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False, **kw)
        self.norm = RMSNorm2d(channels, **kw)

    def forward(self, x):  # (B, C, H, W)
        B, C, _, W = x.shape
        return banded(self._rows, x, halo=2, row_bytes=2 * B * C * W * x.element_size())

    def _rows(self, x):
        h = F.silu(self.conv1(x), inplace=True)
        h = self.conv2(h)
        return self.norm(h, residual=x)


class GLUMBConv(nn.Module):
    """x + norm(point(a * silu(g))), (a, g) = depthwise3x3(silu(inverted(x))): the local half of an
    EfficientViT block, hidden width 4C."""

    def __init__(self, channels: int, hidden: int, *, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1, **kw)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden, **kw)
        self.conv_point = nn.Conv2d(hidden, channels, 1, bias=False, **kw)
        self.norm = RMSNorm2d(channels, **kw)

    def forward(self, x):  # (B, C, H, W)
        B, C, _, W = x.shape
        hidden = self.conv_point.in_channels
        return banded(self._rows, x, halo=1, row_bytes=(4 * hidden + C) * B * W * x.element_size())

    def _rows(self, x):
        inverted = self.conv_inverted
        h = F.silu(pointwise_conv(x, inverted.weight, inverted.bias), inplace=True)  # (B, 2M, h, W)
        rows, width = h.shape[-2:]
        depth = self.conv_depth
        a = depthwise_conv_glu(h.flatten(2).transpose(1, 2), depth.weight, depth.bias, rows, width)  # (B, h*W, M)
        del h
        a = pointwise_conv(a.transpose(1, 2).unflatten(2, (rows, width)), self.conv_point.weight)  # (B, C, h, W)
        return self.norm(a, residual=x)


class MultiscaleProjection(nn.Module):
    """Aggregates q, k, v over a k x k neighbourhood: depthwise kxk then 1x1 grouped per head."""

    def __init__(self, channels: int, heads: int, kernel: int, *, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.proj_in = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False, **kw)
        self.proj_out = nn.Conv2d(channels, channels, 1, groups=3 * heads, bias=False, **kw)

    def forward(self, qkv, channels: slice):
        """qkv: the (B, c, H, W) q/k/v channels `channels` (whole heads) of the full projection."""
        w_in, w_out = self.proj_in.weight[channels], self.proj_out.weight[channels]
        x = F.conv2d(qkv, w_in, padding=self.proj_in.padding, groups=w_in.shape[0])
        return F.conv2d(x, w_out, groups=w_out.shape[0] // w_out.shape[1])


class MultiscaleLinearAttention(nn.Module):
    """x + norm(to_out([attn(qkv), attn(ms_1(qkv)), ...])), qkv = to_qkv(x) (efficientvit LiteMLA)."""

    def __init__(self, channels: int, head_dim: int, scales: tuple, *, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.head_dim, self.heads = head_dim, channels // head_dim
        inner = self.heads * head_dim
        self.to_qkv = nn.Conv2d(channels, 3 * inner, 1, bias=False, **kw)
        self.to_qkv_multiscale = nn.ModuleList(MultiscaleProjection(3 * inner, self.heads, k, **kw) for k in scales)
        self.to_out = nn.Conv2d(inner * (1 + len(scales)), channels, 1, bias=False, **kw)
        self.norm_out = RMSNorm2d(channels, **kw)

    def forward(self, x):  # (B, C, H, W)
        B, _, H, W = x.shape
        d, inner = self.head_dim, self.heads * self.head_dim
        att = x.new_empty(B, self.to_out.in_channels, H, W)    # (B, S * inner, H, W), S = 1 + scales
        per_head = B * H * W * d * (9 * x.element_size() + 24)  # q/k/v and multi-scale copies, float32 work
        group = max(1, min(self.heads, WORK_BYTES // per_head))
        for h0 in range(0, self.heads, group):                  # heads are independent
            h1 = min(h0 + group, self.heads)
            rows = slice(3 * d * h0, 3 * d * h1)
            qkv = pointwise_conv(x, self.to_qkv.weight[rows])    # (B, 3d * heads_in_group, H, W)
            dcae_linear_attention(qkv, d, out=att[:, d * h0:d * h1])
            for j, ms in enumerate(self.to_qkv_multiscale, start=1):
                dcae_linear_attention(ms(qkv, rows), d, out=att[:, j * inner + d * h0:j * inner + d * h1])
            del qkv
        y = pointwise_conv(att, self.to_out.weight)
        del att
        return self.norm_out(y, residual=x)


class EfficientViTBlock(nn.Module):
    def __init__(self, channels: int, head_dim: int, scales: tuple, *, dtype=None, device=None):
        super().__init__()
        self.attn = MultiscaleLinearAttention(channels, head_dim, scales, dtype=dtype, device=device)
        self.conv_out = GLUMBConv(channels, 4 * channels, dtype=dtype, device=device)

    def forward(self, x):
        return self.conv_out(self.attn(x))


class Upsample(nn.Module):
    """2x: conv3x3(nearest_2x(x)) (interpolate=True) or pixel_shuffle(conv3x3(x)) (the conv makes 4 * out
    channels), + pixel_shuffle(repeat_interleave(x, r)), r = 4 * out / in, when `shortcut`. The interpolating
    form is computed as phase convolutions of the low-resolution x, never materialising the upsampled input."""

    def __init__(self, in_channels: int, out_channels: int, *, interpolate: bool = True, shortcut: bool = True,
                 dtype=None, device=None):
        super().__init__()
        self.interpolate, self.shortcut = interpolate, shortcut
        self.conv = nn.Conv2d(in_channels, out_channels * (1 if interpolate else 4), 3, padding=1,
                              dtype=dtype, device=device)
        self.repeats = 4 * out_channels // in_channels
        if shortcut and (4 * out_channels % in_channels or (interpolate and 4 % self.repeats and self.repeats % 4)):
            raise CheckpointError(f"upsampling {in_channels} -> {out_channels} channels is not supported")

    def forward(self, x):  # (B, Cin, H, W) -> (B, Cout, 2H, 2W)
        B, _, _, W = x.shape
        if not self.interpolate:
            row_bytes = 8 * self.conv.out_channels * B * W * x.element_size()  # conv output, shuffled copy
            return banded(self._shuffle_rows, x, halo=1, row_bytes=row_bytes, scale=2)
        weight, bias = _phase_weight(self.conv.weight), self.conv.bias.repeat(4)
        row_bytes = 12 * self.conv.out_channels * B * W * x.element_size()
        return banded(lambda t: self._phase_rows(t, weight, bias), x, halo=1, row_bytes=row_bytes, scale=2)

    def _shuffle_rows(self, x):
        z = self.conv(x)                                                   # (B, 4 * Cout, H, W)
        if self.shortcut:
            z += x.repeat_interleave(self.repeats, dim=1) if self.repeats > 1 else x
        return F.pixel_shuffle(z, 2)

    def _phase_rows(self, x, weight, bias):
        B, _, H, W = x.shape
        z = F.conv2d(x, weight, bias, padding=1)                           # (B, 4 * Cout, H + 1, W + 1)
        C = z.shape[1] // 4
        out = empty_in_layout(z, B, C, 2 * H, 2 * W)
        r = self.repeats
        wide = x if r == 4 else x.repeat_interleave(r // 4, dim=1) if r > 4 else None  # (B, Cout, H, W)
        for a in (0, 1):
            for b in (0, 1):
                k = 2 * a + b                                               # duplicated channel o*4+k is x[(o*4+k)//r]
                phase = z[:, k * C:(k + 1) * C, a:a + H, b:b + W]
                if not self.shortcut:
                    out[:, :, a::2, b::2] = phase
                    continue
                shortcut = wide if wide is not None else x[:, k // r::4 // r]
                torch.add(phase, shortcut, out=out[:, :, a::2, b::2])
        return out


class Downsample(nn.Module):
    """conv3x3 stride 2 (x), or pixel_unshuffle(conv3x3(x)) (unshuffle=True: the conv makes out / 4 channels),
    + channel-averaged pixel_unshuffle(x)."""

    def __init__(self, in_channels: int, out_channels: int, *, unshuffle: bool = False, dtype=None, device=None):
        super().__init__()
        self.unshuffle = unshuffle
        self.conv = nn.Conv2d(in_channels, out_channels // 4 if unshuffle else out_channels, 3,
                              stride=1 if unshuffle else 2, padding=1, dtype=dtype, device=device)
        self.group = 4 * in_channels // out_channels

    def forward(self, x):
        y = F.pixel_unshuffle(x, 2).unflatten(1, (-1, self.group)).mean(2)
        z = self.conv(x)
        return (F.pixel_unshuffle(z, 2) if self.unshuffle else z).add_(y)


def _make_block(width: int, scales, head_dim: int, kw: dict) -> nn.Module:
    return ResBlock(width, **kw) if scales is None else EfficientViTBlock(width, head_dim, scales, **kw)


class Decoder(nn.Module):
    def __init__(self, config: DCAEConfig, *, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        widths, depths, scales = config.decoder_widths, config.decoder_depths, config.decoder_scales
        n, interpolate = len(widths), config.upsample_interpolate
        self.in_shortcut, self.out_act = config.decoder_in_shortcut, config.decoder_out_act
        self.conv_in = nn.Conv2d(config.latent_channels, widths[-1], 3, padding=1, **kw)
        self.up_blocks = nn.ModuleList(
            nn.ModuleList(([Upsample(widths[i + 1], widths[i], interpolate=interpolate, **kw)]
                           if i < n - 1 and depths[i] else [])
                          + [_make_block(widths[i], scales[i], config.head_dim, kw) for _ in range(depths[i])])
            for i in range(n))
        head = widths[0] if depths[0] else widths[1]  # an empty stage 0 (DC-AE-Lite): the output conv upsamples
        self.norm_out = RMSNorm2d(head, **kw)
        self.conv_out = (nn.Conv2d(head, config.image_channels, 3, padding=1, **kw) if depths[0] else
                         Upsample(head, config.image_channels, interpolate=interpolate, shortcut=False, **kw))
        # stages >= first_global hold attention and run on the whole image; below, only convolutions
        self.first_global = min([i for i, s in enumerate(scales) if s is not None and depths[i]], default=n)
        self.local_scale = 2 ** min(self.first_global, n - 1)  # output pixels per pixel of the local stages' input
        # receptive field of the local stages, walking back from the output: 3x3 convs and 2x upsamplings
        upsample = ["conv", "half"] if interpolate else ["half", "conv"]
        ops = ["conv"] if depths[0] else upsample
        for i in range(self.first_global):
            ops = ops + ["conv"] * (2 * depths[i]) + (upsample if i < n - 1 and depths[i] else [])
        lo, hi = 0, self.local_scale - 1           # the output pixels of one input pixel
        for op in ops:
            lo, hi = (lo - 1, hi + 1) if op == "conv" else (lo // 2, hi // 2)
        self.local_halo = max(-lo, hi)             # SANA: 7 (56 output pixels)

    def forward(self, z, between=None):  # (B, 32, h, w) unscaled latent -> (B, 3, 32h, 32w)
        return self.local_stages(self.global_stages(z, between), between)

    def global_stages(self, z, between=None):  # -> (B, widths[first_global], ...) features of the first global stage
        """between: called after each stage (e.g. a Cancel check that raises)."""
        B, c, h, w = z.shape
        x = self.conv_in(z)
        if self.in_shortcut:
            x.view(B, c, -1, h, w).add_(z.unsqueeze(2))  # + repeat_interleave(z, widths[-1] // c, dim=1)
        for i in reversed(range(self.first_global, len(self.up_blocks))):
            for block in self.up_blocks[i]:
                x = block(x)
            if between is not None:
                between()
        return x

    def local_stages(self, x, between=None):  # convolutions only: a tile with enough context decodes exactly
        x = x.contiguous(memory_format=torch.channels_last)
        for i in reversed(range(self.first_global)):
            for block in self.up_blocks[i]:
                x = block(x)
            if between is not None:
                between()
        x = self.norm_out(x, relu=self.out_act == "relu")
        return self.conv_out(F.silu(x, inplace=True) if self.out_act == "silu" else x)


class Encoder(nn.Module):
    def __init__(self, config: DCAEConfig, *, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        widths, depths, scales = config.encoder_widths, config.encoder_depths, config.encoder_scales
        n = len(widths)
        self.out_shortcut = config.encoder_out_shortcut
        self.conv_in = nn.Conv2d(config.image_channels, widths[0], 3, padding=1, **kw)
        self.down_blocks = nn.ModuleList(
            nn.ModuleList([_make_block(widths[i], scales[i], config.head_dim, kw) for _ in range(depths[i])]
                          + ([Downsample(widths[i], widths[i + 1], unshuffle=config.downsample_unshuffle, **kw)]
                             if i < n - 1 else []))
            for i in range(n))
        self.conv_out = nn.Conv2d(widths[-1], config.latent_channels, 3, padding=1, **kw)
        # stages >= first_global hold attention and run on the whole image; below, only convolutions
        self.first_global = min([i for i, s in enumerate(scales) if s is not None and depths[i]], default=n)
        self.local_scale = 2 ** min(self.first_global, n - 1)  # input pixels per pixel of the local stages' output
        # receptive field of the local stages (input pixels on each side): the 3x3 input conv, then per stage
        # two 3x3 convs per ResBlock and the 3x3 downsampling conv, at that stage's scale
        field = 1 + sum(2 ** i * (2 * depths[i] + (i < n - 1)) for i in range(self.first_global))
        self.local_halo = -(-field // self.local_scale)  # in pixels of the local output (SANA: 5, 40 input px)

    def forward(self, x):  # (B, 3, H, W) -> (B, 32, H/32, W/32) unscaled latent
        return self.global_stages(self.local_stages(x))

    def local_stages(self, x):  # convolutions only: a tile with enough context encodes exactly
        x = self.conv_in(x)
        for stage in self.down_blocks[:self.first_global]:
            for block in stage:
                x = block(x)
        return x

    def global_stages(self, x, between=None):  # features of the local stages (the whole image) -> latent
        for stage in self.down_blocks[self.first_global:]:
            for block in stage:
                x = block(x)
            if between is not None:
                between()
        if not self.out_shortcut:
            return self.conv_out(x)
        shortcut = x.unflatten(1, (self.conv_out.out_channels, -1)).mean(2)  # channel-averaged
        return self.conv_out(x).add_(shortcut)


class DCAE(nn.Module):
    """The autoencoder. Latents are in the DiT's space (scaled by `scaling_factor`); images are
    (B, 3, H, W) in [-1, 1]. Outputs are float32 on the model's device."""

    def __init__(self, config: DCAEConfig, *, dtype=None, device=None):
        super().__init__()
        self.config = config
        self.scaling_factor = config.scaling_factor
        self.latent_channels = config.latent_channels
        self.spatial_compression = 2 ** (len(config.decoder_widths) - 1)
        self.encoder = Encoder(config, dtype=dtype, device=device) if config.encoder_widths else None
        self.decoder = Decoder(config, dtype=dtype, device=device)
        self._preview = None

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    # -- public API -----------------------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1], H and W multiples of 32 -> scaled latent (B, 32, H/32, W/32)."""
        self._check_image(image)
        latent = self.encoder(image.to(device=self.device, dtype=self.dtype))
        return latent.float().mul_(self.scaling_factor)

    @torch.inference_mode()
    def encode_tiled(self, image: torch.Tensor, tile: int = None, overlap: int = None, *,
                     between=None) -> torch.Tensor:
        """Like encode with bounded memory: the encoder's convolutional stages run on tiles of `tile` pixels
        (default DEFAULT_TILE, rounded down to a multiple of 8), each reading `overlap` pixels of context on every
        side (default: their receptive field, which makes the result equal to `encode` up to float rounding);
        the attention stages on the whole 1/8-size features. `between` is called after each tile and stage."""
        self._check_image(image)
        enc = self.encoder
        f = enc.local_scale
        tile = DEFAULT_TILE if tile is None else tile
        halo = enc.local_halo if overlap is None else -(-overlap // f)
        if tile < f or halo < 0:
            raise ValueError(f"tile must be at least {f} pixels and overlap at least 0; got {tile}, {overlap}")
        tile_k = tile // f
        B, _, H, W = image.shape
        Hk, Wk = H // f, W // f
        x = None
        for r0, r1 in _split(Hk, tile_k):
            for c0, c1 in _split(Wk, tile_k):
                a0, a1, b0, b1 = max(r0 - halo, 0), min(r1 + halo, Hk), max(c0 - halo, 0), min(c1 + halo, Wk)
                part = image[:, :, a0 * f:a1 * f, b0 * f:b1 * f].to(device=self.device, dtype=self.dtype)
                y = enc.local_stages(part)
                if x is None:
                    x = y.new_empty(B, y.shape[1], Hk, Wk)
                x[:, :, r0:r1, c0:c1] = y[:, :, r0 - a0:r1 - a0, c0 - b0:c1 - b0]
                del y, part
                if between is not None:
                    between()
        return enc.global_stages(x, between).float().mul_(self.scaling_factor)

    def encode_activation_bytes(self, batch: int, height: int, width: int, *, tile: int = None) -> int:
        """Estimated peak device memory (bytes, beyond the weights) of encode (tile None) or encode_tiled(tile=tile)
        of (batch, 3, height, width) images: the largest stage's input and output (and attention buffers), the
        per-block WORK_BYTES, the kept 1/8-size features when tiled, times MEMORY_MARGIN."""
        if self.encoder is None:
            return 0  # nothing to encode with: encode says so
        enc, cfg, e = self.encoder, self.config, torch.empty((), dtype=self.dtype).element_size()
        widths, n, k = cfg.encoder_widths, len(cfg.encoder_widths), enc.first_global
        pixels = lambda i: height * width // 4 ** i  # pixels of stage i's input, whole image
        held = batch * height * width * 3 * (e + 4)  # the images, cast
        region = pixels(0)
        if tile is not None and tile < max(height, width):
            f = enc.local_scale
            held += batch * widths[k] * pixels(k) * e
            region = (tile // f * f + 2 * enc.local_halo * f) ** 2
        worst = max([(2 + 1 + len(cfg.encoder_scales[i] or ())) * widths[i] * pixels(i) for i in range(k, n)],
                    default=0)
        for i in range(k):  # stage input and output, the downsampling's output and shortcut
            worst = max(worst, region // 4 ** i * (2 * widths[i] + widths[min(i + 1, n - 1)]))
        return int(MEMORY_MARGIN * (held + batch * worst * e + WORK_BYTES))

    @torch.inference_mode()
    def decode(self, latent: torch.Tensor, *, decoder=None, between=None) -> torch.Tensor:
        """Scaled latent (B, 32, h, w) -> images (B, 3, 32h, 32w) in [-1, 1], untiled. decoder: what runs
        self.decoder on the unscaled latent (a Runtime passes a CUDA-graphed one; it runs uninterrupted);
        None: self.decoder, calling `between` after each stage (e.g. a Cancel check that raises)."""
        z = self._unscale(latent)
        return _finish(decoder(z) if decoder is not None else self.decoder(z, between))

    @torch.inference_mode()
    def decode_tiled(self, latent: torch.Tensor, tile: int = None, overlap: int = None, *,
                     between=None) -> torch.Tensor:
        """Like decode with bounded memory: stages 0-2 (convolutions) run on tiles of `tile` pixels
        (default DEFAULT_TILE), each reading `overlap` pixels of context on every side (default: their
        receptive field, 56 px for SANA, which makes the result equal to `decode`; less is faster and
        leaves small differences near tile borders). `between` is called after each global stage and each
        tile (e.g. a Cancel check that raises)."""
        x = self.decoder.global_stages(self._unscale(latent), between)
        return _finish(self._local_tiled(x, tile, overlap, between))

    def activation_bytes(self, batch: int, h: int, w: int, *, tile: int = None) -> int:
        """Estimated peak device memory (bytes, beyond the weights) of decode (tile None) or
        decode_tiled(tile=tile) of a (batch, 32, h, w) latent. Counts the largest live tensors of
        each stage and the per-block WORK_BYTES, times MEMORY_MARGIN."""
        dec, cfg, e = self.decoder, self.config, torch.empty((), dtype=self.dtype).element_size()
        widths, n, k = cfg.decoder_widths, len(cfg.decoder_widths), dec.first_global
        pixels = lambda i: h * w * 4 ** (n - 1 - i)  # pixels of stage i for the whole image
        held = batch * pixels(0) * 3 * (e + 4)       # the output image, and its float32 copy
        worst = max([(2 + 1 + len(cfg.decoder_scales[i] or ())) * widths[i] * pixels(i) for i in range(k, n)],
                    default=0)                       # in, attention buffer (1 + scales) C, out
        region = pixels(0)
        if tile is not None and tile < max(h, w) * self.spatial_compression:
            f = dec.local_scale
            held += batch * widths[k] * pixels(k) * e  # the global features, kept while tiling
            region = (tile // f * f + 2 * dec.local_halo * f) ** 2
        for i in range(k):                           # block in + out, upsample in + out
            worst = max(worst, region // 4 ** i * max(2 * widths[i], widths[i] + widths[min(i + 1, n - 1)] // 4))
        return int(MEMORY_MARGIN * (held + batch * worst * e + WORK_BYTES))

    def preview_projection(self) -> tuple:
        """(weight (32, 3), bias (3,)), float32 on the CPU: rgb = latent_pixel @ weight + bias maps a
        scaled latent pixel to the average colour (in [-1, 1]) of the 32x32 pixels it decodes to.
        Least squares over decoded smooth random latents (4 x 8 x 8 latent pixels), computed once."""
        if self._preview is None:
            g = torch.Generator().manual_seed(0)
            c, f = self.latent_channels, self.spatial_compression
            z = F.interpolate(torch.randn(4, c, 5, 5, generator=g), size=(8, 8), mode="bilinear", align_corners=True)
            z = z + 0.3 * torch.randn(z.shape, generator=g)              # smooth, yet full rank
            z = z / z.std(dim=(0, 2, 3), keepdim=True)                   # unit variance, like the DiT's latents
            colour = F.avg_pool2d(self.decode(z).cpu(), f)               # (4, 3, 8, 8)
            x = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, c), torch.ones(z.numel() // c, 1)], 1)
            y = colour.permute(0, 2, 3, 1).reshape(-1, 3)
            solution = torch.linalg.lstsq(x.double(), y.double()).solution.float()  # (c + 1, 3)
            self._preview = (solution[:c].contiguous(), solution[c].contiguous())
        return self._preview

    # -- helpers --------------------------------------------------------------------------------

    def _check_image(self, image: torch.Tensor) -> None:
        if self.encoder is None:
            raise CheckpointError("this autoencoder file holds only the decoder: encoding needs the full "
                                  "DC-AE file (encoder and decoder)")
        f = self.spatial_compression
        if image.ndim != 4 or image.shape[1] != self.config.image_channels:
            raise ValueError(f"expected images (B, {self.config.image_channels}, H, W), got shape {tuple(image.shape)}")
        if image.shape[2] % f or image.shape[3] % f:
            raise ValueError(f"image sides must be multiples of {f}, got {image.shape[3]}x{image.shape[2]} "
                             f"(width x height): crop or resize it, e.g. to "
                             f"{image.shape[3] // f * f or f}x{image.shape[2] // f * f or f}")

    def _unscale(self, latent: torch.Tensor) -> torch.Tensor:
        c = self.latent_channels
        if latent.ndim != 4 or latent.shape[1] != c:
            hint = " (a 4- or 16-channel latent comes from an SD/SDXL/Flux VAE, not SANA)" if latent.ndim == 4 else ""
            raise ValueError(f"expected a DC-AE latent (B, {c}, h, w), got shape {tuple(latent.shape)}{hint}")
        if not torch.isfinite(latent).all():
            raise ValueError("the latent contains NaN or infinite values, so it cannot be decoded: the sampling "
                             "diverged (try bfloat16 or float32 instead of float16, a lower CFG, or more steps)")
        return (latent.to(device=self.device, dtype=torch.float32) / self.scaling_factor).to(self.dtype)

    def _local_tiled(self, x: torch.Tensor, tile: int = None, overlap: int = None, between=None) -> torch.Tensor:
        """decoder.local_stages(x) on tiles of x (features of the first global stage)."""
        dec = self.decoder
        f = dec.local_scale
        tile = DEFAULT_TILE if tile is None else tile
        overlap = dec.local_halo * f if overlap is None else overlap
        if tile < f or overlap < 0:
            raise ValueError(f"tile must be at least {f} pixels and overlap at least 0; got {tile}, {overlap}")
        tile_k, halo = tile // f, -(-overlap // f)
        B, _, H, W = x.shape
        if tile_k >= H and tile_k >= W:
            return dec.local_stages(x, between)
        out = None
        for r0, r1 in _split(H, tile_k):
            for c0, c1 in _split(W, tile_k):
                a0, a1, b0, b1 = max(r0 - halo, 0), min(r1 + halo, H), max(c0 - halo, 0), min(c1 + halo, W)
                y = dec.local_stages(x[:, :, a0:a1, b0:b1])
                if out is None:
                    out = empty_in_layout(y, B, y.shape[1], H * f, W * f)
                out[:, :, r0 * f:r1 * f, c0 * f:c1 * f] = \
                    y[:, :, (r0 - a0) * f:(r1 - a0) * f, (c0 - b0) * f:(c1 - b0) * f]
                del y
                if between is not None:
                    between()
        return out


def _finish(pixels: torch.Tensor) -> torch.Tensor:
    """Decoder output -> float32 (B, 3, H, W) in [-1, 1], contiguous."""
    return pixels.to(torch.float32, memory_format=torch.contiguous_format).clamp_(-1, 1)


# ---------------------------------------------------------------------------------------------
# loading


# Original mit-han-lab (efficientvit) names -> diffusers names: substrings replaced in this order in
# every key (as diffusers' loaders/single_file_utils.convert_autoencoder_dc_checkpoint_to_diffusers),
# then the two 1x1 convs below keep their original conv shape under our names.
ORIGINAL_TO_DIFFUSERS = (
    ("decoder.project_out.op_list.2.conv.conv.", "decoder.conv_out.conv."),  # an upsampling head (DC-AE-Lite)
    ("main.", ""), ("op_list.", ""), ("context_module", "attn"), ("local_module", "conv_out"),
    ("aggreg.0.0", "to_qkv_multiscale.0.proj_in"), ("aggreg.0.1", "to_qkv_multiscale.0.proj_out"),
    ("depth_conv.conv", "conv_depth"), ("inverted_conv.conv", "conv_inverted"),
    ("point_conv.conv", "conv_point"), ("point_conv.norm", "norm"),
    ("conv.conv.", "conv."), ("conv1.conv", "conv1"), ("conv2.conv", "conv2"), ("conv2.norm", "norm"),
    ("proj.norm", "norm_out"),
    ("encoder.project_in.conv", "encoder.conv_in"), ("encoder.project_out.0.conv", "encoder.conv_out"),
    ("encoder.stages", "encoder.down_blocks"),
    ("decoder.project_in.conv", "decoder.conv_in"), ("decoder.project_out.0", "decoder.norm_out"),
    ("decoder.project_out.2.conv", "decoder.conv_out"), ("decoder.stages", "decoder.up_blocks"),
    ("qkv.conv.weight", "to_qkv.weight"), ("proj.conv.weight", "to_out.weight"),
)


def _is_original_layout(keys) -> bool:
    return any(".op_list." in k or "project_in." in k or k.startswith(("encoder.stages.", "decoder.stages."))
               for k in keys)


def _looks_like_dcae(tensors: dict) -> bool:
    """Our names: a decoder input conv and stages numbered decoder.up_blocks.<stage>.<block>."""
    staged = [k.split(".") for k in tensors if k.startswith(("decoder.up_blocks.", "encoder.down_blocks."))]
    return "decoder.conv_in.weight" in tensors and bool(staged) and all(
        len(p) > 4 and p[2].isdigit() and p[3].isdigit() for p in staged)


def to_model_names(tensors: dict) -> dict:
    """State dict in the original or the diffusers layout (detected from the keys) -> our names."""
    if _is_original_layout(tensors):
        out = {}
        for key, value in tensors.items():
            for old, new in ORIGINAL_TO_DIFFUSERS:
                key = key.replace(old, new)
            out[key] = value
        return out
    out = {}
    for key, value in tensors.items():
        if key.endswith(".attn.to_q.weight"):
            p = key[:-len("to_q.weight")]
            try:
                parts = [tensors[p + n + ".weight"] for n in ("to_q", "to_k", "to_v")]
            except KeyError as e:
                raise CheckpointError(f"the attention weights are incomplete: {e.args[0]} is missing") from None
            out[p + "to_qkv.weight"] = torch.cat(parts)[:, :, None, None]
        elif key.endswith((".attn.to_k.weight", ".attn.to_v.weight")):
            continue
        elif key.endswith(".attn.to_out.weight") and value.ndim == 2:
            out[key] = value[:, :, None, None]
        else:
            out[key] = value
    return out


def to_diffusers_names(state_dict: dict) -> dict:
    """Our state dict -> diffusers' AutoencoderDC names and shapes (to_q/to_k/to_v, linear to_out)."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(".attn.to_qkv.weight"):
            p = key[:-len("to_qkv.weight")]
            for name, part in zip(("to_q", "to_k", "to_v"), value[:, :, 0, 0].chunk(3)):
                out[p + name + ".weight"] = part.contiguous()
        elif key.endswith(".attn.to_out.weight"):
            out[key] = value[:, :, 0, 0].contiguous()
        else:
            out[key] = value
    return out


def _stage_geometry(tensors: dict, prefix: str, n: int, resample_first: bool, name: str):
    """Widths, depths and scales of `n` stages `{prefix}.{i}.{j}.` (resampling block first or last), and the
    output channels of each stage's resampling conv (None: none). The decoder's stage 0 may be empty."""
    widths, depths, scales, resample_out, head_dims = [], [], [], [], set()
    for i in range(n):
        stage = f"{prefix}.{i}."
        ids = sorted({int(k[len(stage):].split(".")[0]) for k in tensors if k.startswith(stage)})
        if not ids and i == 0 and resample_first:  # DC-AE-Lite: no stage 0, the output conv upsamples
            widths.append(None), depths.append(0), scales.append(None), resample_out.append(None)
            continue
        resample = ([ids[0]] if resample_first else [ids[-1]]) if i < n - 1 and ids else []
        if resample and f"{stage}{resample[0]}.conv.weight" not in tensors:
            resample = []
        blocks = [j for j in ids if j not in resample]
        if not blocks or ids != list(range(len(ids))):
            raise CheckpointError(f"{name}: stage {prefix}.{i} has no blocks (or gaps in its numbering): this is "
                                  f"not a DC-AE f32c32-sana checkpoint (the -in/-mix DC-AE variants are not supported)")
        kinds = set()
        for j in blocks:
            b = f"{stage}{j}."
            if b + "conv1.weight" in tensors:
                kinds.add(None)
                width = tensors[b + "conv1.weight"].shape[0]
            elif b + "attn.to_qkv.weight" in tensors:
                m = 0
                while f"{b}attn.to_qkv_multiscale.{m}.proj_in.weight" in tensors:
                    head_dims.add(tensors[f"{b}attn.to_qkv_multiscale.{m}.proj_out.weight"].shape[1])
                    m += 1
                kinds.add(tuple(tensors[f"{b}attn.to_qkv_multiscale.{s}.proj_in.weight"].shape[-1] for s in range(m)))
                width = tensors[b + "attn.to_qkv.weight"].shape[1]
            else:
                raise CheckpointError(f"{name}: block {b[:-1]} is neither a ResBlock nor an EfficientViT block "
                                      f"(keys: {', '.join(sorted(k for k in tensors if k.startswith(b))[:4])})")
        if len(kinds) != 1:
            raise CheckpointError(f"{name}: stage {prefix}.{i} mixes block types")
        widths.append(width)
        depths.append(len(blocks))
        scales.append(kinds.pop())
        resample_out.append(tensors[f"{stage}{resample[0]}.conv.weight"].shape[0] if resample else None)
    return widths, tuple(depths), tuple(scales), resample_out, head_dims


def _resampling(convs: dict, name: str, what: str, plain: dict, packed: dict, packed_name: str) -> bool:
    """Whether every resampling conv (stage -> output channels) has the `packed` channel count (pixel-(un)shuffle),
    else the `plain` one; a mixture, or neither, is an error."""
    kinds = {c == packed[i] if c in (plain[i], packed[i]) else None for i, c in convs.items()}
    if None in kinds or len(kinds) > 1:
        raise CheckpointError(f"{name}: the {what} convolutions have {sorted(set(convs.values()))} output channels, "
                              f"neither all plain {sorted(set(plain.values()))} nor all {packed_name} "
                              f"{sorted(set(packed.values()))}: this is no DC-AE this loader knows")
    return kinds == {True}


def _activation(cfg: dict, key: str, default: str, name: str) -> str:
    """A diffusers activation name (get_activation) as "relu" or "silu"; others are an error."""
    value = cfg.get(key, default)
    act = {"relu": "relu", "silu": "silu", "swish": "silu"}.get(value)
    if act is None:
        raise CheckpointError(f"{name}: config.json has {key}={value!r}; supported: 'relu' and 'silu'")
    return act


def infer_config(tensors: dict, diffusers_config: dict = None, name: str = "checkpoint") -> DCAEConfig:
    """The architecture, read from the tensors (our names) and, for what they cannot tell (the activation
    before the output conv, the shortcuts), from a diffusers config.json interpreted as diffusers does.
    Without one: the setting of the published model of that structure (DC-AE-Lite: SiLU, else ReLU)."""
    if any(k.endswith("running_mean") for k in tensors):
        raise CheckpointError(f"{name} uses batch norm: it is a DC-AE -in/-mix variant, not dc-ae-f32c32-sana-1.0/1.1")
    if "decoder.conv_in.weight" not in tensors:
        raise CheckpointError(f"{name} has no DC-AE decoder (decoder.conv_in.weight); it holds {describe(tensors)}")
    if "encoder.conv_in.conv.weight" in tensors:
        raise CheckpointError(f"{name} is a DC-AE -in/-mix variant (pixel-unshuffle input), not dc-ae-f32c32-sana")
    cfg = diffusers_config if diffusers_config and ("_class_name" in diffusers_config
                                                    or "decoder_block_out_channels" in diffusers_config) else {}
    n = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("decoder.up_blocks."))
    widths, depths, scales, ups, head_dims = _stage_geometry(tensors, "decoder.up_blocks", n, True, name)
    if widths[0] is None:  # no stage 0: its width is only a name (diffusers' config keeps it)
        widths[0] = (cfg.get("decoder_block_out_channels") or [widths[1] // 2])[0]
    head = tensors["decoder.conv_out.conv.weight" if not depths[0] else "decoder.conv_out.weight"]
    convs = {i: c for i, c in enumerate(ups) if c is not None}
    if not depths[0]:
        convs[-1] = head.shape[0]
    plain = {i: widths[i] if i >= 0 else 3 for i in convs}
    interpolate = not _resampling(convs, name, "upsampling", plain, {i: 4 * c for i, c in plain.items()},
                                  "pixel-shuffle")
    enc = (None, None, None)
    unshuffle = False
    if "encoder.conv_in.weight" in tensors:
        n_enc = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("encoder.down_blocks."))
        enc_widths, *enc_rest, downs, enc_head_dims = _stage_geometry(tensors, "encoder.down_blocks", n_enc, False, name)
        enc = (tuple(enc_widths), *enc_rest)
        head_dims |= enc_head_dims
        convs = {i: c for i, c in enumerate(downs) if c is not None}
        plain = {i: enc_widths[i + 1] for i in convs}
        unshuffle = _resampling(convs, name, "downsampling", plain, {i: c // 4 for i, c in plain.items()},
                                "pixel-unshuffle")
    if len(head_dims) > 1:
        raise CheckpointError(f"{name}: attention head sizes differ between blocks ({sorted(head_dims)})")
    head_dim = head_dims.pop() if head_dims else cfg.get("attention_head_dim", 32)
    lite = not depths[0] and not any(scales)
    config = DCAEConfig(decoder_widths=tuple(widths), decoder_depths=depths, decoder_scales=scales,
                        encoder_widths=enc[0], encoder_depths=enc[1], encoder_scales=enc[2], head_dim=head_dim,
                        latent_channels=tensors["decoder.conv_in.weight"].shape[1],
                        image_channels=head.shape[0] // (1 if interpolate or depths[0] else 4),
                        scaling_factor=float(cfg.get("scaling_factor", SCALING_FACTOR)),
                        upsample_interpolate=interpolate, downsample_unshuffle=unshuffle,
                        decoder_out_act=_activation(cfg, "decoder_conv_act_fn", "relu", name) if cfg else
                        "silu" if lite else "relu",
                        decoder_in_shortcut=bool(cfg.get("decoder_in_shortcut", True)),
                        encoder_out_shortcut=bool(cfg.get("encoder_out_shortcut", True)))
    _check_against_diffusers_config(config, cfg, name)
    return config


def _check_against_diffusers_config(config: DCAEConfig, cfg: dict, name: str) -> None:
    """Options as diffusers' AutoencoderDC reads them: upsample_block_type "interpolate" interpolates, any other
    value pixel-shuffles; downsample_block_type "pixel_unshuffle" pixel-unshuffles, any other value (the
    published folders say "Conv", diffusers' converter "conv") is a strided conv."""
    if not cfg:
        return
    n = len(config.decoder_widths)
    for key, supported, what in (("decoder_norm_types", ("rms_norm",), "normalization"),
                                 ("decoder_act_fns", ("silu", "swish"), "activation")):
        given = cfg.get(key, supported[0])
        per_stage = [given] * n if isinstance(given, str) else list(given)
        # diffusers uses the activation only in ResBlocks; the norm everywhere
        used = [v for v, s in zip(per_stage, config.decoder_scales) if key == "decoder_norm_types" or s is None]
        if any(v not in supported for v in used):
            raise CheckpointError(f"{name}: config.json has {key}={given!r}; only {supported[0]!r} is supported "
                                  f"(the SANA DC-AE {what})")
    modes = {"upsample_block_type": ("interpolate" if config.upsample_interpolate else "pixel_shuffle",
                                     lambda v: v == "interpolate", config.upsample_interpolate),
             "downsample_block_type": ("pixel_unshuffle" if config.downsample_unshuffle else "conv",
                                       lambda v: v == "pixel_unshuffle", config.downsample_unshuffle)}
    for key, (weights_say, reads_as, value) in modes.items():
        if key in cfg and reads_as(cfg[key]) != value and (key == "upsample_block_type" or config.encoder_widths):
            raise CheckpointError(f"{name}: config.json says {key}={cfg[key]!r}, but the weights are shaped for "
                                  f"{weights_say!r}; the folder mixes files of different models")
    expected = {"decoder_block_out_channels": config.decoder_widths, "decoder_layers_per_block": config.decoder_depths,
                "latent_channels": config.latent_channels, "attention_head_dim": config.head_dim}
    if config.encoder_widths:
        expected.update(encoder_block_out_channels=config.encoder_widths, encoder_layers_per_block=config.encoder_depths)
    for key, value in expected.items():
        given = cfg.get(key)
        if given is not None and (tuple(given) if isinstance(given, list) else given) != value:
            raise CheckpointError(f"{name}: config.json says {key}={given}, but the weights have {value}; "
                                  f"the folder mixes files of different models")


def load_autoencoder(path, *, dtype=None, device=None) -> DCAE:
    """DC-AE f32c32 (SANA 1.0 / 1.1) from the original mit-han-lab file (.safetensors/.pth/.pt) or the
    diffusers layout (folder with config.json, or its single .safetensors), detected from the keys."""
    path = Path(path)
    if path.is_dir() and not any(path.glob("*.safetensors")) and (path / "vae").is_dir():
        path = path / "vae"  # a whole diffusers pipeline folder
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    tensors, metadata = read_checkpoint(path, weight_names=("diffusion_pytorch_model", "model"), dtype=dtype)
    tensors = strip_prefix(tensors, ("first_stage_model.", "vae.", "model.", "module."))
    kind = guess_component(tensors)
    model_tensors = to_model_names(tensors) if kind == "autoencoder" else {}
    if not _looks_like_dcae(model_tensors):
        hint = {"transformer": "load it with the SANA model loader (load_transformer)",
                "text_encoder": "load it with the Gemma text encoder loader (load_text_encoder)",
                "autoencoder": "it is another kind of VAE (SD/SDXL/Flux style)"}.get(kind, "it is no SANA component")
        raise CheckpointError(f"{path.name} is not a DC-AE autoencoder: it holds {describe(tensors)}; {hint}. "
                              f"SANA needs the DC-AE f32c32 (dc-ae-f32c32-sana-1.0 or -1.1) here",
                              found=kind if kind in ("transformer", "text_encoder") else None)
    tensors = model_tensors
    config = infer_config(tensors, metadata.get("config"), path.name)
    model = DCAE(config, dtype=dtype, device="meta")
    return load_weights(model, tensors, device=device, dtype=dtype)
