"""LoRA costs: the sampling step with and without a merged rank-32 LoRA (medians of the same graphed call,
timed before, with, and after unloading the LoRA: merging adds no work per step), and the wall time to read,
merge and unload a rank-32 LoRA (train_dreambooth_lora_sana.py's default targets: q/k/v of both attentions)
on the 1.6B. Random weights; prints one table, writes nothing. From the repository root:

    PYTHONUNBUFFERED=1 python3 bench/lora.py                         # GPU: sana-1.6b bf16, 1024 px, CFG batch 2
    BENCH_DEVICE=cpu python3 bench/lora.py --tiny                   # dry run on the CPU, demo-sized model
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import bench as B
from sana_core import lora as L, transformer as T
from sana_core.runtime import Runtime
from sana_core.demo import write_demo_lora


def sync():
    if B.DEV.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, reps):
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="demo-sized model in float32 (CPU dry run)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--px", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.tiny:
        cfg = T.SanaConfig(depth=2, width=64, caption_dim=48, self_heads=2, cross_heads=2, mlp_hidden=160)
        model = B.randomize_(T.SanaTransformer(cfg, dtype=torch.float32, device=B.DEV), 0)
        px, dtype = 128, torch.float32
    else:
        model, px, dtype = B.our_dit("sana-1.6b"), args.px, B.BF16
    cfg = model.config
    x, t, ctx, mask = B.dit_inputs(cfg, px)  # CFG batch of 2
    x, ctx = x.to(dtype), ctx.to(dtype)
    caption = model.encode_caption(ctx, mask)
    runtime = Runtime(cuda_graphs=B.DEV.type == "cuda")
    step = runtime.graphed(lambda x, t, c: model(x, t, c), (caption,), module=model, key="bench-lora", tokens=0)
    step(x, t), step(x, t)  # warm-up, capture (on a GPU)
    rows, without, with_lora, read, merge, unload = {}, [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = write_demo_lora(Path(tmp) / "lora.safetensors", depth=cfg.depth, width=cfg.width, rank=args.rank)
        for _ in range(3):  # rounds of: without, read + merge, with, unload (the first merge allocates the backup)
            without.append(median_ms(lambda: step(x, t), args.reps))
            t0 = time.perf_counter()
            lora = L.read_lora(path, model)
            read.append(time.perf_counter() - t0)
            sync()
            t0 = time.perf_counter()
            L.apply_lora(model, lora, 0.8)
            sync()
            merge.append(time.perf_counter() - t0)
            with_lora.append(median_ms(lambda: step(x, t), args.reps))
            graph_is_current = torch.equal(step(x, t), model(x, t, caption))  # the graph replays the merged weights
            t0 = time.perf_counter()
            L.unload_loras(model)
            sync()
            unload.append(time.perf_counter() - t0)
    rows["step without LoRA (ms, median)"] = statistics.median(without)
    rows["step with LoRA (ms, median)"] = statistics.median(with_lora)
    rows["with / without"] = rows["step with LoRA (ms, median)"] / rows["step without LoRA (ms, median)"]
    rows["graph captures (1: none after merging)"] = step.captures
    rows["graph replays the merged weights"] = graph_is_current
    rows[f"read rank-{args.rank} LoRA file (s)"] = statistics.median(read)
    rows["merge, first (s)"] = merge[0]
    rows["merge, median of 3 (s)"] = statistics.median(merge)
    rows["unload, median of 3 (s)"] = statistics.median(unload)
    rows["LoRA modules / parameters changed"] = f"{len(lora.updates)} / {len(lora.keys())}"
    print(f"\n{cfg.variant}, {px} px, batch 2 (CFG), {dtype}, {B.DEV}")
    for name, value in rows.items():
        print(f"  {name:44s} {B.fmt(value, 3) if isinstance(value, float) else value}")


if __name__ == "__main__":
    sys.exit(main())
