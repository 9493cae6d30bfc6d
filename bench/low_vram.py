"""Low VRAM (issue 20): the headless pipeline under a GPU memory cap against itself uncapped, in one process.

The cap is torch.cuda.set_per_process_memory_fraction (an 8 GB card: 7 GiB) with the same number given as
SanaPipeline(max_vram=...); the models start on the CPU and the runtime places each phase (Gemma for encoding,
then offloaded; the DiT whole or with its blocks streamed; the decode tiled). Rows (full-size random weights,
20 steps, CFG 4.5, one image; time: the second image, wall clock, moves included):

    1.6b-4096       1.6B (4K) at 4096 px, uncapped vs 7 GiB                   goal <= 1.5x
    4.8b-1024       4.8B at 1024 px: bf16, fp8, Q8_0 uncapped and under 7 GiB (bf16 streams)  goal (fp8/Q8_0) <= 1.3x
    1.6b-1024-5g    1.6B at 1024 px under 5 GiB with Q8_0 and fp8 weights     goal: completes

fp8 (ComfyUI's scaled e4m3fn, one scale per tensor) and Q8_0 weights are made in memory from the bf16 ones (the
layout quantize_checkpoint writes). Each row records peak reserved memory (what the cap limits), the blocks the
DiT streams, and the image's largest difference from the uncapped one.

    python3 bench/low_vram.py --out DIR [--rows 1.6b-4096,4.8b-1024,1.6b-1024-5g] [--budget 240]
    python3 bench/low_vram.py --tiny    # a CPU dry run of the plumbing with the demo models (no cap)
"""
import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import import_sana  # noqa: E402

import_sana()
from sana_core import pipeline as P, runtime as rt, transformer as T  # noqa: E402
from sana_core.quantized import FP8, QUANTIZATION_KEY, QuantizedTensor, load_quantized_weights  # noqa: E402

GiB = 2**30
PROMPT = "a red fox in the snow, highly detailed, 35 mm photo"
LOG = []


def log(*a):
    msg = " ".join(str(x) for x in a)
    print(msg, flush=True)
    LOG.append(msg)


def matrices(name, t):
    return name.startswith("blocks.") and name.endswith(".weight") and (t.ndim == 2 or t.shape[2:] == (1, 1))


def quantize(w, fmt):
    """A block matrix's stored form: fp8 e4m3fn x one float32 scale, or Q8_0 blocks (fp16 d, 32 int8)."""
    if fmt == "fp8":
        e4m3 = FP8["fp8_e4m3fn"]
        scale = (w.float().abs().amax() / torch.finfo(e4m3).max).clamp(min=1e-12)
        return QuantizedTensor((w.float() / scale).to(e4m3), "fp8_e4m3fn", w.shape, scale.reshape(()))
    rows = w.float().reshape(w.shape[0], -1, 32)  # (out, blocks, 32)
    d = (rows.abs().amax(-1, keepdim=True) / 127).to(torch.float16)
    q = (rows / d.float().clamp(min=1e-12)).round().clamp(-127, 127).to(torch.int8)
    data = torch.cat([d.view(torch.uint8), q.view(torch.uint8)], -1).reshape(w.shape[0], -1)  # (out, blocks x 34)
    return QuantizedTensor(data.contiguous(), "Q8_0", w.shape)


def quantized_copy(dit, fmt, operations=None):
    tensors = {k: quantize(v, fmt) if matrices(k, v) else v for k, v in dit.state_dict().items()}
    with torch.device("meta"):
        model = T.SanaTransformer(dit.config, dtype=dit.dtype, operations=operations)
    return load_quantized_weights(model, tensors, {QUANTIZATION_KEY: fmt}, device=dit.device, dtype=dit.dtype).eval()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def to_cpu(*models):
    for m in models:
        (m.offload() if hasattr(m, "offload") else m.to("cpu"))
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cap(gib):
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(1.0 if gib is None else gib * GiB / total, 0)


def image(dit, ae, te, px, cap_gib, runs=2):
    """(seconds of the last image, its pixels, stats) with the models placed by a fresh pipeline."""
    if cap_gib is not None:
        to_cpu(dit, ae, te)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dit.to(device), ae.to(device), te.to(device)
    cap(cap_gib)
    gpu = torch.cuda.is_available()
    pipe = P.SanaPipeline(dit, ae, te, runtime=rt.Runtime(), max_vram=cap_gib if gpu else None)
    shift = P.defaults_for(dit.config, px, px)["shift"]
    secs, pixels = [], None
    try:
        for _ in range(runs):
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            pixels = pipe(PROMPT, width=px, height=px, steps=20, cfg=4.5, flow_shift=shift, seed=0, output="tensor")
            sync()
            secs.append(time.perf_counter() - t0)
        p = pipe.runtime.placements.get(id(dit))
        stats = dict(s=round(secs[-1], 3), first_s=round(secs[0], 3),
                     peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GiB, 2) if gpu else None,
                     peak_allocated_gib=round(torch.cuda.max_memory_allocated() / GiB, 2) if gpu else None,
                     dit_streamed_blocks=(len(p.blocks) - p.resident) if p else 0, ok=True)
    except (torch.OutOfMemoryError, MemoryError) as e:
        stats = dict(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
    finally:
        for model in (dit, ae, te):
            pipe.runtime.offload(model)
        del pipe
        cap(None)
    return pixels, stats


def row(name, dit, ae, te, px, variants, results):
    """variants: (label, model, cap GiB or None); the first is the reference the others are compared with."""
    ref = None
    out = dict(row=name, px=px, variant=dit.config.variant, runs={})
    for label, model, cap_gib in variants:
        to_cpu(*{id(m): m for _, m, _ in variants}.values())  # nothing of the row left on the GPU under a cap
        pixels, stats = image(model, ae, te, px, cap_gib)
        if pixels is not None and ref is None:
            ref = pixels
        elif pixels is not None:
            stats["max_abs_diff_vs_first"] = round((pixels - ref).abs().max().item(), 4)
        out["runs"][label] = stats
        log(f"{name} {label}: {stats}")
    base = out["runs"][variants[0][0]].get("s")
    for label, stats in out["runs"].items():
        uncapped = out["runs"].get(label.split(" ")[0], {}).get("s")  # "fp8 7 GiB" against "fp8"
        if base and stats.get("s"):
            stats["x_vs_first"] = round(stats["s"] / base, 3)
        if uncapped and stats.get("s") and label != label.split(" ")[0]:
            stats["x_vs_uncapped"] = round(stats["s"] / uncapped, 3)
    results.append(out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1.6b-4096,4.8b-1024,1.6b-1024-5g")
    parser.add_argument("--out", default=None)
    parser.add_argument("--budget", type=float, default=1e9, help="seconds: rows not started after it are skipped")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    start, results = time.perf_counter(), []

    def save():
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "bench-i20b-low-vram.json").write_text(json.dumps(dict(rows=results, log=LOG), indent=1))

    if args.tiny:
        from sana_core import load_autoencoder, load_text_encoder, load_transformer
        from sana_core.demo import write_demo_models
        files = write_demo_models(Path(tempfile.mkdtemp()))
        dit = load_transformer(files["transformer"], dtype=torch.float32, device="cpu")
        ae = load_autoencoder(files["autoencoder"], dtype=torch.float32, device="cpu")
        te = load_text_encoder(files["text_encoder"], dtype=torch.float32, device="cpu")
        row("tiny", dit, ae, te, 64, [("bf16", dit, None), ("fp8 capped", quantized_copy(dit, "fp8"), 5),
                                      ("Q8_0 capped", quantized_copy(dit, "Q8_0"), 5)], results)
        save()
        return
    import bench  # the full-size random builders of bench/bench.py
    te, ae = bench.our_text_encoder(), bench.our_dcae()
    for name in args.rows.split(","):
        if time.perf_counter() - start > args.budget:
            log(f"{name}: skipped (budget)")
            continue
        if name == "1.6b-4096":
            dit = bench.our_dit("sana-1.6b-4k")
            row(name, dit, ae, te, 4096, [("bf16", dit, None), ("bf16 7 GiB", dit, 7)], results)
        elif name == "4.8b-1024":
            dit = bench.our_dit("sana-1.5-4.8b")
            fp8, q8 = quantized_copy(dit, "fp8").cpu(), quantized_copy(dit, "Q8_0").cpu()
            row(name, dit, ae, te, 1024, [("bf16", dit, None), ("fp8", fp8, None), ("fp8 7 GiB", fp8, 7),
                                          ("Q8_0", q8, None), ("Q8_0 7 GiB", q8, 7), ("bf16 7 GiB", dit, 7)], results)
            del fp8, q8
        elif name == "1.6b-1024-5g":
            dit = bench.our_dit("sana-1.6b")
            fp8, q8 = quantized_copy(dit, "fp8").cpu(), quantized_copy(dit, "Q8_0").cpu()
            row(name, dit, ae, te, 1024, [("bf16", dit, None), ("Q8_0 5 GiB", q8, 5), ("fp8 5 GiB", fp8, 5)],
                results)
            del fp8, q8
        dit = None
        to_cpu(ae, te)
        save()
    log(f"total {time.perf_counter() - start:.0f} s")
    save()


if __name__ == "__main__":
    main()
