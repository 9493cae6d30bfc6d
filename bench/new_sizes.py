"""First image at each new size (and batch size) in one warm process, per phase, against that size's steady
(third) image (1.6B, 1024-class sizes, random weights), with the Triton compiles each first image made (new
entries in Triton's cache: none once 1024 px has run), then where a first decode at a brand-new size spends
its CPU time.
GPU only; prints, writes nothing. From the repository root:

    PYTHONUNBUFFERED=1 python3 bench/new_sizes.py
"""
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

import bench as B
from sana_core import pipeline as P

SIZES = [(1152, 896, 1), (1344, 704, 1), (1280, 768, 1), (896, 1152, 1), (1536, 640, 1), (704, 1344, 1),
         (1024, 1024, 2), (1152, 896, 2)]  # (width, height, batch)


def triton_cache_entries() -> int:
    path = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return len(os.listdir(path)) if os.path.isdir(path) else 0


def main():
    te, dit, ae = B.our_text_encoder(), B.our_dit("sana-1.6b"), B.our_dcae()
    pipe = P.SanaPipeline(dit, ae, te, runtime=B.RUNTIME)

    def phases(w, h, batch=1):
        call = lambda: pipe(B.PROMPT, width=w, height=h, steps=20, cfg=4.5, flow_shift=3.0, seed=0,  # noqa: E731
                            batch_size=batch)
        return {k: round(v, 1) for k, v in B.phase_ms(call, te).items()}
    phases(1024, 1024), phases(1024, 1024)
    print("steady 1024", phases(1024, 1024), flush=True)
    for w, h, batch in SIZES:
        compiled = triton_cache_entries()
        first = phases(w, h, batch)
        compiled = triton_cache_entries() - compiled
        second, steady = phases(w, h, batch), phases(w, h, batch)  # graphs captured in the second
        print(f"{w}x{h} batch {batch} first {first} {sum(first.values()):.0f} ms ({compiled} Triton compiles), "
              f"second {sum(second.values()):.0f} ms, steady (third) {steady} {sum(steady.values()):.0f} ms: "
              f"first {sum(first.values()) / sum(steady.values()):.2f}x", flush=True)
    latent = torch.randn(1, 32, 23, 41, device="cuda")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        B.sync()
        t0 = time.perf_counter()
        B.RUNTIME.decode(ae, latent)
        B.sync()
    print(f"first decode of a 23x41 latent: {(time.perf_counter() - t0) * 1e3:.1f} ms")
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]:
        print(f"  {e.key[:60]} {e.self_cpu_time_total / 1e3:.1f} ms ({e.count} calls)")


if __name__ == "__main__":
    main()
