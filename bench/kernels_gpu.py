"""GPU check and timing of sana_core.kernels at full SANA sizes (a script, not a test).

    python3 bench/kernels_gpu.py [--quick] [--out DIR]

For every kernel and shape (1.6B DiT: C=2240, 70 heads, FFN hidden 5600, batch 2, 1024 and 16384 tokens;
DC-AE decoder stages at 1024, 2048 and 4096 px): correctness against float64 on poisoned outputs (bf16 <= 1e-2,
fp32 kernels <= 1e-3, fp32 twin <= 1e-5 with TF32 off), bitwise repeatability, then the median time
(triton.testing.do_bench, L2 flushed) of a sweep of block configurations, the twin, and the eager
diffusers-equivalent torch ops; small shapes also per call inside a CUDA graph (no launch gaps). The floor is
the fewest bytes (each input read once, the output written once) over the measured copy bandwidth.
Prints a table last and writes DIR/kernels_gpu.json. Needs torch + triton only (no diffusers).
"""
import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench



from checkout import import_sana  # noqa: E402

import_sana()
import sana_core.kernels as K  # noqa: E402

DEV = "cuda"
BF16, F32 = torch.bfloat16, torch.float32
RESULTS = []
ONLY = ""
# 1.6B DiT (C, heads of 32, FFN hidden, batch, latent sides: 1024 and 4096 px); DC-AE decoder stages
# (px, groups G = 2 * channels / 32, side) for the attention and (px, channels, side) for GLUMBConv (2H = 8 ch)
DIT = dict(C=2240, heads=70, hid=5600, B=2, sides=(32, 128))
DCAE_ATTN = ((2048, 64, 64), (2048, 64, 128), (2048, 32, 256), (4096, 64, 256), (4096, 32, 512))
DCAE_FFN = ((2048, 1024, 128), (2048, 512, 256), (4096, 512, 512))
# DC-AE RMSNorm (B=1): (name, channels, side, channels-last, residual, relu): stage 0 at 1024 px (channels-last,
# ResBlock: + residual; the head: ReLU), stage 5 at 1024 px and stage 3 at 2048 px (NCHW, EfficientViT blocks)
DCAE_NORM = (("stage 0 1024px", 128, 1024, True, True, False), ("head 1024px", 128, 1024, True, False, True),
             ("stage 5 1024px", 1024, 32, False, True, False), ("stage 3 2048px", 512, 256, False, True, False))


def rel_err(ours, ref):
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).norm() / ref.norm()).item()


def rand(*shape, dtype=BF16):
    return torch.randn(*shape, device=DEV, dtype=F32).to(dtype)


@contextlib.contextmanager
def poisoned():
    """Every torch.empty/empty_like inside (outputs and partial buffers) starts as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t
    torch.empty = lambda *a, **k: fill(empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def ms(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_ms(fn, reps=20):
    """Per-call time inside a CUDA graph of `reps` calls: the GPU time with no launch gaps (L2 warm)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    t = do_bench(g.replay, warmup=10, rep=50, return_mode="median") / reps
    del g
    return t


# --- the eager ops diffusers 0.42.1 runs for the same work (copied from its processors) ---

def dit_attention_eager(q, k, v, heads, eps=1e-15):  # SanaLinearAttnProcessor2_0 between to_q/k/v and to_out
    dtype = q.dtype
    query = q.transpose(1, 2).unflatten(1, (heads, -1))
    key = k.transpose(1, 2).unflatten(1, (heads, -1)).transpose(2, 3)
    value = v.transpose(1, 2).unflatten(1, (heads, -1))
    query, key = F.relu(query), F.relu(key)
    query, key, value = query.float(), key.float(), value.float()
    value = F.pad(value, (0, 0, 0, 1), mode="constant", value=1.0)
    hs = torch.matmul(torch.matmul(value, key), query)
    hs = hs[:, :, :-1] / (hs[:, :, -1:] + eps)
    return hs.flatten(1, 2).transpose(1, 2).to(dtype)


def dcae_attention_eager(qkv, eps=1e-15):  # SanaMultiscaleAttnProcessor2_0 + apply_linear_attention
    B, _, H, W = qkv.shape
    hs = qkv.to(torch.float32).reshape(B, -1, 96, H * W)
    q, k, v = hs.chunk(3, dim=2)
    q, k = F.relu(q), F.relu(k)
    v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1)
    hs = torch.matmul(torch.matmul(v, k.transpose(-1, -2)), q).to(torch.float32)
    hs = hs[:, :, :-1] / (hs[:, :, -1:] + eps)
    return hs.to(qkv.dtype).reshape(B, -1, H, W)


def conv_glu_eager(x_nchw, w, b):  # GLUMBConv: conv_depth, chunk, x * SiLU(gate) on (B, 2H, h, w)
    y = F.conv2d(x_nchw, w, b, padding=1, groups=x_nchw.shape[1])
    y, gate = torch.chunk(y, 2, dim=1)
    return y * F.silu(gate)


def conv_glu_ref(x, w, b, height, width):  # the twin in float64
    return K.depthwise_conv_glu_torch(x.double(), w.double(), b.double(), height, width)


def adaln_eager(x, shift, scale):  # SanaTransformerBlock: norm1(x) * (1 + scale) + shift
    return (F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift).to(x.dtype)


def residual_adaln_eager(x, y, gate, shift, scale):
    r = x + gate * y
    return r, adaln_eager(r, shift, scale)


def rms_norm_eager(x, weight, bias, residual, relu, eps=1e-5):  # the DC-AE's in-place recipe before the kernel
    rstd = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
    rstd = rstd.square_().div_(x.shape[1]).add_(eps).rsqrt_()
    x.mul_(rstd)
    torch.addcmul(bias.view(1, -1, 1, 1), x, weight.view(1, -1, 1, 1), out=x)
    if residual is not None:
        x.add_(residual)
    return F.relu(x, inplace=True) if relu else x


# --- one case: check, sweep, time ---

def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def max_err(out, expect):
    return max(rel_err(o, x) for o, x in zip(as_tuple(out), as_tuple(expect)))


def run_case(name, *, kernel, twin, eager, ref, inputs, nbytes, configs, tol, small, fp32_inputs=None):
    """kernel(**cfg)(*inputs), twin(*inputs), eager() (own inputs), ref(*inputs) -> float64.
    fp32_inputs: the same case in float32 (kernel <= 1e-3, twin <= 1e-5)."""
    if ONLY not in name:
        return
    row = {"case": name, "bytes": nbytes, "floor_us": nbytes / BW * 1e6}
    t0 = time.time()
    try:
        expect = ref(*inputs)
        errs = []
        for cfg in configs:  # every configuration must be right before it is timed
            with poisoned():
                out = kernel(**cfg)(*inputs)
            e, nan = max_err(out, expect), any(torch.isnan(o).any().item() for o in as_tuple(out))
            errs.append(e)
            if nan or not e <= tol:
                raise AssertionError(f"{name} {cfg}: rel err {e:.3g} (tol {tol}), NaN left: {nan}")
        a, b = kernel(**configs[0])(*inputs), kernel(**configs[0])(*inputs)
        row["repeatable"] = all(torch.equal(x, y) for x, y in zip(as_tuple(a), as_tuple(b)))
        row["rel_err_kernel"] = max(errs)
        del expect, out, a, b
        if fp32_inputs is not None:
            expect = ref(*fp32_inputs)
            with poisoned():
                row["rel_err_kernel_fp32"] = max_err(kernel(**configs[0])(*fp32_inputs), expect)
            row["rel_err_twin_fp32"] = max_err(twin(*fp32_inputs), expect)
            del expect
            assert row["rel_err_kernel_fp32"] <= 1e-3 and row["rel_err_twin_fp32"] <= 1e-5, row
        times = []
        for cfg in configs:
            f = kernel(**cfg)
            times.append(ms(lambda: f(*inputs)))
        best = min(range(len(configs)), key=times.__getitem__)
        row.update(kernel_us=times[best] * 1e3, default_us=times[0] * 1e3, best_cfg=configs[best],
                   sweep=[(c, t * 1e3) for c, t in zip(configs, times)])
        row["GBps"] = nbytes / (row["kernel_us"] * 1e-6) / 1e9
        row["twin_us"] = ms(lambda: twin(*inputs)) * 1e3
        if eager is not None:
            row["eager_us"] = ms(eager) * 1e3
            row["vs_eager"] = row["eager_us"] / row["kernel_us"]
        if small:
            f = kernel(**configs[best])
            row["kernel_graph_us"] = graph_ms(lambda: f(*inputs)) * 1e3
            if eager is not None:
                row["eager_graph_us"] = graph_ms(eager) * 1e3
    except Exception as e:  # keep going: one broken case must not waste the run
        row["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    row["seconds"] = time.time() - t0
    RESULTS.append(row)
    print(json.dumps(row, default=str), flush=True)
    torch.cuda.empty_cache()


def tuned(fn, **fixed):
    return lambda **cfg: (lambda *a: fn(*a, **fixed, **cfg))


def resources():
    """Registers, spills and shared memory of every compiled variant (the compiler's resource report)."""
    out = []
    for mod, names in (("linear_attention", ("_kv_kernel", "_out_kernel", "_kv_kernel_channels_first",
                                             "_out_kernel_channels_first")),
                       ("mix_ffn", ("_dwconv_glu_kernel", "_dwconv_glu_kernel_channels_first")),
                       ("adaln", ("_adaln_kernel",)), ("rms_norm", ("_channel_rms_norm_kernel",))):
        for name in names:
            fn = getattr(sys.modules[f"sana_core.kernels.{mod}"], name)
            try:
                for entry in fn.device_caches.values():
                    for k in entry[0].values():
                        consts = {str(kk): v for kk, v in getattr(k.src, "constants", {}).items()}
                        out.append(dict(kernel=name, regs=k.n_regs, spills=k.n_spills, shared=k.metadata.shared,
                                        warps=k.metadata.num_warps, stages=k.metadata.num_stages, constants=str(consts)[:200]))
            except Exception as e:  # the cache layout is Triton-version specific
                out.append(dict(kernel=name, error=repr(e)[:200]))
    for r in out:
        print(r)
    return out


def ceilings():
    a = torch.empty(2**29, dtype=torch.uint8, device=DEV).random_()  # 512 MiB each way
    b = torch.empty_like(a)
    bw = 2 * a.numel() / (ms(lambda: b.copy_(a)) * 1e-3)
    x, y = rand(8192, 8192), rand(8192, 8192)
    tf = 2 * 8192**3 / (ms(lambda: x @ y) * 1e-3) / 1e12
    return bw, tf


def main():
    global BW, ONLY
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="default configurations only")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--only", default="", help="run only the cases whose name contains this")
    args = ap.parse_args()
    ONLY = args.only
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 twin is checked at fp32 accuracy
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    p = torch.cuda.get_device_properties(0)
    BW, TF = ceilings()
    info = dict(device=p.name, sms=p.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
                copy_GBps=BW / 1e9, bf16_mm_TFLOPs=TF)
    print(json.dumps(info), flush=True)
    pick = (lambda c: c[:1]) if args.quick else (lambda c: c)

    # 1. DiT linear attention, 1.6B: C = 2240 (70 heads of 32), q, k, v as views of the fused qkv output
    C, heads, B = DIT["C"], DIT["heads"], DIT["B"]
    la_cfgs = pick([dict(block_n=64, block_m=64, num_warps=4, num_stages=3),
                    dict(block_n=128, block_m=128, num_warps=4, num_stages=3),
                    dict(block_n=128, block_m=64, num_warps=8, num_stages=3),
                    dict(block_n=32, block_m=32, num_warps=2, num_stages=4),
                    dict(block_n=64, block_m=64, num_warps=4, num_stages=3, split=1),
                    dict(block_n=64, block_m=64, num_warps=4, num_stages=3, split=8),
                    dict(block_n=64, block_m=128, num_warps=4, num_stages=2, split=16)])
    for N in (s * s for s in DIT["sides"]):
        qkv = rand(B, N, 3 * C)
        q, k, v = qkv.chunk(3, dim=-1)
        qc, kc, vc = (t.contiguous() for t in (q, k, v))  # diffusers' separate to_q/to_k/to_v outputs
        qkv32 = qkv.float()
        mask = torch.arange(N, device=DEV)[None] < torch.tensor([[N]] + [[N * 2 // 3]] * (B - 1), device=DEV)
        run_case(f"dit_attention N={N}", kernel=tuned(K.linear_attention_triton), twin=lambda *a: K.linear_attention_torch(*a),
                 eager=lambda: dit_attention_eager(qc, kc, vc, heads), inputs=(q, k, v, 1e-15),
                 ref=lambda q, k, v, eps: K.linear_attention_torch(q.double(), k.double(), v.double(), eps),
                 fp32_inputs=(*qkv32.chunk(3, dim=-1), 1e-15), nbytes=4 * q.numel() * 2, configs=la_cfgs,
                 tol=1e-2, small=N <= 1024)
        if N == DIT["sides"][0] ** 2:
            run_case(f"dit_attention masked N={N}", kernel=tuned(K.linear_attention_triton),
                     twin=lambda *a: K.linear_attention_torch(*a), eager=None, inputs=(q, k, v, 1e-15, mask),
                     ref=lambda q, k, v, eps, m: K.linear_attention_torch(q.double(), k.double(), v.double(), eps, m),
                     nbytes=4 * q.numel() * 2, configs=la_cfgs[:1], tol=1e-2, small=False)
        del qkv, q, k, v, qc, kc, vc, qkv32

    # 2. DC-AE EfficientViT attention on the multiscale qkv (B=1): decoder stages at 2048 and 4096 px
    for px, G, side in DCAE_ATTN:
        qkv = rand(1, G * 96, side, side)
        run_case(f"dcae_attention {px}px G={G} {side}x{side}", kernel=tuned(K.dcae_linear_attention_triton),
                 twin=lambda *a: K.dcae_linear_attention_torch(*a), eager=lambda: dcae_attention_eager(qkv),
                 inputs=(qkv,), ref=lambda x: K.dcae_linear_attention_torch(x.double()),
                 fp32_inputs=(qkv.float(),) if side <= 128 else None, nbytes=qkv.numel() * 2 * 4 // 3,
                 configs=la_cfgs, tol=1e-2, small=side <= 64)
        del qkv

    # 3. Mix-FFN middle: DiT tokens-major (B=2, 2H = 11200), DC-AE channels-first (B=1)
    ffn_cfgs = pick([dict(), dict(rows=8), dict(rows=16), dict(rows=32), dict(block_x=64, block_c=16),
                     dict(block_x=32, block_c=32, num_warps=8), dict(block_x=256, block_c=8)])  # dict(): defaults
    hid = DIT["hid"]
    for side in DIT["sides"]:
        N = side * side
        x, w, b = rand(B, N, 2 * hid), rand(2 * hid, 1, 3, 3) * 0.3, rand(2 * hid)
        xn = x.transpose(1, 2).reshape(B, 2 * hid, side, side).contiguous()
        run_case(f"dit_conv_glu N={N}", kernel=tuned(K.depthwise_conv_glu_triton),
                 twin=lambda *a: K.depthwise_conv_glu_torch(*a), eager=lambda: conv_glu_eager(xn, w, b),
                 inputs=(x, w, b, side, side), ref=conv_glu_ref,
                 fp32_inputs=(x.float(), w.float(), b.float(), side, side) if side == DIT["sides"][0] else None,
                 nbytes=x.numel() * 2 * 3 // 2, configs=ffn_cfgs, tol=1e-2, small=side <= 32)
        del x, xn
    for px, ch, side in DCAE_FFN:
        c2 = 2 * 4 * ch                                                # GLUMBConv expand 4: 2H = 8 * channels
        xn, w, b = rand(1, c2, side, side), rand(c2, 1, 3, 3) * 0.3, rand(c2)
        x = xn.flatten(2).transpose(1, 2)                              # channels-first memory, (B, N, 2H) view
        run_case(f"dcae_conv_glu {px}px {ch}ch {side}x{side}", kernel=tuned(K.depthwise_conv_glu_triton),
                 twin=lambda *a: K.depthwise_conv_glu_torch(*a), eager=lambda: conv_glu_eager(xn, w, b),
                 inputs=(x, w, b, side, side), ref=conv_glu_ref,
                 nbytes=xn.numel() * 2 * 3 // 2, configs=ffn_cfgs, tol=1e-2, small=False)
        del x, xn

    # 4. adaLN (and the gated residual + adaLN seam), 1.6B: C = 2240, B = 2
    ada_cfgs = pick([dict(), dict(num_warps=2), dict(num_warps=8)])
    for N in (s * s for s in DIT["sides"]):
        x, y, mod = rand(B, N, C), rand(B, N, C), rand(B, 6, C)
        shift, scale, gate = mod[:, 0:1], mod[:, 1:2], mod[:, 2:3]
        x32 = x.float()
        run_case(f"adaln N={N}", kernel=tuned(K.adaln_triton), twin=lambda *a: K.adaln_torch(*a),
                 eager=lambda: adaln_eager(x, shift, scale), inputs=(x, shift, scale),
                 ref=lambda x, sh, sc: K.adaln_torch(x.double(), sh.double(), sc.double()),
                 fp32_inputs=(x32, shift.float(), scale.float()), nbytes=2 * x.numel() * 2, configs=ada_cfgs,
                 tol=1e-2, small=N <= 1024)
        run_case(f"gated_residual_adaln N={N}", kernel=tuned(K.gated_residual_adaln_triton),
                 twin=lambda *a: K.gated_residual_adaln_torch(*a), eager=lambda: residual_adaln_eager(x, y, gate, shift, scale),
                 inputs=(x, y, gate, shift, scale),
                 ref=lambda x, y, g, sh, sc: K.gated_residual_adaln_torch(*(t.double() for t in (x, y, g, sh, sc))),
                 fp32_inputs=(x32, y.float(), gate.float(), shift.float(), scale.float()), nbytes=4 * x.numel() * 2,
                 configs=ada_cfgs, tol=1e-2, small=N <= 1024)
        del x, y, x32

    # 5. DC-AE RMSNorm over channels + residual / ReLU, in place in the model; here every checked or timed
    # call writes a fresh out= (the inputs stay as they are; same bytes). eager: the old in-place recipe.
    for name, ch, side, cl, has_res, relu in DCAE_NORM:
        fmt = torch.channels_last if cl else torch.contiguous_format
        x = rand(1, ch, side, side).contiguous(memory_format=fmt)
        r = rand(1, ch, side, side).contiguous(memory_format=fmt) if has_res else None
        w, b = 1 + 0.3 * rand(ch), 0.3 * rand(ch)
        xe = x.clone()                                                 # the eager recipe's own, overwritten
        if cl:
            norm_cfgs = pick([dict(), dict(block_p=32), dict(block_p=128), dict(num_warps=4),
                              dict(block_p=32, num_warps=4), dict(block_p=16, num_warps=2)])
        else:
            norm_cfgs = pick([dict(), dict(block_p=8, block_c=triton.next_power_of_2(ch)),  # one chunk
                              dict(block_p=16, block_c=256), dict(block_p=32, block_c=256),
                              dict(block_p=64, block_c=128), dict(block_p=8, block_c=128)])
        f32 = lambda t: None if t is None else t.float()  # noqa: E731
        run_case(f"dcae_rms_norm {name} {ch}ch {side}x{side} {'cl' if cl else 'nchw'}"
                 f"{' +res' if has_res else ''}{' relu' if relu else ''}",
                 kernel=lambda **cfg: (lambda x, w, b, r: K.channel_rms_norm_triton(
                     x, w, b, residual=r, relu=relu, out=torch.empty_like(x), **cfg)),
                 twin=lambda x, w, b, r: K.channel_rms_norm_torch(x, w, b, residual=r, relu=relu,
                                                                  out=torch.empty_like(x)),
                 eager=lambda: rms_norm_eager(xe, w, b, r, relu), inputs=(x, w, b, r),
                 ref=lambda x, w, b, r: K.channel_rms_norm_torch(x.double(), w.double(), b.double(), relu=relu,
                                                                 residual=None if r is None else r.double()),
                 fp32_inputs=(x.float(), w.float(), b.float(), f32(r)), nbytes=(2 + has_res) * x.numel() * 2,
                 configs=norm_cfgs, tol=1e-2, small=x.numel() <= 2**21)
        del x, r, xe

    info["resources"] = resources()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "kernels_gpu.json").write_text(json.dumps(dict(info=info, results=RESULTS), indent=1, default=str))
    print(f"\n{info['device']}, torch {info['torch']}, triton {info['triton']}: copy {BW / 1e9:.0f} GB/s, "
          f"bf16 matmul {TF:.0f} TFLOP/s")
    print(f"{'case':44s} {'floor':>7s} {'kernel':>8s} {'GB/s':>6s} {'graph':>7s} {'twin':>8s} {'eager':>8s} "
          f"{'e.graph':>8s} {'x eager':>7s} {'err':>8s}  best config")
    for r in RESULTS:
        if "error" in r:
            print(f"{r['case']:44s} ERROR {r['error'][:150]}")
            continue
        f = lambda k: f"{r[k]:8.1f}" if k in r else f"{'':>8s}"  # noqa: E731
        print(f"{r['case']:44s} {r['floor_us']:7.1f} {f('kernel_us')} {r['GBps']:6.0f} {f('kernel_graph_us')[1:]} "
              f"{f('twin_us')} {f('eager_us')} {f('eager_graph_us')} {r.get('vs_eager', 0):7.1f} {r['rel_err_kernel']:8.1e}"
              f"  {r['best_cfg']}")
    print("times in microseconds (median, L2 flushed); 'graph': per call inside a CUDA graph; "
          "fp32 errors and sweeps in kernels_gpu.json")


if __name__ == "__main__":
    main()
