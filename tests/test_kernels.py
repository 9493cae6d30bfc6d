"""sana_core.kernels: each Triton kernel and its PyTorch twin compute the model's math.

On a CPU machine (CI) the Triton kernels run under TRITON_INTERPRET=1 (conftest sets it before anything
imports Triton), at small awkward sizes; with a GPU they run natively. References are float64 and written
independently of the code under test (quadratic attention, F.conv2d, F.layer_norm), and the layouts are
checked against diffusers' own modules. Triton's interpreter computes bfloat16 wrongly (it stores bf16 as
uint16 and does arithmetic on the bits), so bf16 is checked on the GPU only (bench/kernels_gpu.py).
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from sana_core import kernels as K

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS_TRITON = K.HAS_TRITON and (DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(not RUNS_TRITON, reason="Triton missing, or no GPU and no TRITON_INTERPRET=1")
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5 if DEVICE == "cpu" else 1e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture
def triton_backend():
    K.set_backend("triton")
    yield
    K.set_backend("auto")


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an element the kernel leaves unwritten fails."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE).to(dtype)


# --- float64 references, straight from the formulas (no code shared with the kernels' twins) ---

def attention_ref(q, k, v, eps, mask=None):
    """Quadratic form per head: out_i = sum_j v_j (k_j . q_i) / (sum_j k_j . q_i + eps); (B, h, N, D)."""
    q, k, v = q.double().relu(), k.double().relu(), v.double()
    scores = q @ k.transpose(-1, -2)                                           # (B, h, N, N)
    if mask is not None:
        scores = scores * mask.double()[:, None, None, :]
    return (scores @ v) / (scores.sum(-1, keepdim=True) + eps)


def dit_attention_ref(q, k, v, eps, mask=None):  # (B, N, C) -> (B, N, C), heads of 32 along C
    h = [t.unflatten(-1, (-1, 32)).transpose(1, 2) for t in (q, k, v)]
    return attention_ref(*h, eps, mask).transpose(1, 2).flatten(2)


def dcae_attention_ref(qkv, eps):  # diffusers' layout: reshape(B, -1, 3*32, H*W), chunk(3, dim=2)
    B, _, H, W = qkv.shape
    q, k, v = qkv.double().reshape(B, -1, 96, H * W).chunk(3, dim=2)           # (B, G, 32, HW)
    out = attention_ref(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2), eps)
    return out.transpose(-1, -2).reshape(B, -1, H, W)


def conv_glu_ref(x, weight, bias, height, width):
    B, N, C2 = x.shape
    y = F.conv2d(x.double().transpose(1, 2).reshape(B, C2, height, width), weight.double(), bias.double(),
                 padding=1, groups=C2)
    y, gate = y.chunk(2, dim=1)
    return (y * gate * torch.sigmoid(gate)).flatten(2).transpose(1, 2)


def adaln_ref(x, shift, scale, eps=1e-6):
    C = x.shape[-1]
    return F.layer_norm(x.double(), (C,), eps=eps) * (1 + scale.double().reshape(-1, 1, C)) + \
        shift.double().reshape(-1, 1, C)


def channel_rms_norm_ref(x, weight, bias, eps=1e-5, residual=None, relu=False):
    """x / sqrt(mean_c(x^2) + eps) * weight + bias (+ residual) (ReLU) over dim 1 of (B, C, H, W)."""
    x = x.double()
    rms = (x.square().mean(1, keepdim=True) + eps).sqrt()                     # (B, 1, H, W)
    y = x / rms * weight.double()[:, None, None] + bias.double()[:, None, None]
    y = y if residual is None else y + residual.double()
    return y.clamp(min=0) if relu else y


def channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


def padding_mask(B, N):
    lengths = torch.randint(N // 3, N, (B,))
    lengths[0] = N
    return (torch.arange(N)[None] < lengths[:, None]).to(DEVICE)               # (B, N) bool, 1 = real


# --- the twins (what sana_core runs on the CPU): float32 against float64, at most 1e-5 ---

def test_twins_match_float64_references():
    B, N, C = 2, 45, 96
    q, k, v = rand(B, N, 3 * C).chunk(3, dim=-1)
    mask = padding_mask(B, N)
    for m in (None, mask):
        assert rel_err(K.linear_attention_torch(q, k, v, 1e-8, m), dit_attention_ref(q, k, v, 1e-8, m)) <= 1e-5
    qkv = rand(2, 4 * 96, 5, 7)
    assert rel_err(K.dcae_linear_attention_torch(qkv), dcae_attention_ref(qkv, 1e-15)) <= 1e-5
    buf = torch.zeros(2, 3 * 128, 5, 7, device=DEVICE)
    K.dcae_linear_attention_torch(qkv, 32, out=buf[:, 128:256])
    assert rel_err(buf[:, 128:256], dcae_attention_ref(qkv, 1e-15)) <= 1e-5 and not buf[:, :128].any()
    h, w = 5, 9
    x, wt, bs = rand(B, h * w, 2 * 24), rand(48, 1, 3, 3), rand(48)
    assert rel_err(K.depthwise_conv_glu_torch(x, wt, bs, h, w), conv_glu_ref(x, wt, bs, h, w)) <= 1e-5
    x, y, mod = rand(B, N, 72) * 3 + 1, rand(B, N, 72), rand(B, 6, 72)
    shift, scale, gate = mod[:, 0:1], mod[:, 1:2], mod[:, 2]                     # (B,1,C) views and (B,C)
    assert rel_err(K.adaln_torch(x, shift, scale), adaln_ref(x, shift, scale)) <= 1e-5
    r, out = K.gated_residual_adaln_torch(x, y, gate, shift, scale)
    r_ref = x.double() + gate.double()[:, None] * y.double()
    assert rel_err(r, r_ref) <= 1e-6 and rel_err(out, adaln_ref(r_ref, shift, scale)) <= 1e-5


def test_masked_tokens_do_not_change_real_outputs():
    """Padding is left out of KV and Ksum: real tokens' outputs equal those of the unpadded sequence."""
    q, k, v = rand(1, 30, 3 * 64).chunk(3, dim=-1)
    mask = torch.arange(30, device=DEVICE)[None] < 20
    padded = K.linear_attention_torch(q, k, v, 1e-8, mask)[:, :20]
    alone = K.linear_attention_torch(q[:, :20], k[:, :20], v[:, :20], 1e-8)
    assert rel_err(padded, alone) <= 1e-6


def test_channel_rms_norm_twin_writes_in_place_and_matches_float64():
    """The DC-AE norm: in place into x (either layout), or into out=; float64 stays float64."""
    x, r, w, b = rand(2, 24, 5, 7) * 3, rand(2, 24, 5, 7), rand(24), rand(24)
    for layout in (lambda t: t, channels_last):
        for residual, relu in ((None, False), (r, False), (r, True), (None, True)):
            xl = layout(x.clone())
            ref = channel_rms_norm_ref(xl, w, b, 1e-5, residual, relu)
            out = K.channel_rms_norm_torch(xl, w, b, 1e-5, residual=residual, relu=relu)
            assert out is xl and rel_err(xl, ref) <= 1e-6 and (xl >= 0).all() == relu
            assert xl.is_contiguous(memory_format=torch.channels_last) == (layout is channels_last)
    buf = torch.empty_like(x)
    assert K.channel_rms_norm_torch(x, w, b, out=buf) is buf and rel_err(buf, channel_rms_norm_ref(x, w, b)) <= 1e-6
    x64 = x.double()
    out = K.channel_rms_norm_torch(x64, w.double(), b.double(), residual=r.double(), relu=True)
    assert out.dtype == torch.float64 and rel_err(out, channel_rms_norm_ref(x, w, b, 1e-5, r, True)) <= 1e-12


# --- layouts, checked against diffusers' modules (float32, CPU) ---

def test_dit_attention_layout_matches_diffusers():
    from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0
    C = 128
    attn = Attention(query_dim=C, heads=C // 32, dim_head=32, bias=False, processor=SanaLinearAttnProcessor2_0())
    x = torch.randn(2, 40, C)
    qkv = F.linear(x, torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))  # fused qkv (B, N, 3C)
    with torch.no_grad():
        ours = attn.to_out[0](K.linear_attention_torch(*qkv.chunk(3, dim=-1), eps=1e-15))
        assert rel_err(ours, attn(x)) <= 1e-5


def test_dcae_attention_layout_matches_diffusers():
    from diffusers.models.attention_processor import SanaMultiscaleLinearAttention
    attn = SanaMultiscaleLinearAttention(64, 64, attention_head_dim=32, norm_type="rms_norm", kernel_sizes=(5,),
                                         residual_connection=True)
    x = torch.randn(1, 64, 6, 7)                                               # H*W > 32: diffusers' linear branch
    with torch.no_grad():
        t = x.movedim(1, -1)
        qkv = torch.cat([attn.to_q(t), attn.to_k(t), attn.to_v(t)], dim=-1).movedim(-1, 1)
        qkv = torch.cat([qkv] + [m(qkv) for m in attn.to_qkv_multiscale], dim=1)    # (B, 2*3*64, H, W)
        out = K.dcae_linear_attention_torch(qkv, eps=attn.eps)
        out = attn.norm_out(attn.to_out(out.movedim(1, -1))).movedim(-1, 1) + x
        assert rel_err(out, attn(x)) <= 1e-5


def test_mix_ffn_middle_matches_diffusers_glumbconv():
    from diffusers.models.transformers.sana_transformer import GLUMBConv
    C, h, w = 32, 5, 6
    ff = GLUMBConv(C, C, expand_ratio=2.5, norm_type=None, residual_connection=False)
    x = torch.randn(2, h * w, C)                                               # tokens (B, N, C)
    with torch.no_grad():
        ref = ff(x.unflatten(1, (h, w)).permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        mid = F.silu(F.linear(x, ff.conv_inverted.weight[:, :, 0, 0], ff.conv_inverted.bias))   # (B, N, 2H)
        mid = K.depthwise_conv_glu_torch(mid, ff.conv_depth.weight, ff.conv_depth.bias, h, w)    # (B, N, H)
        assert rel_err(F.linear(mid, ff.conv_point.weight[:, :, 0, 0]), ref) <= 1e-5


# --- the Triton kernels (interpreter on CPU, native on GPU) against float64 ---

@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_linear_attention_kernel(dtype, triton_backend, poisoned):
    B, N, C = 2, 37, 64                                                        # 37: not a multiple of the block
    qkv = rand(B, N, 3 * C, dtype=dtype)
    q, k, v = qkv.chunk(3, dim=-1)                                             # strided views of the qkv output
    mask = padding_mask(B, N)
    for m, split in ((None, 3), (mask, 2)):                                    # several token splits: partial sums
        out = K.linear_attention_triton(q, k, v, 1e-6, m, block_n=16, block_m=16, split=split)
        assert out.shape == (B, N, C) and out.dtype == dtype
        assert rel_err(out, dit_attention_ref(q, k, v, 1e-6, m)) <= TOL[dtype]
    assert K.use_triton(q)                                                     # the dispatcher, default tuning
    assert rel_err(K.linear_attention(q, k, v, 1e-6, mask), dit_attention_ref(q, k, v, 1e-6, mask)) <= TOL[dtype]


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_dcae_attention_kernel(dtype, triton_backend, poisoned):
    qkv = rand(2, 2 * 96, 5, 7, dtype=dtype)                                   # odd grid, 35 tokens
    out = K.dcae_linear_attention_triton(qkv, block_n=16, block_m=16, split=2)
    assert out.shape == (2, 64, 5, 7) and out.dtype == dtype
    assert rel_err(out, dcae_attention_ref(qkv, 1e-15)) <= TOL[dtype]
    buf = torch.zeros(2, 3 * 64, 5, 7, dtype=dtype, device=DEVICE)            # out= a channel slice of a buffer
    K.dcae_linear_attention_triton(qkv, 32, out=buf[:, 64:128], block_n=64, block_m=64)
    assert rel_err(buf[:, 64:128], out) <= TOL[dtype] and not buf[:, :64].any() and not buf[:, 128:].any()


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_depthwise_conv_glu_kernel(dtype, triton_backend, poisoned):
    B, h, w, hid = 2, 5, 7, 40                                                 # 35 tokens, 40 channels: partial blocks
    x, wt, bs = rand(B, h * w, 2 * hid, dtype=dtype), rand(2 * hid, 1, 3, 3, dtype=dtype), rand(2 * hid, dtype=dtype)
    ref = conv_glu_ref(x, wt, bs, h, w)
    out = K.depthwise_conv_glu_triton(x, wt, bs, h, w, block_x=8, block_c=32, rows=3)
    assert out.shape == (B, h * w, hid) and rel_err(out, ref) <= TOL[dtype]
    nchw = x[:1].transpose(1, 2).contiguous().transpose(1, 2)                  # channels-first (DC-AE) memory
    out = K.depthwise_conv_glu_triton(nchw, wt, bs, h, w, block_x=8, block_c=32, rows=3)
    assert out.stride(1) == 1 and rel_err(out, ref[:1]) <= TOL[dtype]


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_adaln_kernels(dtype, triton_backend, poisoned):
    B, N, C = 2, 5, 40                                                         # C not a power of two
    x, y, mod = rand(B, N, C, dtype=dtype) * 3 + 1, rand(B, N, C, dtype=dtype), rand(B, 6, C, dtype=dtype)
    shift, scale, gate = mod[:, 0:1], mod[:, 1:2], mod[:, 2]
    out = K.adaln_triton(x, shift, scale)
    assert rel_err(out, adaln_ref(x, shift, scale)) <= TOL[dtype]
    r, out = K.gated_residual_adaln_triton(x, y, gate, shift, scale)
    r_ref = x.double() + gate.double()[:, None] * y.double()
    assert rel_err(r, r_ref) <= TOL[dtype] and rel_err(out, adaln_ref(r, shift, scale)) <= TOL[dtype]
    assert rel_err(K.adaln_triton(x, shift[:1], scale[:1]), adaln_ref(x, shift[:1], scale[:1])) <= TOL[dtype]


@needs_triton
@pytest.mark.parametrize("dtype, C", [(torch.float32, 8), (torch.float32, 40), (torch.bfloat16, 8),
                                      (torch.bfloat16, 40), (torch.float16, 40)])
def test_channel_rms_norm_kernel(dtype, C, triton_backend, poisoned):
    """Both layouts, row bands of them (the banded decode), residual in either layout, ReLU, whole-row and
    channel-chunk tiles, partial pixel blocks (35 pixels), 64-bit offsets; in place and into a poisoned out=.
    (bf16 works under the interpreter here, no bf16 arithmetic: it only converts, truncating, hence TOL.)"""
    B, H, W = 2, 5, 7
    x0, r0 = rand(B, C, H + 2, W, dtype=dtype) * 3 + 1, rand(B, C, H, W, dtype=dtype)
    w, b = rand(C, dtype=dtype), rand(C, dtype=dtype)
    nchw, cl = (lambda t: t.contiguous()), channels_last
    chunks = dict(block_p=32, block_c=32)                                      # 2 channel chunks at C = 40
    cases = [(nchw, None, False, dict(block_p=64), True), (cl, None, True, dict(block_p=64), False),
             (nchw, nchw, False, chunks, False), (cl, cl, True, chunks, True),
             (cl, nchw, False, dict(block_p=64, block_c=64, wide=True), True),
             (nchw, cl, True, dict(chunks, wide=True), False)]
    for layout, r_layout, relu, cfg, into_out in cases:
        full = layout(x0).clone()
        x = full[:, :, 1:H + 1]                                                # a band of rows: a view
        r = None if r_layout is None else r_layout(r0)
        ref = channel_rms_norm_ref(x, w, b, 1e-5, r, relu)
        out = torch.empty_like(x) if into_out else x                           # poisoned, or in place
        assert K.channel_rms_norm_triton(x, w, b, residual=r, relu=relu, out=out, **cfg) is out
        assert out.dtype == dtype and rel_err(out, ref) <= TOL[dtype], (layout, r_layout, relu, cfg)
        assert torch.equal(full[:, :, 0], x0[:, :, 0]) and torch.equal(full[:, :, -1], x0[:, :, -1])  # rows outside
    x = channels_last(x0[:1])                                                  # the dispatcher, default tuning
    ref = channel_rms_norm_ref(x, w, b, 1e-5, x)
    assert rel_err(K.channel_rms_norm(x.clone(), w, b, residual=x), ref) <= TOL[dtype]
    cols = x0.clone()[:, :, :, 1:6]                                            # no single pixel axis: the twin
    ref = channel_rms_norm_ref(cols, w, b)
    assert K.channel_rms_norm(cols, w, b) is cols and rel_err(cols, ref) <= TOL[dtype]


@needs_triton
def test_dcae_blocks_compute_the_same_with_the_kernel():
    """ResBlock (norm + residual) and the decoder head's norm + ReLU: Triton backend == twin, both layouts."""
    from sana_core.autoencoder import ResBlock, RMSNorm2d
    block, head = ResBlock(8, device=DEVICE), RMSNorm2d(8, device=DEVICE)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p))
    for layout in (lambda t: t, channels_last):
        x = layout(rand(1, 8, 6, 9))
        results = {}
        try:
            for backend in ("torch", "triton"):
                K.set_backend(backend)
                with torch.no_grad():
                    results[backend] = block(x), head(x.clone(), relu=True)
        finally:
            K.set_backend("auto")
        ours, twin = results["triton"], results["torch"]
        assert all(rel_err(o, t) <= TOL[torch.float32] for o, t in zip(ours, twin)) and (ours[1] >= 0).all()
        assert ours[0].is_contiguous(memory_format=torch.channels_last) == (layout is channels_last)


# --- compiles: one per kernel variant, whatever the image size ---

class Launches:
    """Stands in for a Triton kernel: records what each launch would be compiled for, and runs nothing.
    Triton compiles once per key: each tensor's dtype, each integer's class (1, a multiple of 16, other;
    a class the kernel's do_not_specialize / do_not_specialize_on_alignment options drop is not in it)
    and the compile-time keywords."""

    def __init__(self, name, kernel, keys):
        self.name, self.names, self.keys = name, kernel.arg_names, keys
        if hasattr(kernel, "params"):  # a JITFunction
            self.free = {p.name for p in kernel.params if p.do_not_specialize}
            self.unaligned = {p.name for p in kernel.params if p.do_not_specialize_on_alignment}
        else:  # TRITON_INTERPRET's InterpretedFunction keeps the jit options
            self.free = set(kernel.kwargs.get("do_not_specialize") or ())
            self.unaligned = set(kernel.kwargs.get("do_not_specialize_on_alignment") or ())

    def __getitem__(self, grid):
        return self.launch

    def launch(self, *args, **options):
        key = [self.name]
        for name, a in zip(self.names, args):
            if isinstance(a, torch.Tensor):
                key.append(a.dtype)
            elif isinstance(a, int) and not isinstance(a, bool) and name not in self.free:
                key.append("1" if a == 1 else "16" if a % 16 == 0 and name not in self.unaligned else "int")
        self.keys.append((*key, tuple(sorted(options.items()))))


@needs_triton
def test_new_image_sizes_and_batches_reuse_the_compiled_kernels(monkeypatch, triton_backend):
    """A DiT forward and a DC-AE decode at other latent sizes (H*W a multiple of 16, 8 mod 16, odd) and
    batch sizes launch exactly the kernel variants of the first size: a first image at a new size compiles
    nothing (a compile costs 0.3-2 s; issue 9 allows a first image at a new size 2x a steady one)."""
    from sana_core.autoencoder import DCAE, DCAEConfig
    from sana_core.transformer import SanaConfig, SanaTransformer
    monkeypatch.setenv("SANA_CUDA_GRAPHS", "0")  # nothing runs: no graph to capture
    keys = []
    for module in ("linear_attention", "mix_ffn", "adaln", "rms_norm"):
        module = sys.modules[f"sana_core.kernels.{module}"]
        for name in [n for n in vars(module) if n.endswith("_kernel") or n.endswith("_kernel_channels_first")]:
            monkeypatch.setattr(module, name, Launches(name, getattr(module, name), keys))
    dit = SanaTransformer(SanaConfig(depth=1, width=64, caption_dim=48, self_heads=2, cross_heads=2, mlp_hidden=160),
                          device=DEVICE)
    ae = DCAE(DCAEConfig(decoder_widths=(16, 32, 32, 32, 64, 64), decoder_depths=(1,) * 6, encoder_widths=None,
                         encoder_depths=None, encoder_scales=None), device=DEVICE)
    variants = {}
    for batch, h, w in [(1, 4, 4), (1, 3, 5), (1, 2, 7), (1, 4, 6), (2, 4, 4), (3, 3, 5)]:
        keys.clear()
        with torch.no_grad():
            dit(rand(2 * batch, 32, h, w), torch.full((2 * batch,), 500.0, device=DEVICE), rand(2 * batch, 5, 48))
            ae.decode(rand(batch, 32, h, w))
        variants[(batch, h, w)] = set(keys)
    first = variants[(1, 4, 4)]
    assert first and all(v == first for v in variants.values()), \
        {size: sorted(map(str, v - first)) for size, v in variants.items() if v != first}


# --- dispatch and errors ---

def test_auto_backend_uses_twins_on_cpu_and_switch_is_checked():
    q = rand(1, 8, 64).cpu()
    assert K.get_backend() == "auto" and not K.use_triton(q)
    with pytest.raises(ValueError, match="one of"):
        K.set_backend("cuda")
    K.set_backend("torch")
    try:
        assert not K.use_triton(q) and not K.use_triton(q.to(DEVICE))
    finally:
        K.set_backend("auto")


def test_imports_without_triton_and_reads_env_switch():
    """No Triton (macOS/Windows/CPU wheels): the package imports, twins run, forcing 'triton' explains itself."""
    code = """
import sys; sys.modules['triton'] = None            # makes `import triton` fail
import torch
from sana_core import kernels as K
assert not K.HAS_TRITON and K.get_backend() == 'torch'
q = torch.randn(1, 8, 64)
assert torch.equal(K.linear_attention(q, q, q, 1e-8), K.linear_attention_torch(q, q, q, 1e-8))
try:
    K.set_backend('triton'); raise SystemExit('no error')
except RuntimeError as e:
    assert 'Triton is not importable' in str(e)
"""
    env = dict(os.environ, SANA_KERNELS="torch")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_bad_shapes_say_what_was_expected():
    q = torch.randn(1, 8, 64)
    with pytest.raises(ValueError, match="one shape"):
        K.linear_attention(q, q, q[:, :4], 1e-8)
    with pytest.raises(ValueError, match="multiple of head_dim"):
        K.linear_attention(q[..., :48], q[..., :48], q[..., :48], 1e-8)
    with pytest.raises(ValueError, match=r"\(B, G\*3\*32, H, W\)"):
        K.dcae_linear_attention(torch.randn(1, 100, 4, 4))
    with pytest.raises(ValueError, match="height\\*width"):
        K.depthwise_conv_glu(torch.randn(1, 10, 8), torch.randn(8, 1, 3, 3), torch.randn(8), 3, 3)
    with pytest.raises(ValueError, match=r"\(B, C\) or \(B, 1, C\)"):
        K.adaln(q, torch.randn(2, 3, 64), torch.randn(2, 3, 64))
    x = torch.randn(1, 8, 4, 4)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        K.channel_rms_norm(x[0], torch.ones(8), torch.zeros(8))
    with pytest.raises(ValueError, match=r"weight and bias must be \(8,\)"):
        K.channel_rms_norm(x, torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError, match="residual .* must have x's shape"):
        K.channel_rms_norm(x, torch.ones(8), torch.zeros(8), residual=x[:, :, :2])
    with pytest.raises(ValueError, match="flatten to one pixel axis"):
        K.channel_rms_norm_triton(x[:, :, :, 1:3], torch.ones(8), torch.zeros(8))
