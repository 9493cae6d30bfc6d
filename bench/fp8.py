"""fp8 compute (dtype="fp8_e4m3fn_fast") against our bf16 path, side by side from one run, on random weights:
one DiT step (CFG batch of 2, caption side precomputed; eager, and replayed from a CUDA graph where our sampler
graphs it) at each size, fp8/bf16 time ratio, where the step's GPU time goes (profiler, kernels grouped), each
fp8 layer's relative error against bf16 on the activations the model really feeds it, and the final latent of
a 20-step Flow-DPM-Solver CFG sampling (fp8 vs bf16).

    python3 bench/fp8.py                                 # GPU: 1.6B at 1024 and 4096 px, a table + JSON
    python3 bench/fp8.py --px 1024 --no-profile
    python3 bench/fp8.py --tiny --device cpu             # a dry run on the CPU (fp8 path forced, seconds)
Goals (issue 20): 4096 px step <= 0.82x bf16, 1024 px no slower than bf16.
"""
import argparse
import copy
import json
import re
import statistics
import time

import torch
import torch.nn.functional as F

from checkout import import_sana

import_sana()
from sana_core import fp8, runtime as rt  # noqa: E402
from sana_core.kernels import depthwise_conv_glu, rows_fp8_triton  # noqa: E402
from sana_core.samplers import sample  # noqa: E402
from sana_core.transformer import CONFIGS, SanaConfig, SanaTransformer, random_state_dict  # noqa: E402

BF16 = torch.bfloat16
TINY = SanaConfig(depth=2, width=256, caption_dim=64, self_heads=8, cross_heads=2, mlp_hidden=640)
KERNEL_GROUPS = (  # profiler kernel name pattern -> group (first match wins)
    ("rows_fp8", "fp8 quantize (rows_fp8)"), ("adaln", "adaLN"), ("linear_attention|_attn_", "linear attention"),
    ("dwconv|glu", "depthwise conv + GLU"), ("flash|fmha|cudnn|sdpa|attention", "cross-attention (SDPA)"),
    ("f8|fp8|e4m3|scaled_mm|rowwise", "fp8 matmul"), ("gemm|sm90_xmma|cutlass|nvjet|matmul", "matmul (not named fp8)"))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, budget_s=2.0, reps=None):
    fn()
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    once = time.perf_counter() - t0
    times = []
    for _ in range(reps or max(3, min(30, int(budget_s / max(once, 1e-6))))):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def profile_groups(fn, device):
    """GPU time (ms) of one call of fn, by kernel group."""
    if device.type != "cuda":
        return None
    fn()
    sync(device)
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        sync(device)
    groups, names = {}, {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        group = next((g for pattern, g in KERNEL_GROUPS if re.search(pattern, e.name, re.I)), "other")
        us = e.device_time if hasattr(e, "device_time") else e.cuda_time
        groups[group] = groups.get(group, 0.0) + us / 1e3
        if group == "other":
            names[e.name[:60]] = names.get(e.name[:60], 0.0) + us / 1e3
    groups = {k: round(v, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}
    groups["total"] = round(sum(v for k, v in groups.items()), 2)
    top_other = sorted(names.items(), key=lambda kv: -kv[1])[:6]
    return dict(groups=groups, top_other={k: round(v, 2) for k, v in top_other})


def inputs(cfg, px, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    side = px // 32
    x = torch.randn(2, 32, side, side, generator=g).to(device, BF16)
    ctx = torch.randn(2, 300, cfg.caption_dim, generator=g).to(device, BF16)
    mask = torch.zeros(2, 300, dtype=torch.long)
    mask[0, :5] = 1  # the negative prompt: a few tokens
    mask[1, :150] = 1
    return x, torch.full((2,), 500.0, device=device), ctx, mask.to(device)


def step_row(models, px, device, do_profile):
    cfg = models["bf16"].config
    x, t, ctx, mask = inputs(cfg, px, device)
    row = dict(px=px, tokens=2 * (px // 32) ** 2)
    graphs = rt.Runtime(cuda_graphs=True)
    out = {}
    with torch.no_grad():
        for name, model in models.items():
            caption = model.encode_caption(ctx, mask)
            eager = lambda m=model, c=caption: m(x, t, c)  # noqa: E731
            out[name] = eager()
            row[f"{name}_eager_ms"] = round(time_ms(eager, device), 2)
            if device.type == "cuda" and row["tokens"] <= rt.MAX_TOKENS:
                step = graphs.graphed(lambda x, t, c, m=model: m(x, t, c), (caption,), module=model,
                                      key=f"fp8-bench-{name}", tokens=0)
                for _ in range(3):  # warm-ups (one more when the first synchronised), then the capture
                    if step.captured is None:
                        step(x, t)
                row[f"{name}_graph_ms"] = round(time_ms(lambda s=step: s(x, t), device), 2) if step.captured else None
                row[f"{name}_graph_equals_eager"] = bool(torch.equal(step(x, t), eager()))
                del step
            if do_profile:
                row[f"{name}_profile"] = profile_groups(eager, device)
    graphs.release()
    mode = "graph" if row.get("bf16_graph_ms") and row.get("fp8_graph_ms") else "eager"
    row["mode"] = mode
    row["bf16_ms"], row["fp8_ms"] = row[f"bf16_{mode}_ms"], row[f"fp8_{mode}_ms"]
    row["fp8_over_bf16"] = round(row["fp8_ms"] / row["bf16_ms"], 3)
    row["velocity_rel_err"] = round(rel_err(out["fp8"], out["bf16"]), 4)
    return row


def layer_errors(models, px, device, blocks):
    """Each fp8 layer's output against the bf16 layer's on the inputs the bf16 model feeds it at px."""
    bf16, fp8_model = models["bf16"], models["fp8"]
    cfg = bf16.config
    x, t, ctx, mask = inputs(cfg, px, device, seed=1)
    seen, hooks = {}, []
    for b in blocks:
        block = bf16.blocks[b]
        for name in ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.proj", "mlp"):
            hooks.append(block.get_submodule(name).register_forward_pre_hook(
                lambda mod, args, key=(b, name): seen.__setitem__(key, args[0].detach().clone())))
    with torch.no_grad():
        bf16(x, t, ctx, mask)
        for h in hooks:
            h.remove()
        rows = {}
        for (b, name), inp in seen.items():
            pairs = []
            if name == "mlp":  # the Mix-FFN's 1x1 convs: its input, and the GLU output it makes of it
                mlp, h, w = bf16.blocks[b].mlp, x.shape[2], x.shape[3]
                inv, depth = mlp.inverted_conv.conv, mlp.depth_conv.conv
                glu = depthwise_conv_glu(F.silu(F.linear(inp, inv.weight.flatten(1), inv.bias)), depth.weight,
                                         depth.bias, h, w)
                pairs = [("mlp.inverted_conv.conv", inp), ("mlp.point_conv.conv", glu)]
            else:
                pairs = [(name, inp)]
            for lname, a in pairs:
                ref_layer, fast = bf16.blocks[b].get_submodule(lname), fp8_model.blocks[b].get_submodule(lname)
                weight = ref_layer.weight.flatten(1)
                ref = F.linear(a, weight, ref_layer.bias)
                exact = F.linear(a.float(), weight.float(), None if ref_layer.bias is None else ref_layer.bias.float())
                errs = rows.setdefault(lname, dict(fp8_vs_bf16=[], bf16_vs_fp32=[]))
                errs["fp8_vs_bf16"].append(round(rel_err(fast(a), ref), 4))
                errs["bf16_vs_fp32"].append(round(rel_err(ref, exact), 4))
    return rows


def final_latents(models, px, device, steps=20, guidance=4.5):
    cfg = models["bf16"].config
    _, _, ctx, mask = inputs(cfg, px, device, seed=2)
    noise = torch.randn(1, 32, px // 32, px // 32, generator=torch.Generator().manual_seed(3)).to(device)
    latents = {}
    with torch.no_grad():
        for name, model in models.items():
            caption = model.encode_caption(ctx, mask)

            def velocity(x, t, m=model, c=caption):
                v = m(torch.cat([x, x]).to(BF16), (t * 1000).expand(2), c).float()
                uncond, cond = v.chunk(2)
                return uncond + guidance * (cond - uncond)
            latents[name] = sample(velocity, noise, sampler="flow_dpm_solver", steps=steps, shift=3.0)
    return dict(px=px, steps=steps, guidance=guidance, rel_err=round(rel_err(latents["fp8"], latents["bf16"]), 4))


def quantize_sweep(device, tokens=32768):
    """rows_fp8's plain quantization at 4096 px sizes (C = width, Mix-FFN hidden) by num_warps: ms and GB/s."""
    rows = []
    for C in (2240, 5600):
        x = torch.randn(1, tokens, C, device=device, dtype=BF16)
        for warps in (2, 4, 8, 16):
            ms = time_ms(lambda: rows_fp8_triton(x, num_warps=warps), device, budget_s=0.3)
            rows.append(dict(C=C, num_warps=warps, ms=round(ms, 4), GBps=round(tokens * C * 3 / ms / 1e6)))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="sana-1.6b", choices=CONFIGS)
    ap.add_argument("--tiny", action="store_true", help="a tiny model (dry runs on the CPU)")
    ap.add_argument("--px", default=None, help="comma-separated image sides (default 1024,4096; 256 with --tiny)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time the quantize kernel by num_warps")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda" or fp8.fp8_unavailable(device):
        print(f"fp8 matmuls unavailable ({fp8.fp8_unavailable(device)}): forcing the fp8 path (torch._scaled_mm "
              "runs on the CPU too) for a dry run; timings mean nothing")
        fp8.fp8_unavailable = lambda device: None
    cfg = TINY if args.tiny else CONFIGS[args.variant]
    sizes = [int(p) for p in (args.px or ("256" if args.tiny else "1024,4096")).split(",")]
    t0 = time.perf_counter()
    bf16 = SanaTransformer(cfg, dtype=BF16, device=device).eval()
    bf16.load_state_dict(random_state_dict(cfg, dtype=BF16))
    models = dict(bf16=bf16, fp8=fp8.use_fp8_compute(copy.deepcopy(bf16)))
    result = dict(variant="tiny" if args.tiny else args.variant, device=str(device),
                  build_s=round(time.perf_counter() - t0, 1), gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None, torch=torch.__version__)
    result["steps"] = [step_row(models, px, device, not args.no_profile) for px in sizes]
    result["layers"] = layer_errors(models, sizes[0], device, sorted({0, cfg.depth // 2, cfg.depth - 1}))
    result["final_latent"] = final_latents(models, sizes[0], device)
    if args.sweep and device.type == "cuda":
        result["quantize_sweep"] = quantize_sweep(device)
        print("rows_fp8 quantize by num_warps:", [(r["C"], r["num_warps"], r["ms"], r["GBps"])
                                                 for r in result["quantize_sweep"]])
    keys = ["px", "mode", "bf16_ms", "fp8_ms", "fp8_over_bf16", "bf16_eager_ms", "fp8_eager_ms", "velocity_rel_err"]
    print(" | ".join(keys))
    for r in result["steps"]:
        print(" | ".join(str(r.get(k)) for k in keys))
        for name in ("bf16", "fp8"):
            if r.get(f"{name}_profile"):
                print(f"  {name} GPU ms by kernel group:", r[f"{name}_profile"]["groups"])
    for lname, errs in result["layers"].items():
        print(f"{lname}: fp8 vs bf16 {errs['fp8_vs_bf16']}  (bf16 vs fp32 {errs['bf16_vs_fp32']})")
    print("final latent:", result["final_latent"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
