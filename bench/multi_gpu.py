"""Several GPUs, one image (sana_core.parallel): end to end (prompt -> image), 1 GPU against N GPUs of the
same machine in one run, side by side.

    python3 bench/multi_gpu.py --gpus 1,2 --sizes 4096,2048            # 1.6B, 20 steps, CFG 4.5 (2 H200s)
    python3 bench/multi_gpu.py --gpus 1,2,4,8 --sizes 4096,2048        # issue 23 (4 / 8 GPUs)
    python3 bench/multi_gpu.py --tiny --gpus 1,2,3 --sizes 512,256     # CPU dry run: tiny models, gloo
    python3 bench/multi_gpu.py --gpus 1,2 --sizes 4096,2048 --graphs   # parallel steps as CUDA graphs (NCCL)

Each GPU count runs in its own processes (spawned, NCCL; gloo on the CPU); every process builds the same
random weights (full-size 1.6B DiT with the 2K / 4K position embedding, DC-AE f32c32, Gemma-2-2B; bf16) on
its GPU. Per size: the chosen split (parallel.choose_plan), the median end-to-end time (after one warm-up
image), the time against 1 GPU, the communication time per step (one more image with the collectives
timed, synchronised), peak memory per GPU (max allocated, weights included; the highest of the GPUs) and
the difference of the image to the 1-GPU image (relative L2 over the float pixels in [0, 1], and the
largest pixel difference in 8-bit steps).
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from checkout import import_sana  # noqa: E402

import_sana()
from sana_core import parallel, pipeline as P  # noqa: E402

PROMPT = "a cyberpunk cat with a neon sign that says sana, rain on the street, reflections, highly detailed"
STEPS, CFG = 20, 4.5


def build(tiny: bool, px: int, device, folder):
    """(transformer, autoencoder, text encoder) with the same random weights in every process."""
    if tiny:  # the demo files (real formats), float32 on the CPU
        from sana_core import load_autoencoder, load_text_encoder, load_transformer
        from sana_core.demo import write_demo_models
        paths = write_demo_models(Path(folder) / f"models{dist.get_rank()}")
        kw = dict(device=device, dtype=torch.float32)
        return (load_transformer(paths["transformer"], **kw), load_autoencoder(paths["autoencoder"], **kw),
                load_text_encoder(paths["text_encoder"], **kw))
    import bench as B  # the full-size random builders of the main benchmark, on this process's GPU
    B.DEV = device
    torch.manual_seed(0)  # Gemma's random init draws from the global generators: the same weights in every process
    variant = {2048: "sana-1.6b-2k", 4096: "sana-1.6b-4k"}.get(px, "sana-1.6b")
    return B.our_dit(variant), B.our_dcae(), B.our_text_encoder()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(rank, world, init_method, args, folder):
    device = torch.device("cpu") if args.tiny else torch.device("cuda", rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("gloo" if args.tiny else "nccl", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    rows = []
    for px in args.sizes:
        if px == args.sizes[0] or not args.tiny:  # the tiny models serve every size
            dit, ae, te = build(args.tiny, px, device, folder)
        devices = [str(device)] * world if args.tiny else list(range(world))
        pipe = P.SanaPipeline(dit, ae, te, devices=devices if world > 1 else None)
        call = lambda: pipe(PROMPT, width=px, height=px, steps=STEPS, cfg=CFG, seed=0, output="tensor")  # noqa: E731
        call()  # warm-up: kernels compiled, plans made
        times = []
        for _ in range(args.reps):
            dist.barrier()
            sync(device)
            start = time.perf_counter()
            image = call()
            sync(device)
            times.append(time.perf_counter() - start)
        comm_ms = None
        if world > 1:
            comm = pipe.transformer.comm
            comm.seconds = 0.0
            graphs, pipe.runtime.cuda_graphs = pipe.runtime.cuda_graphs, False  # timed eagerly: a graph runs no Python
            call()
            comm_ms, comm.seconds, pipe.runtime.cuda_graphs = 1000 * comm.seconds / STEPS, None, graphs
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            call()
            peak = torch.cuda.max_memory_allocated(device) / 2**30
        peaks = [None] * world
        dist.all_gather_object(peaks, peak)
        row = dict(px=px, gpus=world, seconds=statistics.median(times), comm_ms_per_step=comm_ms,
                   peak_gib=None if peak is None else max(peaks),
                   plan=str(pipe.transformer.last_plan) if world > 1 else "1 GPU")
        if rank == 0:
            torch.save(image, Path(folder) / f"image-{px}-{world}.pt")
            rows.append(row)
        pipe.parallel = None  # the process group outlives this pipeline (the next size)
        dit, ae, te = pipe.transformer, pipe.autoencoder, pipe.text_encoder
        dit, ae = getattr(dit, "model", dit), getattr(ae, "autoencoder", ae)  # unwrapped, for the next size
        del pipe, call
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0:
        (Path(folder) / f"rows-{world}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default="1,2", help="GPU counts to compare, the first is the baseline (1)")
    ap.add_argument("--sizes", default="4096,2048", help="square image sides in pixels")
    ap.add_argument("--reps", type=int, default=2, help="timed images per size and count (median)")
    ap.add_argument("--tiny", action="store_true", help="CPU processes, gloo, tiny demo models (a dry run)")
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--graphs", action="store_true", help="SANA_PARALLEL_CUDA_GRAPHS=1: the parallel sampling steps "
                                                          "replayed as CUDA graphs (1 GPU always uses them)")
    args = ap.parse_args()
    if args.graphs:
        os.environ[parallel.GRAPHS_ENV] = "1"  # the spawned processes inherit it
    args.sizes = [int(s) for s in args.sizes.split(",")]
    counts = [int(n) for n in args.gpus.split(",")]
    if not args.tiny and max(counts) > torch.cuda.device_count():
        sys.exit(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} GPUs")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for world in counts:
            init_method = f"tcp://127.0.0.1:{parallel._free_port()}"
            mp.start_processes(worker, args=(world, init_method, args, folder), nprocs=world, start_method="spawn")
            rows += json.loads((Path(folder) / f"rows-{world}.json").read_text())
        for r in rows:
            base = next(b for b in rows if b["px"] == r["px"] and b["gpus"] == counts[0])
            a, b = (torch.load(Path(folder) / f"image-{r['px']}-{n}.pt").double() for n in (r["gpus"], counts[0]))
            r["x_baseline"] = r["seconds"] / base["seconds"]
            r["rel_l2_to_baseline"] = ((a - b).norm() / b.norm()).item()
            r["max_diff_8bit"] = (255 * (a - b).abs().max()).item()
    print(f"SANA {'tiny (CPU, gloo)' if args.tiny else '1.6B'}, {STEPS} steps, CFG {CFG}, end to end (prompt -> image)"
          f"{', parallel steps as CUDA graphs' if args.graphs else ''}")
    print(f"{'px':>5} {'GPUs':>4}  {'split':<34} {'s':>7} {'x 1 GPU':>7} {'comm ms/step':>12} {'peak GiB/GPU':>12} "
          f"{'rel L2 to 1 GPU':>15} {'max diff /255':>13}")
    for r in sorted(rows, key=lambda r: (-r["px"], r["gpus"])):
        comm = "-" if r["comm_ms_per_step"] is None else f"{r['comm_ms_per_step']:.1f}"
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        print(f"{r['px']:>5} {r['gpus']:>4}  {r['plan']:<34} {r['seconds']:>7.2f} {r['x_baseline']:>7.2f} {comm:>12} "
              f"{peak:>12} {r['rel_l2_to_baseline']:>15.2e} {r['max_diff_8bit']:>13.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
