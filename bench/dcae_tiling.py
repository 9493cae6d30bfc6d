"""DC-AE tiled decode: quality (and on a GPU, speed and memory) for several tile / overlap settings.

Full-size SANA f32c32 decoder, random weights (diffusers' AutoencoderDC init, norms moved off (1, 0)),
a smooth random latent. decode_tiled runs stages 3-5 (global linear attention, 1/8 resolution) on the
whole latent and tiles stages 0-2 + head; `overlap` is the context each tile reads around it. Quality
is measured against the untiled decode, before the [-1, 1] clamp:
  rel err   ||tiled - untiled|| / ||untiled||
  max err   max |tiled - untiled| (images span [-1, 1])
  seam      strongest artificial edge: max over pixel columns (rows) of the mean |horizontal (vertical)
            step of tiled - untiled|, divided by the image's mean |step|. 0: invisible; ~0.1: a seam.

  python3 bench/dcae_tiling.py                       # CPU, 256 px, fp32 (slow CPUs: minutes)
  python3 bench/dcae_tiling.py --device cuda --size 4096 --dtype bf16 --tiles 1024,1536,2048 \\
      --overlaps 0,32,56 --timing --diffusers --cap-gib 16
--timing: time and peak extra memory of decode / decode_tiled (public API, GPU); --diffusers: the same
for diffusers' AutoencoderDC (untiled and its 512 px tiling); --cap-gib: Runtime.decode with the process
capped to that much GPU memory (torch.cuda.set_per_process_memory_fraction).
"""
import argparse
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderDC

from sana_core.autoencoder import DCAE, FULL_CONFIG, SCALING_FACTOR, to_model_names
from sana_core.runtime import Runtime, decode_tile, free_bytes
from sana_core.checkpoints import load_weights

SANA_DIFFUSERS_CONFIG = dict(
    in_channels=3, latent_channels=32, attention_head_dim=32,
    encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    encoder_layers_per_block=[2, 2, 2, 3, 3, 3], decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
    encoder_qkv_multiscales=[[], [], [], [5], [5], [5]], decoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
    downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=SCALING_FACTOR)


def build(device, dtype):
    """(ours, diffusers') with the same random weights."""
    torch.manual_seed(0)
    ref = AutoencoderDC(**SANA_DIFFUSERS_CONFIG).eval().requires_grad_(False)
    for name, p in ref.named_parameters():
        if "norm" in name:
            p.add_(0.2 * torch.randn_like(p))
    ours = DCAE(FULL_CONFIG, dtype=dtype, device="meta")
    load_weights(ours, to_model_names(ref.state_dict()), device=device, dtype=dtype)
    return ours, ref


def smooth_latent(size, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = size // 32
    z = F.interpolate(torch.randn(1, 32, max(h // 4, 2), max(h // 4, 2), generator=g), size=(h, h),
                      mode="bicubic", align_corners=True)
    return (z / z.std()).to(device)


def seam(out, ref):
    e, steps = (out - ref).float(), []
    for dim in (2, 3):
        step_e = e.diff(dim=dim).abs().mean(dim=(0, 1, 5 - dim))      # per column (row) of steps
        steps.append(step_e.max() / ref.float().diff(dim=dim).abs().mean())
    return max(steps).item()


def timed(fn, device, reps):
    """(seconds per call, peak extra bytes, result)"""
    if device.type == "cuda":
        fn()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps, torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size(), out
    return (time.perf_counter() - t0) / reps, float("nan"), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=256, help="output side in pixels (multiple of 32)")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--tiles", default="128", help="tile sides in pixels, comma-separated")
    ap.add_argument("--overlaps", default="0,8,16,24,32,40,56", help="context in pixels, comma-separated")
    ap.add_argument("--timing", action="store_true")
    ap.add_argument("--diffusers", action="store_true")
    ap.add_argument("--cap-gib", type=float, default=None)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
             None: torch.bfloat16 if device.type == "cuda" else torch.float32}[args.dtype]
    ours, ref = build(device, dtype)
    z = smooth_latent(args.size, device)
    print(f"# DC-AE tiling, {args.size} px, {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{dtype}, torch {torch.__version__}, random weights, smooth latent")

    with torch.inference_mode():
        t0 = time.perf_counter()
        feats = ours.decoder.global_stages(ours._unscale(z))      # what decode_tiled computes first
        t1 = time.perf_counter()
        untiled = ours.decoder.local_stages(feats)
        t2 = time.perf_counter()
    print(f"untiled: global stages {t1 - t0:.2f} s, local stages {t2 - t1:.2f} s; output std {untiled.float().std():.3f}, "
          f"{(untiled.abs() > 1).float().mean():.1%} clamped\n")
    print("| tile px | overlap px | tiles | rel err | max err | seam | local stages s |")
    print("|---|---|---|---|---|---|---|")
    for tile in map(int, args.tiles.split(",")):
        for overlap in map(int, args.overlaps.split(",")):
            with torch.inference_mode():
                t0 = time.perf_counter()
                out = ours._local_tiled(feats, tile, overlap)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
            n = -(-feats.shape[2] // (tile // ours.decoder.local_scale))
            err = ((out.float() - untiled.float()).norm() / untiled.float().norm()).item()
            print(f"| {tile} | {overlap} | {n}x{n} | {err:.2e} | {(out.float() - untiled.float()).abs().max():.2e} | "
                  f"{seam(out, untiled):.2e} | {dt:.2f} |", flush=True)
    del feats, out

    if args.diffusers:
        ref.to(device=device, dtype=dtype)
        t = min(512, args.size // 2)  # diffusers' default tiling: 512 px tiles, 448 stride, blended
        ov = max(32, t // 8 // 32 * 32)
        with torch.inference_mode():
            zr = (z / SCALING_FACTOR).to(dtype)
            ref.enable_tiling(t, t, t - ov, t - ov)
            t0 = time.perf_counter()
            tiled = ref.decode(zr).sample
            dt = time.perf_counter() - t0
            err = ((tiled.float() - untiled.float()).norm() / untiled.float().norm()).item()
        print(f"| diffusers {t} | {ov} (blended) | - | {err:.2e} | {(tiled.float() - untiled.float()).abs().max():.2e} | "
              f"{seam(tiled, untiled):.2e} | {dt:.2f} (whole decode) |")
        del tiled
        ref.disable_tiling()
    del untiled

    if args.timing:
        print("\n| what | ms | peak extra GiB | estimate GiB |\n|---|---|---|---|")
        h = args.size // 32
        runs = [("ours decode", lambda: ours.decode(z), ours.activation_bytes(1, h, h))]
        runs += [(f"ours decode_tiled tile={t}", lambda t=t: ours.decode_tiled(z, tile=t),
                  ours.activation_bytes(1, h, h, tile=t)) for t in map(int, args.tiles.split(","))]
        if args.diffusers:
            zr = (z / SCALING_FACTOR).to(dtype)
            runs += [("diffusers decode", lambda: (ref.disable_tiling(), ref.decode(zr).sample)[1], float("nan")),
                     ("diffusers tiled (512/448)", lambda: (ref.enable_tiling(512, 512, 448, 448), ref.decode(zr).sample)[1],
                      float("nan"))]
        for name, fn, estimate in runs:
            try:
                with torch.inference_mode():
                    sec, peak, _ = timed(fn, device, args.reps)
                print(f"| {name} | {sec * 1000:.0f} | {peak / 2**30:.2f} | {estimate / 2**30:.2f} |", flush=True)
            except torch.OutOfMemoryError:
                print(f"| {name} | out of memory | | |")
                torch.cuda.empty_cache()

    if args.cap_gib and device.type == "cuda":
        ref.to("cpu")
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * 2**30 / torch.cuda.get_device_properties(device).total_memory)
        free = free_bytes(device)
        h = args.size // 32
        with torch.inference_mode():
            sec, peak, out = timed(lambda: Runtime().decode(ours, z), device, 1)
        print(f"\ncapped to {args.cap_gib} GiB: Runtime.decode picked tile={decode_tile(ours, 1, h, h, free)}, "
              f"{sec * 1000:.0f} ms, peak extra {peak / 2**30:.2f} GiB, output finite: {bool(torch.isfinite(out).all())}")


if __name__ == "__main__":
    main()
