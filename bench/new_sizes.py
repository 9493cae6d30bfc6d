"""First image at each new size in one warm process, per phase, against that size's steady image (1.6B,
1024-class sizes, random weights), then where a first decode at a brand-new size spends its CPU time.
GPU only; prints, writes nothing. From the repository root:

    PYTHONUNBUFFERED=1 python3 bench/new_sizes.py
"""
import time

import torch
from torch.profiler import ProfilerActivity, profile

import bench as B
from sana_core import pipeline as P

SIZES = [(1152, 896), (1344, 704), (1280, 768), (896, 1152), (1536, 640), (704, 1344)]


def main():
    te, dit, ae = B.our_text_encoder(), B.our_dit("sana-1.6b"), B.our_dcae()
    pipe = P.SanaPipeline(dit, ae, te)

    def phases(w, h):
        call = lambda: pipe(B.PROMPT, width=w, height=h, steps=20, cfg=4.5, flow_shift=3.0, seed=0)  # noqa: E731
        return {k: round(v, 1) for k, v in B.phase_ms(call, te, ae).items()}
    phases(1024, 1024), phases(1024, 1024)
    print("steady 1024", phases(1024, 1024), flush=True)
    for w, h in SIZES:
        first, steady = phases(w, h), phases(w, h)
        print(f"{w}x{h} first {first} {sum(first.values()):.0f} ms, steady {steady} {sum(steady.values()):.0f} ms, "
              f"{sum(first.values()) / sum(steady.values()):.2f}x", flush=True)
    latent = torch.randn(1, 32, 23, 41, device="cuda")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        B.sync()
        t0 = time.perf_counter()
        ae.decode_auto(latent)
        B.sync()
    print(f"first decode of a 23x41 latent: {(time.perf_counter() - t0) * 1e3:.1f} ms")
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]:
        print(f"  {e.key[:60]} {e.self_cpu_time_total / 1e3:.1f} ms ({e.count} calls)")


if __name__ == "__main__":
    main()
