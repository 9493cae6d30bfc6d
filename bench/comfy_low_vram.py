"""Low VRAM through ComfyUI's memory manager (issue 20): SanaSampler + SANA VAE Decode on the SANA MODEL inside
ComfyUI's own modules, with ComfyUI's reserved VRAM (--reserve-vram; comfy.model_management.EXTRA_RESERVED_VRAM)
chosen to leave 7 GiB, against the same with nothing reserved, in one process. ComfyUI plans with the device's
free memory, which a per-process cap would not change: the reserve is what makes it load the DiT partially.
Random full-size weights and captions (no Gemma: ComfyUI loads the text encoder whole, ahead of sampling),
20 steps, CFG 4.5, one image; time: the second run (wall clock, ComfyUI's loads included).

    COMFYUI_DIR=.carry/comfyui python3 bench/comfy_low_vram.py --out $OUT   # GPU: 1.6B 4096 px; 4.8B 1024 px bf16/fp8/Q8_0
    COMFYUI_DIR=../shared/comfyui python3 bench/comfy_low_vram.py --tiny    # CPU dry run: tiny model, 64 px
"""
import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_sampling import ROOT, load_comfyui  # noqa: E402

GiB = 2**30
LEAVE = 7 * GiB


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model at 64 px on the CPU (checks the script)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cpu = args.tiny or not torch.cuda.is_available()
    pack = load_comfyui(Path(os.environ.get("COMFYUI_DIR", ROOT / ".carry" / "comfyui")), cpu)
    import comfy.model_management as mm
    import comfy.ops
    from low_vram import quantized_copy
    from sana_core.autoencoder import DCAE, FULL_CONFIG
    from sana_core.transformer import CONFIGS, SanaConfig, SanaTransformer, random_state_dict
    from sana_nodes import host

    h, device = host.current(), mm.get_torch_device()
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    tiny = SanaConfig(depth=2, width=64, caption_dim=2304, self_heads=2, cross_heads=2, mlp_hidden=160)
    rows = [("tiny", tiny, 64, ("bf16", "Q8_0"))] if args.tiny else [
        ("1.6b-4096", CONFIGS["sana-1.6b-4k"], 4096, ("bf16",)),
        ("4.8b-1024", CONFIGS["sana-1.5-4.8b"], 1024, ("bf16", "fp8", "Q8_0"))]
    dtype = torch.float32 if cpu else torch.bfloat16
    with torch.device("meta"):
        ae = DCAE(FULL_CONFIG, dtype=dtype)
    ae.load_state_dict({k: torch.randn(v.shape, dtype=dtype) * 0.02 for k, v in ae.state_dict().items()}, assign=True)
    vae = h.wrap(h.manage("autoencoder", ae.eval().requires_grad_(False), ROOT / "random_vae", device, device))
    sampler, decoder = pack.NODE_CLASS_MAPPINGS["SanaSampler"](), pack.NODE_CLASS_MAPPINGS["SanaVAEDecode"]()
    results, default_reserve = [], mm.EXTRA_RESERVED_VRAM
    for name, config, side, formats in rows:
        with torch.device("meta"):
            dit = SanaTransformer(config, dtype=dtype, operations=comfy.ops.disable_weight_init)
        dit.load_state_dict(random_state_dict(config, seed=0, dtype=dtype), assign=True)
        g = torch.Generator().manual_seed(1)
        mask = torch.zeros(1, 300, dtype=torch.long)
        mask[:, :40] = 1
        positive = [[torch.randn(1, 300, config.caption_dim, generator=g) * mask[..., None], {"attention_mask": mask}]]
        negative = [[torch.zeros(1, 300, config.caption_dim), {"attention_mask": torch.ones(1, 300, dtype=torch.long)}]]
        latent = {"samples": torch.zeros(1, 32, side // 32, side // 32)}
        for fmt in formats:
            model = dit if fmt == "bf16" else quantized_copy(dit, fmt, comfy.ops.disable_weight_init)
            wrapped = h.wrap(h.manage("transformer", model.eval().requires_grad_(False), ROOT / f"random_{fmt}",
                                      device, mm.unet_offload_device()))
            for label, reserve in (("uncapped", default_reserve), (f"{LEAVE // GiB} GiB left", max(total - LEAVE, 0))):
                mm.unload_all_models()
                mm.soft_empty_cache()
                mm.EXTRA_RESERVED_VRAM = reserve  # what --reserve-vram sets
                secs, stats = [], {}
                for _ in range(2):
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                        torch.cuda.synchronize(device)
                    start = time.perf_counter()
                    out = sampler.sample(wrapped, positive, latent, 0, 20, 4.5, 0.0, 0.0, "flow_dpm_solver", 1.0,
                                         negative=negative)
                    decoder.decode(vae=vae, samples=out["result"][0])
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    secs.append(time.perf_counter() - start)
                    stats = out["ui"]["sana_stats"][0]
                row = dict(row=name, weights=fmt, vram=label, s=round(secs[-1], 3), first_s=round(secs[0], 3),
                           peak_allocated_gib=round(torch.cuda.max_memory_allocated(device) / GiB, 2)
                           if device.type == "cuda" else None,
                           lowvram=bool(getattr(wrapped.model, "model_lowvram", False)),
                           sampler_s_per_step=round(stats["seconds_per_step"], 4))
                results.append(row)
                print(row, flush=True)
            del wrapped, model
            mm.unload_all_models()
            gc.collect()
    mm.EXTRA_RESERVED_VRAM = default_reserve
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench-i20b-comfy-low-vram.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
