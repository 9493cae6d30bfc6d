"""SANA's Linear DiT: every published variant, loaded from every published file layout.

Parameter names are those of the original NVlabs code (`blocks.0.attn.qkv.weight`, ...);
diffusers files are renamed (and their q/k/v, k/v tensors fused) while loading.

    model = load_transformer("Sana_1600M_1024px_BF16.pth")
    v = model(x, t * 1000, context, context_mask)  # velocity, flow matching
"""
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoints import CheckpointError, default_device, default_dtype, describe, guess_component, strip_prefix
from .kernels import adaln, depthwise_conv_glu, gated_residual_adaln, linear_attention  # Triton on CUDA, else twins
from .operations import cast_like, matmul_weight, reads_weights_directly
from .quantized import cat_rows, load_quantized_weights  # quantized weights (GGUF, fp8)
from .quantized_files import read_quantized_checkpoint

log = logging.getLogger(__name__)

SELF_HEAD_DIM = 32
TIMESTEP_FREQ_DIM = 256
SPRINT_TIMESTEP_SCALE = 1000.0  # official `timestep_norm_scale_factor`: Sprint's embedder saw t in [0, 1]
GUIDANCE_EMBED_SCALE = 0.1  # official `cfg_embed_scale`, diffusers `guidance_embeds_scale`
CROSS_HEADS = {1152: 16, 2240: 20}  # width -> cross-attention heads of the published models
QUERY_BUCKET = 256  # cross-attention queries padded to a multiple: cuDNN's attention builds a plan (~150 ms)
# per query count, and the image sizes near one megapixel (924-1024 latent tokens) then share the 1024 plan
PE_BY_RESOLUTION = {2048: (1.0, 64), 4096: (2.0, 128)}  # image side -> (pe_interpolation, base_size)
SIZES = {(28, 1152): "0.6b", (20, 2240): "1.6b", (60, 2240): "4.8b"}  # (depth, width) -> name
# Added to the linear attention's denominator: diffusers' 1e-15 (the official blocks use 1e-8; with float32
# sums the two differ only when a query is orthogonal to every key, where both give an output of 0).
LINEAR_ATTENTION_EPS = 1e-15
FP16_MAX = 65504.0  # float16 models clamp the residual stream and attention output to this (as diffusers)


@dataclass
class SanaConfig:
    depth: int = 20
    width: int = 2240
    caption_dim: int = 2304  # Gemma-2-2B hidden size
    self_heads: int = 70  # linear attention, head dim 32
    cross_heads: int = 20
    mlp_hidden: int = 5600  # Mix-FFN hidden width (2.5 x width)
    qk_norm: bool = False  # Sana 1.5 and Sprint: RMSNorm over all heads of q and k
    sprint: bool = False  # guidance embedder (`cfg_embedder`) present
    pe_interpolation: float | None = None  # 2-D sin-cos position embedding (2K: 1.0, 4K: 2.0)
    base_size: int | None = None  # latent side the position embedding was trained at
    in_channels: int = 32
    out_channels: int = 32
    timestep_scale: float = 1.0  # on the t * 1000 timestep, as diffusers' SanaPipeline (Sprint: unused, its
    # embedder sees t * 1000 / SPRINT_TIMESTEP_SCALE, as diffusers' Sprint pipeline passes t whatever the config says)
    guidance_embeds_scale: float = GUIDANCE_EMBED_SCALE  # on the guidance scale before its embedder (Sprint)

    @property
    def variant(self) -> str:
        size = SIZES.get((self.depth, self.width))
        if size is None:
            return f"custom-{self.depth}x{self.width}"
        family = "sana-sprint" if self.sprint else "sana-1.5" if self.qk_norm else "sana"
        pe = "" if self.pe_interpolation is None else {64: "-2k", 128: "-4k"}.get(self.base_size, f"-pe{self.base_size}")
        return f"{family}-{size}{pe}"


# The published models (parameter counts as diffusers builds them).
CONFIGS = {
    "sana-0.6b": SanaConfig(depth=28, width=1152, self_heads=36, cross_heads=16, mlp_hidden=2880),
    "sana-1.6b": SanaConfig(),
    "sana-1.6b-2k": SanaConfig(pe_interpolation=1.0, base_size=64),
    "sana-1.6b-4k": SanaConfig(pe_interpolation=2.0, base_size=128),
    "sana-1.5-1.6b": SanaConfig(qk_norm=True),
    "sana-1.5-4.8b": SanaConfig(depth=60, qk_norm=True),
    "sana-sprint-0.6b": SanaConfig(depth=28, width=1152, self_heads=36, cross_heads=16, mlp_hidden=2880,
                                   qk_norm=True, sprint=True),
    "sana-sprint-1.6b": SanaConfig(qk_norm=True, sprint=True),
}


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5, *, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x):
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return normed * cast_like(self.weight, normed)


def timestep_embedding(t, dim=TIMESTEP_FREQ_DIM, max_period=10000.0):
    """(B,) float -> (B, dim) float32 sinusoids, cos first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoids of a scalar, then MLP 256 -> C -> C with SiLU (`t_embedder`, `cfg_embedder`)."""

    def __init__(self, width, *, dtype=None, device=None, ops=nn):
        super().__init__()
        self.mlp = nn.Sequential(ops.Linear(TIMESTEP_FREQ_DIM, width, dtype=dtype, device=device), nn.SiLU(),
                                 ops.Linear(width, width, dtype=dtype, device=device))

    def forward(self, t, dtype):  # (B,) -> (B, C) in dtype
        return self.mlp(timestep_embedding(t).to(dtype))


class CaptionEmbedder(nn.Module):
    """Gemma hidden states -> model width: `y_proj` MLP with tanh-GELU."""

    def __init__(self, caption_dim, width, *, dtype=None, device=None, ops=nn):
        super().__init__()
        self.y_proj = nn.Module()
        self.y_proj.fc1 = ops.Linear(caption_dim, width, dtype=dtype, device=device)
        self.y_proj.fc2 = ops.Linear(width, width, dtype=dtype, device=device)

    def forward(self, y):  # (B, T, Cc) -> (B, T, C)
        return self.y_proj.fc2(F.gelu(self.y_proj.fc1(y), approximate="tanh"))


def sincos_pos_embed(width, h, w, pe_interpolation, base_size) -> torch.Tensor:
    """(h * w, width) float32 2-D sin-cos embedding of the h x w grid, as the official code and
    diffusers' PatchEmbed compute it: coordinates scaled to the trained grid (`base_size`) and
    divided by `pe_interpolation`; the first half of the channels encodes the column."""
    grid_h = torch.arange(h, dtype=torch.float32) / (h / base_size) / pe_interpolation
    grid_w = torch.arange(w, dtype=torch.float32) / (w / base_size) / pe_interpolation
    col, row = torch.meshgrid(grid_w, grid_h, indexing="xy")  # (h, w) each
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4))  # (C/4,)

    def sincos(pos):  # (h, w) -> (h * w, C/2)
        out = pos.reshape(-1).double()[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([sincos(col), sincos(row)], dim=1).float()


class LinearAttention(nn.Module):
    """Self-attention of a block (`attn`): fused bias-free qkv, ReLU linear attention, proj."""

    def __init__(self, width, heads, qk_norm, *, dtype=None, device=None, ops=nn):
        super().__init__()
        self.head_dim = width // heads
        self.qkv = ops.Linear(width, 3 * width, bias=False, dtype=dtype, device=device)
        self.proj = ops.Linear(width, width, dtype=dtype, device=device)
        self.q_norm = RMSNorm(width, dtype=dtype, device=device) if qk_norm else None
        self.k_norm = RMSNorm(width, dtype=dtype, device=device) if qk_norm else None
        self.band = None  # sana_core.parallel.Band while x is one row band of the image: it adds the others' sums

    def forward(self, x, perturbed=None):  # (B, N, C)
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, N, C) each
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        reduce = None if self.band is None else self.band.all_reduce_kv
        out = linear_attention(q, k, v, LINEAR_ATTENTION_EPS, head_dim=self.head_dim, reduce=reduce)  # (B, N, C)
        if perturbed is not None:  # PAG: identity attention (output = V) for the marked samples
            out = torch.where(perturbed[:, None, None], v, out)
        out = self.proj(out)
        return out.clamp(-FP16_MAX, FP16_MAX) if out.dtype == torch.float16 else out


class CrossAttention(nn.Module):
    """Image tokens attend to the caption (`cross_attn`): softmax attention, padding masked."""

    def __init__(self, width, heads, qk_norm, *, dtype=None, device=None, ops=nn):
        super().__init__()
        self.heads = heads
        self.q_linear = ops.Linear(width, width, dtype=dtype, device=device)
        self.kv_linear = ops.Linear(width, 2 * width, dtype=dtype, device=device)
        self.proj = ops.Linear(width, width, dtype=dtype, device=device)
        self.q_norm = RMSNorm(width, dtype=dtype, device=device) if qk_norm else None
        self.k_norm = RMSNorm(width, dtype=dtype, device=device) if qk_norm else None

    def caption_kv(self, y):  # y (B, T, C) -> k, v (B, heads, T, d) each: the text side, the same at every step
        k, v = self.kv_linear(y).chunk(2, dim=-1)  # (B, T, C) each
        if self.k_norm is not None:
            k = self.k_norm(k)
        return tuple(t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (k, v))

    def forward(self, x, kv, keep=None):  # x (B, N, C), kv from caption_kv, keep (B, 1, 1, T) bool or None
        q = self.q_linear(x)
        if self.q_norm is not None:
            q = self.q_norm(q)
        N, pad = q.shape[1], -q.shape[1] % QUERY_BUCKET
        if pad:
            q = F.pad(q, (0, 0, 0, pad))  # (B, N', C): zero rows (each query attends on its own)
        q = q.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, N', d)
        out = F.scaled_dot_product_attention(q, *kv, attn_mask=keep)  # (B, heads, N', d)
        return self.proj(out.transpose(1, 2)[:, :N].flatten(2))  # (B, N, C)


class Caption(NamedTuple):
    """The caption side of every block's cross-attention: constant over the sampling steps, so the
    sampler computes it once per prompt (SanaTransformer.encode_caption) and passes it as `context`."""
    kv: tuple  # per block: (k, v), each (B, heads, T, d)
    keep: torch.Tensor | None  # (B, 1, 1, T) bool: the caption tokens attended to; None: all


def residual_adaln(x, residual, shift, scale):
    """The seam between two sub-layers: x + gate * y for residual = (gate, y) (gate None: x + y), then
    the next adaLN of it, in one pass over the tokens. Returns (x, adaln(x)). residual None: no add.
    float16 clamps the residual stream to its range before the norm (diffusers clamps after each block)."""
    if residual is None:
        return x, adaln(x, shift, scale)
    gate, y = residual
    if x.dtype == torch.float16:
        x = (x + y if gate is None else torch.addcmul(x, gate, y)).clamp_(-FP16_MAX, FP16_MAX)
        return x, adaln(x, shift, scale)
    if gate is None:
        gate = x.new_ones(x.shape[-1])
    return gated_residual_adaln(x, y, gate, shift, scale)


def block_output(x, residual):
    """A block's whole output: x plus its pending gated Mix-FFN residual (float16 clamped, as diffusers does)."""
    x = torch.addcmul(x, *residual)
    return x.clamp_(-FP16_MAX, FP16_MAX) if x.dtype == torch.float16 else x


class ConvLayer(nn.Module):
    """Holds a conv under the original name (`mlp.inverted_conv.conv.weight`, ...)."""

    def __init__(self, c_in, c_out, kernel, *, groups=1, bias=True, dtype=None, device=None, ops=nn):
        super().__init__()
        self.conv = ops.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=bias,
                               dtype=dtype, device=device)


class MixFFN(nn.Module):
    """GLUMBConv: 1x1 conv C -> 2H + SiLU, 3x3 depthwise conv, value * SiLU(gate), 1x1 conv H -> C.
    The 1x1 convs run as matmuls on the (B, N, C) tokens, the depthwise conv + GLU as one kernel, reading the
    layers' weights; layers that take their weights through ComfyUI's cast path are called instead."""

    def __init__(self, width, hidden, *, dtype=None, device=None, ops=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device, ops=ops)
        self.inverted_conv = ConvLayer(width, 2 * hidden, 1, **kw)
        self.depth_conv = ConvLayer(2 * hidden, 2 * hidden, 3, groups=2 * hidden, **kw)
        self.point_conv = ConvLayer(hidden, width, 1, bias=False, **kw)
        self.band = None  # sana_core.parallel.Band while x is one row band of the image: it adds the halo rows

    def forward(self, x, h, w):  # (B, N, C)
        inv, depth, point = self.inverted_conv.conv, self.depth_conv.conv, self.point_conv.conv
        inv_weight, point_weight = matmul_weight(inv, x), matmul_weight(point, x)
        if inv_weight is None or point_weight is None or not reads_weights_directly(depth):
            if self.band is not None:
                raise NotImplementedError("row-band parallel sampling needs layers whose weights it can read "
                                          "(no ComfyUI cast or on-the-fly patches)")
            return self._through_layers(x, h, w)
        x = F.silu(F.linear(x, inv_weight.flatten(1), inv.bias), inplace=True)  # (B, N, 2H)
        conv_glu = depthwise_conv_glu if self.band is None else self.band.depthwise_conv_glu
        x = conv_glu(x, depth.weight, depth.bias, h, w)  # (B, N, H)
        return F.linear(x, point_weight.flatten(1))  # (B, N, C)

    def _through_layers(self, x, h, w):  # the same function, each conv called as a layer on the (B, C, h, w) grid
        x = F.silu(self.inverted_conv.conv(x.transpose(1, 2).unflatten(2, (h, w))))  # (B, 2H, h, w)
        x, gate = self.depth_conv.conv(x).chunk(2, dim=1)  # (B, H, h, w) each
        return self.point_conv.conv(x * F.silu(gate)).flatten(2).transpose(1, 2)  # (B, N, C)


class Block(nn.Module):
    """adaLN-single block: modulated linear self-attention, cross-attention, modulated Mix-FFN."""

    def __init__(self, cfg: SanaConfig, *, dtype=None, device=None, ops=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.scale_shift_table = nn.Parameter(torch.zeros(6, cfg.width, **kw))
        self.attn = LinearAttention(cfg.width, cfg.self_heads, cfg.qk_norm, **kw, ops=ops)
        self.cross_attn = CrossAttention(cfg.width, cfg.cross_heads, cfg.qk_norm, **kw, ops=ops)
        self.mlp = MixFFN(cfg.width, cfg.mlp_hidden, **kw, ops=ops)

    def forward(self, x, residual, kv, keep, t0, h, w, perturbed=None):
        """x (B, N, C) residual stream; residual: (gate, y) the previous block's gated Mix-FFN output, still
        to be added to x (fused with this block's first adaLN), or None; kv, keep: this block's caption
        side; t0 (B, 6C). Returns (x, (gate_mlp, mix_ffn_out)): the last residual is left to the caller."""
        B, N, C = x.shape
        mod = cast_like(self.scale_shift_table, t0)[None] + t0.reshape(B, 6, C)  # (B, 6, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)  # (B, 1, C) each
        x, normed = residual_adaln(x, residual, shift_msa, scale_msa)
        x = torch.addcmul(x, gate_msa, self.attn(normed, perturbed))  # x + gate_msa * attn
        x, normed = residual_adaln(x, (None, self.cross_attn(x, kv, keep)), shift_mlp, scale_mlp)
        return x, (gate_mlp, self.mlp(normed, h, w))


class FinalLayer(nn.Module):
    def __init__(self, width, out_channels, *, dtype=None, device=None, ops=nn):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.zeros(2, width, dtype=dtype, device=device))
        self.linear = ops.Linear(width, out_channels, dtype=dtype, device=device)

    def forward(self, x, residual, t):  # x (B, N, C) + the last block's residual, t (B, C): timestep embedding
        shift, scale = (cast_like(self.scale_shift_table, t)[None] + t[:, None]).chunk(2, dim=1)  # (B, 1, C) each
        return self.linear(residual_adaln(x, residual, shift, scale)[1])  # (B, N, out)


class SanaTransformer(nn.Module):
    """The DiT. dtype, device: of the weights as built. operations: where the Linear and Conv2d layers come
    from (ComfyUI's comfy.ops classes; None: torch.nn; see sana_core.operations). compute_dtype: the dtype
    activations run in when it differs from the weights' (manual cast: weights stored in fp8 or fp16,
    computed in bf16); None: the weights' dtype."""

    def __init__(self, config: SanaConfig, *, dtype=None, device=None, operations=None, compute_dtype=None):
        super().__init__()
        cfg, kw, ops = config, dict(dtype=dtype, device=device), operations or nn
        self.config = cfg
        self.compute_dtype = compute_dtype
        self.x_embedder = nn.Module()
        self.x_embedder.proj = ops.Conv2d(cfg.in_channels, cfg.width, 1, **kw)
        self.t_embedder = TimestepEmbedder(cfg.width, **kw, ops=ops)
        self.cfg_embedder = TimestepEmbedder(cfg.width, **kw, ops=ops) if cfg.sprint else None
        self.t_block = nn.Sequential(nn.SiLU(), ops.Linear(cfg.width, 6 * cfg.width, **kw))
        self.y_embedder = CaptionEmbedder(cfg.caption_dim, cfg.width, **kw, ops=ops)
        self.attention_y_norm = RMSNorm(cfg.width, **kw)
        self.blocks = nn.ModuleList([Block(cfg, **kw, ops=ops) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg.width, cfg.out_channels, **kw, ops=ops)
        self._pos_embed = None  # (h, w, device, dtype, tensor): a cache, not a buffer (meta-built models)
        self.band = None  # sana_core.parallel.Band: this process computes (and returns) one row band of the image

    @property
    def dtype(self):
        """The dtype activations run in."""
        return self.compute_dtype or self.x_embedder.proj.weight.dtype

    @property
    def device(self):
        return self.x_embedder.proj.weight.device

    def pos_embed(self, h, w, device, dtype):  # (1, h * w, C)
        key = (h, w, device, dtype)
        if self._pos_embed is None or self._pos_embed[:4] != key:
            cfg = self.config
            pe = sincos_pos_embed(cfg.width, h, w, cfg.pe_interpolation, cfg.base_size)
            self._pos_embed = key + (pe[None].to(device=device, dtype=dtype),)
        return self._pos_embed[4]

    def clear_device_caches(self) -> None:
        """After a memory manager (ComfyUI's) moved the weights: drop the cached position embedding, made
        on the old device. (Captured CUDA graphs notice moved weights themselves.)"""
        self._pos_embed = None

    def encode_caption(self, context, context_mask=None, *, device=None) -> Caption:
        """The caption side of every cross-attention (caption embedder, norm, each block's k/v): the same
        at every sampling step, so samplers compute it once and pass the Caption as `context`.
        context (B, T, caption_dim) Gemma hidden states; context_mask (B, T) 1 real / 0 padding or None;
        device: where to compute (None: the weights' device; a partially loaded model's is its load device)."""
        cfg = self.config
        if context.ndim != 3 or context.shape[2] != cfg.caption_dim:
            raise ValueError(f"context has shape {list(context.shape)}; this model expects [B, T, {cfg.caption_dim}] "
                             f"(text-encoder hidden states of width {cfg.caption_dim})")
        if context_mask is not None and tuple(context_mask.shape) != tuple(context.shape[:2]):
            raise ValueError(f"context_mask has shape {list(context_mask.shape)}; expected {list(context.shape[:2])}")
        y = self.attention_y_norm(self.y_embedder(context.to(device=device or self.device, dtype=self.dtype)))
        keep = None
        if context_mask is not None:
            keep = context_mask.to(y.device).bool()
            keep = keep | ~keep.any(dim=1, keepdim=True)  # an all-padding caption attends to everything (no NaN)
            keep = keep[:, None, None, :]  # (B, 1, 1, T)
        return Caption(tuple(block.cross_attn.caption_kv(y) for block in self.blocks), keep)

    def forward(self, x, timestep, context, context_mask=None, guidance=None, *, perturbed=None,
                perturbed_layers=(), control=None):
        """x (B, 32, h, w) latent; timestep (B,) flow time t in [0, 1] times 1000; context (B, T, 2304)
        Gemma hidden states, or the Caption that encode_caption made of them (then no context_mask);
        context_mask (B, T) 1 real / 0 padding; guidance (B,) raw guidance scale, Sprint models only;
        perturbed (B,) bool: samples whose self-attention is the identity on V in the blocks
        `perturbed_layers` (PAG); control: ControlNets prepared for this call (sana_core.controlnet: an object
        whose residuals(x, x0, timestep, t0, h, w) gives {block index: (B, N, C) added to that block's output},
        called once with block 0's output x0). Returns the velocity, x's dtype."""
        cfg = self.config
        timestep = torch.as_tensor(timestep, device=x.device)
        guidance = None if guidance is None else torch.as_tensor(guidance, device=x.device)
        B, h, w = self._check_inputs(x, timestep, context, context_mask, guidance, perturbed, perturbed_layers)
        caption = context if isinstance(context, Caption) else self.encode_caption(context, context_mask,
                                                                                   device=x.device)
        dtype, out_dtype = self.dtype, x.dtype
        timestep = timestep.reshape(-1).expand(B)

        tokens = self.x_embedder.proj(x.to(dtype)).flatten(2).transpose(1, 2)  # (B, N, C)
        if cfg.pe_interpolation is not None:
            tokens = (tokens.float() + self.pos_embed(h, w, tokens.device, torch.float32)).to(dtype)
        if self.band is not None:  # sana_core.parallel: from here on only the band's rows
            tokens, h = self.band.take_rows(tokens), self.band.height
        if cfg.sprint:
            t = self.t_embedder(timestep / SPRINT_TIMESTEP_SCALE, dtype)  # (B, C)
            t = t + self.cfg_embedder(guidance.reshape(-1).expand(B) * cfg.guidance_embeds_scale, dtype)
        else:
            t = self.t_embedder(timestep * cfg.timestep_scale, dtype)  # (B, C)
        t0 = self.t_block(t)  # (B, 6C)

        perturbed_layers = set(perturbed_layers) if perturbed is not None else ()
        residual = None  # each block's gated Mix-FFN output is added by the next norm (one pass)
        adds = {}  # ControlNets: block index -> residual added to that block's output
        for i, (block, kv) in enumerate(zip(self.blocks, caption.kv)):
            tokens, residual = block(tokens, residual, kv, caption.keep, t0, h, w,
                                     perturbed if i in perturbed_layers else None)
            if control is not None and (i == 0 or i in adds):  # ---- ControlNet hook (sana_core.controlnet)
                tokens, residual = block_output(tokens, residual), None
                if i == 0:
                    adds = control.residuals(x.to(dtype), tokens, timestep, t0, h, w)
                if i in adds:
                    tokens = tokens + adds[i]

        out = self.final_layer(tokens, residual, t)  # (B, N, 32)
        return out.transpose(1, 2).unflatten(2, (h, w)).to(out_dtype)  # (B, 32, h, w)

    def _check_inputs(self, x, timestep, context, context_mask, guidance, perturbed, perturbed_layers):
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"latent has shape {list(x.shape)}; this model expects [B, {cfg.in_channels}, h, w] "
                             f"(a DC-AE f32c32 latent, 1/32 of the image size)")
        B, _, h, w = x.shape
        if isinstance(context, Caption):
            if context_mask is not None:
                raise ValueError("context is an encoded Caption (its mask is inside): pass context_mask=None")
            if len(context.kv) != cfg.depth or context.kv[0][0].shape[0] != B:
                raise ValueError(f"the Caption holds {len(context.kv)} blocks x batch {context.kv[0][0].shape[0]}; "
                                 f"this model needs {cfg.depth} blocks x batch {B}: encode it with this model")
        elif context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.caption_dim:
            raise ValueError(f"context has shape {list(context.shape)}; this model expects [{B}, T, {cfg.caption_dim}] "
                             f"(text-encoder hidden states of width {cfg.caption_dim}, one row per latent)")
        elif context_mask is not None and tuple(context_mask.shape) != tuple(context.shape[:2]):
            raise ValueError(f"context_mask has shape {list(context_mask.shape)}; expected {list(context.shape[:2])}")
        if timestep.numel() not in (1, B):
            raise ValueError(f"timestep has {timestep.numel()} values for a batch of {B}")
        if cfg.sprint and guidance is None:
            raise ValueError(f"{cfg.variant} is a Sana-Sprint model: pass guidance=[B] (the guidance scale, e.g. 4.5)")
        if not cfg.sprint and guidance is not None:
            raise ValueError(f"{cfg.variant} has no guidance embedder; guidance is only for Sana-Sprint models "
                             f"(use classifier-free guidance instead)")
        if guidance is not None and guidance.numel() not in (1, B):
            raise ValueError(f"guidance has {guidance.numel()} values for a batch of {B}")
        if perturbed is not None:
            if perturbed.dtype != torch.bool or tuple(perturbed.shape) != (B,):
                raise ValueError(f"perturbed must be a bool tensor of shape [{B}], got {perturbed.dtype} "
                                 f"{list(perturbed.shape)}")
            bad = [i for i in perturbed_layers if not 0 <= i < cfg.depth]
            if bad:
                raise ValueError(f"perturbed_layers {bad} out of range: the model has blocks 0..{cfg.depth - 1}")
        return B, h, w


# ----------------------------------------------------------------------------- loading

IGNORED_KEYS = ("pos_embed", "patch_embed.pos_embed", "y_embedder.y_embedding")  # stale buffer, training-time null caption
IGNORED_PREFIXES = ("logvar_linear.", "controlnet.")  # Sprint's training-only head; an original ControlNet file's own
# blocks (that file holds the whole model: load_transformer loads its base DiT, load_controlnet the rest)
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")  # ComfyUI single files

# diffusers name prefix -> original name prefix (the suffix `weight`/`bias` is kept)
DIFFUSERS_NAMES = {
    "patch_embed.proj.": "x_embedder.proj.",
    "patch_embed.pos_embed": "pos_embed",
    "time_embed.emb.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
    "time_embed.emb.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
    "time_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",  # Sprint
    "time_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
    "time_embed.guidance_embedder.linear_1.": "cfg_embedder.mlp.0.",
    "time_embed.guidance_embedder.linear_2.": "cfg_embedder.mlp.2.",
    "time_embed.linear.": "t_block.1.",
    "caption_projection.linear_1.": "y_embedder.y_proj.fc1.",
    "caption_projection.linear_2.": "y_embedder.y_proj.fc2.",
    "caption_norm.": "attention_y_norm.",
    "scale_shift_table": "final_layer.scale_shift_table",
    "proj_out.": "final_layer.linear.",
}
DIFFUSERS_BLOCK_NAMES = {  # inside transformer_blocks.{i}. -> inside blocks.{i}.
    "scale_shift_table": "scale_shift_table",
    "attn1.to_out.0.": "attn.proj.",
    "attn1.norm_q.": "attn.q_norm.",
    "attn1.norm_k.": "attn.k_norm.",
    "attn2.to_q.": "cross_attn.q_linear.",
    "attn2.to_out.0.": "cross_attn.proj.",
    "attn2.norm_q.": "cross_attn.q_norm.",
    "attn2.norm_k.": "cross_attn.k_norm.",
    "ff.conv_inverted.": "mlp.inverted_conv.conv.",
    "ff.conv_depth.": "mlp.depth_conv.conv.",
    "ff.conv_point.": "mlp.point_conv.conv.",
}
DIFFUSERS_FUSED = {  # original tensor = concatenation (dim 0) of these diffusers tensors, in order
    "attn.qkv.": ("attn1.to_q.", "attn1.to_k.", "attn1.to_v."),
    "cross_attn.kv_linear.": ("attn2.to_k.", "attn2.to_v."),
}

# keys of metadata / diffusers config.json -> SanaConfig field
CONFIG_KEYS = {
    "cross_heads": "cross_heads", "num_cross_attention_heads": "cross_heads",
    "self_heads": "self_heads", "num_attention_heads": "self_heads",
    "pe_interpolation": "pe_interpolation", "interpolation_scale": "pe_interpolation",
    "base_size": "base_size", "sample_size": "base_size",
    "timestep_scale": "timestep_scale", "guidance_embeds_scale": "guidance_embeds_scale",
}
HINTS = ("cross_heads", "self_heads", "pe_interpolation", "base_size", "resolution", "timestep_scale",
         "guidance_embeds_scale")


class FusedTensors(Mapping):
    """Original-named view of diffusers tensors; q/k/v and k/v are concatenated when read, one
    tensor at a time, so loading never holds a second copy of the model."""

    def __init__(self, tensors: dict, sources: dict):
        self.tensors, self.sources = tensors, sources  # original name -> tuple of diffusers names

    def __getitem__(self, name):
        parts = [self.tensors[s] for s in self.sources[name]]
        return parts[0] if len(parts) == 1 else cat_rows(parts)  # torch.cat, quantized parts too

    def __iter__(self):
        return iter(self.sources)

    def __len__(self):
        return len(self.sources)


def _rename(name, names: dict) -> str:
    for old, new in names.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def diffusers_to_original(tensors: dict) -> FusedTensors:
    """Rename diffusers `SanaTransformer2DModel` tensors to the original NVlabs names. Names
    with no mapping are kept as they are (the loader then reports them as unexpected)."""
    sources = {}
    for key in tensors:
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", key)
        if m is None:
            sources[_rename(key, DIFFUSERS_NAMES)] = (key,)
            continue
        diffusers_block, block, rest = f"transformer_blocks.{m[1]}.", f"blocks.{m[1]}.", m[2]
        for new, parts in DIFFUSERS_FUSED.items():
            if rest.startswith(parts[0]):  # the first part names the fused tensor
                suffix = rest[len(parts[0]):]
                sources[block + new + suffix] = tuple(diffusers_block + p + suffix for p in parts)
                break
        else:
            if not any(rest.startswith(p) for parts in DIFFUSERS_FUSED.values() for p in parts[1:]):
                sources[block + _rename(rest, DIFFUSERS_BLOCK_NAMES)] = (key,)
    missing = sorted(s for parts in sources.values() for s in parts if s not in tensors)
    if missing:
        raise CheckpointError(f"the weights lack {len(missing)} tensor(s): {', '.join(missing[:8])}")
    return FusedTensors(tensors, sources)


def _ignored(name: str) -> bool:
    return name in IGNORED_KEYS or name.startswith(IGNORED_PREFIXES)


def _parse_config(metadata: dict) -> dict:
    """Settings found in a folder's config.json or a safetensors metadata "config" JSON. A diffusers
    config.json is read as diffusers reads it: `interpolation_scale` absent or null means no position
    embedding, and a Sprint model's `timestep_scale` is unused (its pipeline passes t in [0, 1])."""
    raw = metadata.get("config")
    diffusers_config = isinstance(raw, dict)  # a folder's config.json (safetensors metadata is a string)
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return {}
    if not isinstance(raw, dict):
        return {}
    out = {CONFIG_KEYS[k]: v for k, v in raw.items() if k in CONFIG_KEYS}
    if diffusers_config:
        out["pe_interpolation"] = raw.get("interpolation_scale")
        if raw.get("guidance_embeds"):
            out.pop("timestep_scale", None)
    if out.get("pe_interpolation") is None:
        out.pop("base_size", None)  # diffusers' sample_size matters only with a position embedding
    return out


def _pe_from_resolution(side) -> dict:
    pe, base = PE_BY_RESOLUTION.get(int(side), (None, None))
    return {"pe_interpolation": pe, "base_size": base}


def _pe_from_names(names) -> dict:
    """From an original-format file's name: '2K', '2Kpx', '2048' -> the 2K setting; '4K', '4096' -> 4K."""
    for name in names:
        m = re.search(r"(?<![0-9])(2048|4096)(?![0-9])|(?<![0-9a-z])([24])k(?:px)?(?![0-9a-z])", name.lower())
        if m:
            return _pe_from_resolution(int(m[1]) if m[1] else {"2": 2048, "4": 4096}[m[2]])
    return {}


def _pe_from_stale(stale) -> dict:
    """From the stale `pos_embed` buffer of an original file: its length is the trained grid
    (64 x 64 in 2K files, 128 x 128 in 4K files; 32 x 32 in 1024 px files, which use none)."""
    if stale is None or stale.ndim != 3 or math.isqrt(stale.shape[1]) ** 2 != stale.shape[1]:
        return {}
    side = 32 * math.isqrt(stale.shape[1])
    return _pe_from_resolution(side) if side in PE_BY_RESOLUTION else {}


def _settings(hints: dict, metadata: dict, names, stale) -> dict:
    """Heads and position-embedding setting, first found wins: hints, metadata / config.json,
    the file name, the stale pos_embed. A source that names pe_interpolation (None included)
    decides it together with base_size."""
    unknown = sorted(set(hints) - set(HINTS))
    if unknown:
        raise TypeError(f"unknown transformer hint(s) {', '.join(unknown)}; accepted: {', '.join(HINTS)}")
    # None means "not given", except for pe_interpolation, where it means "no position embedding"
    settings = {k: v for k, v in hints.items() if k != "resolution" and (v is not None or k == "pe_interpolation")}
    if hints.get("resolution") is not None and "pe_interpolation" not in settings:
        settings.update(_pe_from_resolution(hints["resolution"]))
    for source in (_parse_config(metadata), _pe_from_names(names), _pe_from_stale(stale)):
        if "pe_interpolation" in settings:
            source = {k: v for k, v in source.items() if k not in ("pe_interpolation", "base_size")}
        settings = {**source, **settings}
    return settings


def attention_heads(width: int, settings: dict, what="model") -> tuple[int, int]:
    """(self-attention heads, cross-attention heads) of a width: from settings, else the published models'."""
    self_heads = settings.get("self_heads") or width // SELF_HEAD_DIM
    cross_heads = settings.get("cross_heads") or CROSS_HEADS.get(width)
    if cross_heads is None:
        raise CheckpointError(f"cannot tell the cross-attention heads of a width-{width} {what} (published "
                              f"widths: {', '.join(map(str, CROSS_HEADS))}): pass cross_heads=N, or store it in "
                              f"a config.json / safetensors metadata 'config' as num_cross_attention_heads",
                              needs="cross_heads")
    if width % self_heads or width % cross_heads:
        raise CheckpointError(f"width {width} is not divisible by the heads ({self_heads} self, {cross_heads} cross)")
    return self_heads, cross_heads


def detect_config(tensors, settings: dict) -> SanaConfig:
    """The model's structure from its (original-named) tensors; heads and position embedding
    from `settings` where the tensors cannot tell."""
    for key in ("x_embedder.proj.weight", "blocks.0.attn.qkv.weight", "y_embedder.y_proj.fc1.weight",
                "blocks.0.mlp.point_conv.conv.weight", "final_layer.linear.weight"):
        if key not in tensors:
            raise CheckpointError(f"no {key}: this is not a SANA transformer ({describe(tensors)})")
    width, in_channels, p, _ = tensors["x_embedder.proj.weight"].shape
    if p != 1:
        raise CheckpointError(f"patch size {p} is not supported: SANA models use patch size 1")
    self_heads, cross_heads = attention_heads(width, settings)
    pe, base = settings.get("pe_interpolation"), settings.get("base_size")
    if pe is not None and base is None:
        raise CheckpointError(f"pe_interpolation={pe} needs base_size= (the latent side the model was trained "
                              f"at: 64 for 2K models, 128 for 4K) or resolution=2048/4096", needs="base_size")
    return SanaConfig(
        depth=1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("blocks.")),
        width=width, caption_dim=tensors["y_embedder.y_proj.fc1.weight"].shape[1],
        self_heads=self_heads, cross_heads=cross_heads,
        mlp_hidden=tensors["blocks.0.mlp.point_conv.conv.weight"].shape[1],
        qk_norm="blocks.0.attn.q_norm.weight" in tensors, sprint="cfg_embedder.mlp.0.weight" in tensors,
        pe_interpolation=None if pe is None else float(pe), base_size=None if pe is None else int(base),
        in_channels=in_channels, out_channels=tensors["final_layer.linear.weight"].shape[0],
        timestep_scale=float(settings.get("timestep_scale", 1.0)),
        guidance_embeds_scale=float(settings.get("guidance_embeds_scale", GUIDANCE_EMBED_SCALE)),
    )


def load_transformer(path, *, dtype=None, device=None, operations=None, **hints) -> SanaTransformer:
    """Load a SANA DiT from an original NVlabs .pth/.safetensors (ComfyUI prefixes too), a
    diffusers folder (or pipeline folder) or a diffusers-keyed .safetensors; the format is
    told by the key names. The structure comes from the tensors. Hints, for what they cannot
    tell: `pe_interpolation` and `base_size`, or `resolution` (2048/4096), for the 2K/4K position
    embedding (else read from metadata, config.json, the file name or the stale pos_embed),
    `cross_heads`, `self_heads` (needed only for non-published widths), `timestep_scale`,
    `guidance_embeds_scale` (else read from config.json / metadata; defaults 1.0 and 0.1).
    A diffusers config.json decides the position embedding (none without `interpolation_scale`);
    only an original-format file's own name or its stale pos_embed may hint 2K/4K, never a folder.
    `operations`: the Linear / Conv2d classes to build with (ComfyUI's comfy.ops; None: torch.nn)."""
    path = Path(path)
    if path.is_dir() and (path / "transformer").is_dir() and not any(path.glob("*.safetensors")):
        path = path / "transformer"  # a diffusers pipeline folder
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    tensors, metadata = read_quantized_checkpoint(path, weight_names=("diffusion_pytorch_model", "model"), dtype=dtype)
    tensors = strip_prefix(tensors, PREFIXES)
    kind = guess_component(tensors)
    if kind != "transformer":
        loader = {"autoencoder": "load_autoencoder (the VAE loader)", "text_encoder": "load_text_encoder (the "
                  "text-encoder loader)", "controlnet": "load_controlnet (the SANA ControlNet loader)"}.get(kind)
        raise CheckpointError(f"{path.name} is not a SANA transformer: it holds {describe(tensors)}"
                              + (f"; load it with {loader}" if loader else ""),
                              found=kind if loader else None)
    stale = tensors.get("pos_embed")
    tensors = {k: v for k, v in tensors.items() if not _ignored(k)}
    try:
        original_format = not any(k.startswith(("transformer_blocks.", "patch_embed.")) for k in tensors)
        if not original_format:
            tensors = diffusers_to_original(tensors)
        names = [path.name] if original_format and path.is_file() else []
        config = detect_config(tensors, _settings(hints, metadata, names, stale))
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}", found=e.found, needs=e.needs) from None
    log.info("%s: %s (pe_interpolation=%s, base_size=%s)", path.name, config.variant,
             config.pe_interpolation, config.base_size)

    with torch.device("meta"):
        model = SanaTransformer(config, dtype=dtype, operations=operations)
    try:
        return load_quantized_weights(model, tensors, metadata, device=device, dtype=dtype)  # else load_weights
    except CheckpointError as e:
        raise CheckpointError(f"{path.name} (detected {config.variant}): {e}") from None


def random_state_dict(config: SanaConfig, *, seed=0, dtype=torch.float32) -> dict:
    """Random weights with the original names, every tensor non-zero (gates, final layer
    included), scaled so that activations stay O(1): for tests, demos and benchmarks."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in SanaTransformer(config).state_dict().items()}
    out = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("scale_shift_table"):
            t = torch.randn(shape, generator=g) / shape[-1] ** 0.5
        elif name.endswith("bias") or len(shape) == 1:
            t = 0.1 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / math.prod(shape[1:]) ** 0.5
        out[name] = t.to(dtype)
    return out


def config_metadata(config: SanaConfig) -> dict:
    """safetensors metadata that lets load_transformer read a config the tensors cannot tell."""
    return {"config": json.dumps(asdict(config))}
