"""Where the end-to-end time goes (issue 21): our pipeline alone, timed and profiled, no diffusers.

    python3 bench/speed.py --out DIR            # full-size random models on the GPU
    python3 bench/speed.py --tiny --out DIR     # the demo models on the CPU: checks that the script runs

Copy it into another checkout's bench/ to measure that code the same way (it imports bench.py's model
builders beside it). It prints one table and writes DIR/speed-<tag>.json with:
- the Sana-Sprint 1.6B 1024 px 1- and 2-step image and the 20-step CFG 4.5 image (prompt -> PIL): wall median,
  phases (bench.phase_ms: GPU synchronised at phase ends), and the GPU's idle time within one un-synchronised
  call (profiler: largest gaps between kernels, with the host ops running in them);
- one CFG step at 1024 px (graph replay) and the eager step's top kernels (matmul vs the rest);
- Gemma, one prompt (runtime.encode_text, cached prefix) with its kernels; the 1024 px decode with its kernels;
- the 4096 px eager step (TFLOP/s);
and DIR/latents-<tag>.pt: each image's latent and PIL pixels, to check that two checkouts make the same images.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TINY = "--tiny" in sys.argv
if TINY:
    os.environ["BENCH_DEVICE"] = "cpu"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402  (imports sana_core from this checkout)

P, rt, T = B.P, B.rt, B.T
CUDA = B.DEV.type == "cuda"
if not CUDA:
    B.sync = lambda: None
LATENTS = {}  # the images' latents, saved to compare checkouts
MATMUL = ("gemm", "nvjet", "cutlass", "sm90_xmma", "wgmma", "matmul", "_mm_")


def wall_ms(fn, reps):
    return statistics.median(1000 * B.wall_s(fn)[0] for _ in range(reps))


def timeline(fn, top=12, gaps=8):
    """One call of fn() under the profiler, nothing synchronised inside: wall ms, GPU busy ms (kernels and
    copies), GPU idle ms between the first and last GPU op, the biggest idle gaps with the host ops that ran
    in them, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    B.sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        B.sync()
        wall = 1000 * (time.perf_counter() - t0)
    events = prof.events()
    gpu = sorted(((e.time_range.start, e.time_range.end, e.name) for e in events
                  if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda x: x[0])
    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    kernels, busy = {}, 0.0
    for s, e, name in gpu:
        kernels[name] = kernels.get(name, 0.0) + (e - s) / 1000
    found, end = [], gpu[0][1] if gpu else 0
    for s, e, _ in gpu[1:]:
        if s - end > 50:  # us
            found.append((end, s))
        end = max(end, e)
    idle = sum(s - e for e, s in found) / 1000
    biggest = []
    for a, b in sorted(found, key=lambda g: g[0] - g[1])[:gaps]:
        inside = {}
        for ev in cpu:  # host ops overlapping the gap, by overlap
            o = min(b, ev.time_range.end) - max(a, ev.time_range.start)
            if o > 20 and not ev.name.startswith("cuda"):
                inside[ev.name] = max(inside.get(ev.name, 0), o)
        ops = sorted(inside.items(), key=lambda kv: -kv[1])[:6]
        biggest.append(dict(ms=round((b - a) / 1000, 3), at_ms=round((a - gpu[0][0]) / 1000, 2),
                            host=[f"{n[:50]} {o / 1000:.2f}" for n, o in ops]))
    busy = sum(kernels.values())
    mm = sum(v for k, v in kernels.items() if any(w in k.lower() for w in MATMUL))
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    return dict(wall_ms=round(wall, 2), gpu_busy_ms=round(busy, 2), matmul_ms=round(mm, 2),
                gpu_span_ms=round((gpu[-1][1] - gpu[0][0]) / 1000, 2) if gpu else 0,
                first_gpu_at_ms=round((gpu[0][0] - min(e.time_range.start for e in cpu)) / 1000, 2) if gpu else 0,
                gpu_idle_ms=round(idle, 2), launches=len(gpu), gaps=biggest,
                top=[(n[:80], round(v, 3)) for n, v in ranked])


def models(variant):
    if TINY:
        from sana_core import load_autoencoder, load_text_encoder, load_transformer
        from sana_core.demo import write_demo_models
        paths = write_demo_models(Path(tempfile.mkdtemp()))
        key = "sprint" if "sprint" in variant else "transformer"
        return (load_transformer(paths[key], device="cpu"), load_autoencoder(paths["autoencoder"], device="cpu"),
                load_text_encoder(paths["text_encoder"], device="cpu"))
    return B.our_dit(variant), B.our_dcae(), B.our_text_encoder()


def e2e(r, name, variant, px, steps_list, cfg=4.5):
    dit, ae, te = models(variant)
    pipe = P.SanaPipeline(dit, ae, te, runtime=B.RUNTIME)
    if TINY:
        px = 256
    for steps in steps_list:
        call = lambda: pipe(B.PROMPT, width=px, height=px, steps=steps, cfg=cfg, seed=0)  # noqa: E731
        for _ in range(3):
            call()  # compile, capture at the second call
        key = f"{name}_{steps}step"
        r[key + "_ms"] = wall_ms(call, 7 if steps < 20 else 3)
        r[key + "_phases_ms"] = {k: round(v, 2) for k, v in B.phase_ms(call, te).items()}
        r[key + "_timeline"] = timeline(call)
        LATENTS[key] = pipe(B.PROMPT, width=px, height=px, steps=steps, cfg=cfg, seed=0, output="latent").cpu()
        LATENTS[key + "_image"] = torch.from_numpy(np.asarray(call()[0]).copy())  # uint8 (H, W, 3)
    r[name + "_graphs"] = B.graphs_held()
    del pipe
    B.RUNTIME.release()
    return dit, ae, te


def step_and_parts(r, dit, ae, te):
    cfg, px = dit.config, 256 if TINY else 1024
    x, t, ctx, mask = B.dit_inputs(cfg, px)
    if TINY:
        ctx = ctx[..., :cfg.caption_dim].float()
        x = x.float()
    caption = dit.encode_caption(ctx, mask)
    graphs = rt.Runtime(cuda_graphs=True)
    step = graphs.graphed(lambda x, t, c: dit(x, t, c), (caption,), module=dit, key="speed-step", tokens=0)
    step(x, t), step(x, t)
    r["cfg_step_graph_ms"] = B.time_ms(lambda: step(x, t)) if CUDA else wall_ms(lambda: step(x, t), 3)
    r["cfg_step_eager_timeline"] = timeline(lambda: dit(x, t, caption), top=24)
    graphs.release()
    # Gemma, one prompt, with the cached instruction prefix
    enc = lambda: B.RUNTIME.encode_text(te, B.PROMPT)  # noqa: E731
    enc(), enc()
    r["gemma_1prompt_ms"] = wall_ms(enc, 9)
    r["gemma_1prompt_timeline"] = timeline(enc, top=16)
    with B.env(rt.ENV, "0"):
        r["gemma_1prompt_eager_timeline"] = timeline(enc, top=16)
    # decode at 1024 px
    latent = torch.randn(1, 32, px // 32, px // 32, generator=torch.Generator().manual_seed(0)).to(B.DEV)
    dec = lambda: B.RUNTIME.decode(ae, latent)  # noqa: E731
    dec(), dec()
    r["decode_ms"] = wall_ms(dec, 9)
    with B.env(rt.ENV, "0"):
        r["decode_eager_timeline"] = timeline(dec, top=20)
    B.RUNTIME.release()
    if not TINY:  # 4096 px: compute-bound, eager
        x, t, ctx, mask = B.dit_inputs(cfg, 4096)
        caption = dit.encode_caption(ctx, mask)
        ms = B.time_ms(lambda: dit(x, t, caption), reps=5)
        r["step_4096_ms"] = ms
        r["step_4096_tflops"] = B.dit_flops(cfg, 2, (4096 // 32) ** 2) / ms / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tag", default=Path(__file__).resolve().parents[1].name)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--parts", default="sprint,cfg,step")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.manual_seed(0)  # Gemma's default init draws from the global generators: the same weights in every run
    r = dict(tag=args.tag, device=torch.cuda.get_device_name() if CUDA else "cpu", torch=torch.__version__)
    parts = args.parts.split(",")
    t0 = time.time()
    if "sprint" in parts:
        e2e(r, "sprint", "sana-sprint-1.6b", 1024, (1, 2))
        B.free_all() if CUDA else None
    if "cfg" in parts or "step" in parts:
        dit, ae, te = e2e(r, "cfg", "sana-1.6b", 1024, (20,) if "cfg" in parts else ())
        if "step" in parts:
            step_and_parts(r, dit, ae, te)
    r["seconds"] = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"speed-{args.tag}.json").write_text(json.dumps(r, indent=1))
    torch.save(LATENTS, out / f"latents-{args.tag}.pt")
    print(f"== {args.tag} ({r['seconds']:.0f} s)")
    for k, v in r.items():
        if k.endswith("phases_ms"):
            print(f"{k:32s} " + " ".join(f"{a}={b:.1f}" for a, b in v.items()))
        elif k.endswith("timeline"):
            print(f"{k:32s} wall={v['wall_ms']} busy={v['gpu_busy_ms']} mm={v['matmul_ms']} idle={v['gpu_idle_ms']} "
                  f"span={v['gpu_span_ms']} first={v['first_gpu_at_ms']} n={v['launches']}")
            for g in v["gaps"][:5]:
                print(f"    gap {g['ms']:.2f} ms at {g['at_ms']}: {'; '.join(g['host'][:4])}")
            for n, ms in v["top"][:8]:
                print(f"    {ms:7.3f} {n}")
        elif k.endswith("_ms") or k.endswith("tflops"):
            print(f"{k:32s} {v:.2f}")


if __name__ == "__main__":
    main()
