"""Quantized DiT weights against bf16, side by side from one run: file size, load time, resident weight
memory, one DiT step (CFG batch of 2, caption side precomputed, eager) and the step's relative error
against the bf16 model; then the dequantization of one Mix-FFN weight (each GGUF block format, fp8 x
scale), Triton kernel against its PyTorch twin.

Writes a random full-size checkpoint (bf16, original names) in a temporary folder, quantizes it with
quantize_checkpoint (`python -m sana_core quantize`: fp8 = ComfyUI's scaled fp8, q8_0 and q4_0 = GGUF),
loads each file with load_transformer and times it. The files are deleted afterwards. Without the `gguf`
package only the fp8 rows and the dequantization table run.

    python3 bench/quantized.py                                  # GPU: 1.6B at 1024 px, prints a table + JSON
    python3 bench/quantized.py --variant sana-1.6b --px 4096 --formats fp8,q8_0
    python3 bench/quantized.py --tiny --device cpu              # a dry run: tiny model on the CPU (seconds)
"""
import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from checkout import import_sana

import_sana()
from sana_core import kernels as K  # noqa: E402
from sana_core.kernels.dequant import FORMATS  # noqa: E402
from sana_core.quantized import quantization_summary  # noqa: E402
from sana_core.quantized_files import quantize_checkpoint  # noqa: E402
from sana_core.transformer import (CONFIGS, SanaConfig, config_metadata, load_transformer,  # noqa: E402
                                   random_state_dict)

TINY = SanaConfig(depth=2, width=256, caption_dim=64, self_heads=8, cross_heads=2, mlp_hidden=640)
FORMATS_WRITTEN = ("fp8", "q8_0", "q4_0")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, reps=10, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def weight_mib(model):
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 2**20


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def dit_row(path, device, px, reference=None):
    sync(device)
    t0 = time.perf_counter()
    model = load_transformer(path, dtype=torch.bfloat16, device=device)
    sync(device)
    row = dict(file=path.name, file_mib=round(path.stat().st_size / 2**20), load_s=round(time.perf_counter() - t0, 2),
               weights_mib=round(weight_mib(model)), quantized_layers=quantization_summary(model))
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    x = torch.randn(2, 32, px // 32, px // 32, generator=g).to(device, torch.bfloat16)
    context = torch.randn(2, 300, cfg.caption_dim, generator=g).to(device, torch.bfloat16)
    t = torch.full((2,), 500.0, device=device)
    with torch.no_grad():
        caption = model.encode_caption(context)
        step = lambda: model(x, t, caption)  # noqa: E731
        out = step()
        row["step_ms"] = round(time_ms(step, device, reps=3 if device.type == "cpu" else 10), 2)
    row["rel_err_vs_bf16"] = None if reference is None else round(rel_err(out, reference), 5)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row, out


def dequant_rows(device, shape):
    """Each GGUF format's decode of a (rows, cols) weight, and fp8 x scale: Triton and twin, ms and GB/s
    written (bf16)."""
    cases = []
    for fmt, (qk, size) in FORMATS.items():
        data = torch.randint(0, 256, (shape[0] * shape[1] // qk, size), dtype=torch.uint8, device=device)
        for offset in {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}.get(fmt, (0,)):  # d, dmin = 2^-7
            data[:, offset:offset + 2] = torch.tensor([0x00, 0x20], dtype=torch.uint8, device=device)
        cases.append((fmt, lambda d=data, f=fmt: K.dequantize_blocks_torch(d, f, torch.bfloat16),
                      lambda d=data, f=fmt: K.dequantize_blocks_triton(d, f, torch.bfloat16)))
    data, scale = torch.randn(shape, device=device).to(torch.float8_e4m3fn), torch.tensor(0.01, device=device)
    cases.append(("fp8_e4m3fn x scale", lambda: K.dequantize_fp8_torch(data, scale, torch.bfloat16),
                  lambda: K.dequantize_fp8_triton(data, scale, torch.bfloat16)))
    rows = []
    for name, twin, tri in cases:
        row = dict(format=name, shape=list(shape), torch_ms=round(time_ms(twin, device), 3))
        if K.HAS_TRITON and device.type == "cuda":
            row["triton_equals_twin"] = bool(torch.equal(tri(), twin()))
            row["triton_ms"] = round(time_ms(tri, device), 3)
            row["triton_GBps"] = round(shape[0] * shape[1] * 2 / row["triton_ms"] / 1e6, 1)
        rows.append(row)
    return rows


def table(rows, keys):
    lines = [" | ".join(keys), " | ".join("---" for _ in keys)]
    lines += [" | ".join(str(r.get(k, "")) for k in keys) for r in rows]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="sana-1.6b", choices=CONFIGS)
    ap.add_argument("--tiny", action="store_true", help="a tiny model (dry runs on the CPU)")
    ap.add_argument("--px", type=int, help="image side (default 1024; 256 with --tiny)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--formats", default=",".join(FORMATS_WRITTEN),
                    help="comma-separated, of fp8,q8_0,q5_0,q4_0 (GGUF ones need the gguf package)")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = TINY if args.tiny else CONFIGS[args.variant]
    px = args.px or (256 if args.tiny else 1024)
    result = dict(variant="tiny" if args.tiny else args.variant, px=px, device=str(device),
                  gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    with tempfile.TemporaryDirectory(dir=os.environ.get("SANA_BENCH_TMP")) as d:
        source = Path(d) / "sana_bf16.safetensors"
        from safetensors.torch import save_file
        save_file(random_state_dict(cfg, dtype=torch.bfloat16), source, metadata=config_metadata(cfg))
        has_gguf = importlib.util.find_spec("gguf") is not None
        written = [f for f in args.formats.split(",") if has_gguf or f == "fp8"]
        files, quantize_s = {}, {}
        for fmt in written:
            files[fmt] = Path(d) / f"sana_{fmt}.{'safetensors' if fmt == 'fp8' else 'gguf'}"
            t0 = time.perf_counter()
            quantize_checkpoint(source, files[fmt], fmt)
            quantize_s[fmt] = round(time.perf_counter() - t0, 1)
        row, reference = dit_row(source, device, px)
        rows = [dict(row, format="bf16")]
        for fmt in written:
            row, _ = dit_row(files[fmt], device, px, reference)
            rows.append(dict(row, format=fmt, quantize_s=quantize_s[fmt]))
    result["dit"] = rows
    result["dequant"] = dequant_rows(device, (2 * cfg.mlp_hidden, cfg.width))  # the Mix-FFN's inverted conv
    print(table(rows, ["format", "file_mib", "quantize_s", "load_s", "weights_mib", "step_ms", "rel_err_vs_bf16"]))
    print()
    print(table(result["dequant"], ["format", "shape", "torch_ms", "triton_ms", "triton_GBps", "triton_equals_twin"]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
