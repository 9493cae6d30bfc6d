"""Host memory while loading a full-size SANA DiT: peak RSS of load_transformer.

Writes a random full-size checkpoint (original key names, .safetensors, bf16 by default: 3.2 GB
for the 1.6B model) in a temporary folder, loads it in a fresh process and reports that process's
peak resident set (getrusage), before and after touching every weight (the weights of a
same-dtype CPU load stay memory-mapped until first used). The file is deleted afterwards.

    python3 bench/load_memory.py                      # 1.6B, bf16 file -> bf16 on the CPU
    python3 bench/load_memory.py --variant sana-0.6b --load-dtype float32
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def proc_status() -> dict:  # MiB of the current resident set: anonymous (private copies) and file-backed (mmap)
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def write(path, variant, dtype):
    from safetensors.torch import save_file

    from sana_core.transformer import CONFIGS, random_state_dict

    cfg = CONFIGS[variant]
    sd = random_state_dict(cfg, dtype=dtype)
    sd["pos_embed"] = torch.zeros(1, 32 * 32, cfg.width, dtype=dtype)  # stale extras of the real files
    sd["y_embedder.y_embedding"] = torch.zeros(300, cfg.caption_dim, dtype=dtype)
    save_file(sd, path)


def load(path, dtype, device):
    import sana_core.transformer as T  # imports first, so the baseline includes torch

    base = peak_mib()
    start = time.perf_counter()
    model = T.load_transformer(path, dtype=dtype, device=device)
    seconds = time.perf_counter() - start
    after_load, status_load = peak_mib(), proc_status()
    with torch.no_grad():
        total = sum(float(p.float().sum()) for p in model.parameters())  # page every weight in
    result = dict(variant=model.config.variant, params=sum(p.numel() for p in model.parameters()),
                  load_dtype=str(dtype), device=str(device), load_seconds=round(seconds, 2),
                  baseline_peak_mib=round(base), peak_after_load_mib=round(after_load),
                  rss_after_load=status_load, peak_after_touch_mib=round(peak_mib()),
                  rss_after_touch=proc_status(), checksum_finite=bool(total == total))
    print(json.dumps(result))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="sana-1.6b")
    ap.add_argument("--file-dtype", default="bfloat16", choices=DTYPES)
    ap.add_argument("--load-dtype", default="bfloat16", choices=DTYPES)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--_write", help=argparse.SUPPRESS)
    ap.add_argument("--_load", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._write:
        return write(args._write, args.variant, DTYPES[args.file_dtype])
    if args._load:
        return load(args._load, DTYPES[args.load_dtype], torch.device(args.device))

    with tempfile.TemporaryDirectory(dir=os.environ.get("SANA_BENCH_TMP")) as d:
        path = str(Path(d) / f"{args.variant}_random.safetensors")
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--variant", args.variant, "--file-dtype", args.file_dtype,
                        "--_write", path], check=True)
        size = os.path.getsize(path) / 2**20
        print(f"wrote {path}: {size:.0f} MiB in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        out = subprocess.run([sys.executable, __file__, "--load-dtype", args.load_dtype, "--device", args.device,
                              "--_load", path], check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["file_mib"] = round(size)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
