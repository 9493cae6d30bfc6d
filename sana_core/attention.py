"""The three hot spots of a SANA block as plain PyTorch functions.

Each takes and returns tokens in the (B, N, C) layout (N = h * w latent pixels, row-major) and
has the name and signature of its Triton twin in `sana_core.kernels`, so that swapping is one
import line in transformer.py:

    linear_attention(q, k, v, eps, *, head_dim=32)       ReLU linear attention, q/k/v -> normalised output
    depthwise_conv_glu(x, weight, bias, height, width)   Mix-FFN middle: 3x3 depthwise conv + bias + GLU gate
    adaln(x, shift, scale, eps=1e-6)                     LayerNorm (no affine) * (1 + scale) + shift

Numerics: the linear-attention sums (relu(K)^T V, sum of relu(K), the final division) are
always float32, whatever the input dtype: in fp16 the sums over thousands of tokens overflow
(the black/NaN images of fp16 SANA). The output is cast back to the input dtype.
"""
import torch
import torch.nn.functional as F

# Added to the denominator of the linear attention. diffusers uses 1e-15, the official
# blocks 1e-8; with float32 sums the difference is below float32 resolution unless a query
# is orthogonal to every key (then numerator and denominator are both 0 and the output is 0).
LINEAR_ATTENTION_EPS = 1e-15
LAYER_NORM_EPS = 1e-6


def linear_attention(q, k, v, eps: float = LINEAR_ATTENTION_EPS, *, head_dim: int = 32) -> torch.Tensor:
    """out_i = sum_j v_j (relu(k_j) . relu(q_i)) / (sum_j relu(k_j) . relu(q_i) + eps), per head.

    q, k, v: (B, N, C) each, C = heads * head_dim, heads along C; they may be strided views into
    the fused qkv projection output (`qkv.chunk(3, dim=-1)`, after q/k RMSNorm where the model has
    it). Returns (B, N, C) in q's dtype.
    """
    dtype = q.dtype
    q = F.relu(q).float().unflatten(-1, (-1, head_dim))  # (B, N, H, D)
    k = F.relu(k).float().unflatten(-1, (-1, head_dim))  # (B, N, H, D)
    v = v.float().unflatten(-1, (-1, head_dim))  # (B, N, H, D)
    kv = torch.einsum("bnhd,bnhe->bhde", k, v)  # (B, H, D, D): sum_j relu(k_j)^T v_j
    k_sum = k.sum(dim=1)  # (B, H, D)
    num = torch.einsum("bnhd,bhde->bnhe", q, kv)  # (B, N, H, D)
    den = torch.einsum("bnhd,bhd->bnh", q, k_sum)  # (B, N, H)
    out = num / (den.unsqueeze(-1) + eps)
    return out.flatten(2).to(dtype)  # (B, N, C)


def depthwise_conv_glu(x, weight, bias, height: int, width: int) -> torch.Tensor:
    """The middle of the Mix-FFN (GLUMBConv): 3x3 depthwise conv (zero padding) + bias over the
    (h, w) latent grid, split into (value, gate) halves, value * SiLU(gate).

    x: (B, N, 2H) tokens, N = height * width, the SiLU'd output of the 1x1 inverted conv;
    weight: (2H, 1, 3, 3); bias: (2H,). Returns (B, N, H).
    """
    B, N, C2 = x.shape
    grid = x.transpose(1, 2).unflatten(2, (height, width))  # (B, 2H, h, w), channels-last in memory
    y = F.conv2d(grid, weight, bias, padding=1, groups=C2)  # (B, 2H, h, w)
    value, gate = y.flatten(2).transpose(1, 2).chunk(2, dim=-1)  # (B, N, H) each
    return value * F.silu(gate)


def adaln(x, shift, scale, eps: float = LAYER_NORM_EPS) -> torch.Tensor:
    """LayerNorm over C without affine weights, then x * (1 + scale) + shift.

    x: (B, N, C); shift, scale: (B, 1, C). Returns (B, N, C) in x's dtype.
    """
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale) + shift
