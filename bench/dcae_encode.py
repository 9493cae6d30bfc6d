"""DC-AE tiled encode against the untiled one: equality, and on a GPU time and peak extra memory.

Full-size SANA f32c32 encoder with random weights (norms moved off (1, 0)), a smooth random image. encode_tiled
runs the input conv and stages 0-2 (convolutions, full to 1/4 resolution) on tiles with their receptive field of
context and stages 3-5 (attention, 1/8 resolution) on the whole image; Runtime.encode picks untiled or the
biggest tile that fits in free memory.

  python3 bench/dcae_encode.py --tiny                                  # CPU, narrow encoder, 256 px: seconds
  python3 bench/dcae_encode.py --device cuda --dtype bf16 --sizes 1024,2048,4096 --tiles 1024,2048
"""
import argparse
import time

import torch
import torch.nn.functional as F

from sana_core.autoencoder import DCAE, DCAEConfig, FULL_CONFIG


def build(tiny: bool, device, dtype) -> DCAE:
    torch.manual_seed(0)
    widths = (8, 16, 32, 32, 64, 64)
    config = DCAEConfig(decoder_widths=widths, encoder_widths=widths, head_dim=8) if tiny else FULL_CONFIG
    ae = DCAE(config).eval().requires_grad_(False)
    for name, p in ae.named_parameters():
        if "norm" in name:
            p.data.add_(0.2 * torch.randn_like(p))
    return ae.to(device=device, dtype=dtype)


def smooth_image(size, device):
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.randn(1, 3, size // 64, size // 64, generator=g), size=(size, size), mode="bicubic")
    return (x / x.abs().max()).to(device)


def measure(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    started = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else float("nan")
    return out, seconds, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--sizes", default="256")
    parser.add_argument("--tiles", default="128")
    parser.add_argument("--tiny", action="store_true", help="the demo's narrow encoder (CPU smoke run)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    ae = build(args.tiny, device, dtype)
    print("| size | mode | seconds | peak extra GiB (estimate) | rel err vs untiled |\n|---|---|---|---|---|")
    for size in map(int, args.sizes.split(",")):
        image = smooth_image(size, device)
        ae.encode(image[..., :256, :256])  # warm-up (cuDNN plans)
        whole, seconds, peak = measure(lambda: ae.encode(image), device)
        print(f"| {size} | untiled | {seconds:.3f} | {peak:.2f} ({ae.encode_activation_bytes(1, size, size) / 2**30:.2f})"
              f" | - |")
        for tile in map(int, args.tiles.split(",")):
            if tile >= size:
                continue
            tiled, seconds, peak = measure(lambda: ae.encode_tiled(image, tile=tile), device)
            err = ((tiled - whole).float().norm() / whole.float().norm()).item()
            estimate = ae.encode_activation_bytes(1, size, size, tile=tile) / 2**30
            print(f"| {size} | tile {tile} | {seconds:.3f} | {peak:.2f} ({estimate:.2f}) | {err:.2e} |")
        del whole, image


if __name__ == "__main__":
    main()
