"""The SANA LoRA Loader's cost inside ComfyUI (issue 18), one process: the sampling step of SanaSampler
(flow_euler) and core KSampler (euler) on the SANA MODEL with and without a rank-32 LoRA applied as weight
patches (medians of repeated calls of the same MODEL: the patches are applied at its first load), and the wall
time of ComfyUI switching the DiT from the plain MODEL to the LoRA'd one (unpatch + patch) and back. Random
weights and captions (no Gemma), 20 model evaluations, CFG 4.5; prints one table, writes nothing but a
temporary LoRA file.

    COMFYUI_DIR=.carry/comfyui python3 bench/lora_comfy.py                  # GPU: 1.6B, 1024 px, bf16
    COMFYUI_DIR=../shared/comfyui python3 bench/lora_comfy.py --tiny         # CPU dry run: tiny model, 64 px

Goals: with / without within 2% (both samplers); switching to the LoRA'd MODEL under 1 s.
"""
import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from comfy_sampling import CFG, ROOT, SEED, STEPS, load_comfyui, random_model, timed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model at 64 px on the CPU (checks the script)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--reps", type=int, default=None, help="timed calls per row (default: 5 on the GPU, 1 tiny)")
    args = parser.parse_args()
    cpu = args.tiny or not torch.cuda.is_available()
    pack = load_comfyui(Path(os.environ.get("COMFYUI_DIR", ROOT / ".carry" / "comfyui")), cpu)
    import comfy.model_management as mm
    import nodes as core
    from sana_core.demo import write_demo_lora
    from sana_core.lora import read_lora_file
    from sana_nodes import host

    h, device = host.current(), mm.get_torch_device()
    model, _, config, side, dtype = random_model(args.tiny)
    with tempfile.TemporaryDirectory() as tmp:  # train_dreambooth_lora_sana.py's targets: q/k/v of both attentions
        path = write_demo_lora(Path(tmp) / "lora.safetensors", depth=config.depth, width=config.width,
                               rank=args.rank)
        tensors, metadata = read_lora_file(path)
        tensors = {k: v.clone() for k, v in tensors.items()}  # off the memory map before the file goes
    with_lora = h.lora_patch(model, "lora.safetensors", tensors, metadata, 0.8)

    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(1, 300, dtype=torch.long)
    mask[:, :40] = 1
    positive = [[torch.randn(1, 300, config.caption_dim, generator=g) * mask[..., None], {"attention_mask": mask}]]
    negative = [[torch.zeros(1, 300, config.caption_dim), {"attention_mask": mask}]]
    latent = {"samples": torch.zeros(1, 32, side // 32, side // 32)}
    sampler = pack.NODE_CLASS_MAPPINGS["SanaSampler"]()

    def sana_sampler(m):
        return lambda: sampler.sample(m, positive, latent, SEED, STEPS, CFG, 0.0, 0.0, "flow_euler", 1.0,
                                      negative=negative)

    def ksampler(m):
        return lambda: core.common_ksampler(m, SEED, STEPS, CFG, "euler", "simple", positive, negative, latent)

    def switch(to, back):
        """Seconds for ComfyUI to load `to` after `back` (the weights unpatched and patched)."""
        times = []
        for _ in range(3):
            mm.load_models_gpu([back])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            mm.load_models_gpu([to])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    reps = args.reps or (1 if args.tiny else 5)
    rows = {}
    for name, run in (("SanaSampler flow_euler", sana_sampler), ("KSampler euler", ksampler)):
        without, lora = timed(run(model), reps, device), timed(run(with_lora), reps, device)
        rows[name] = (without / STEPS, lora / STEPS, lora / without)
    print(f"\n{'tiny' if args.tiny else 'sana-1.6b'} {side}x{side}, {STEPS} evaluations, CFG {CFG}, {dtype}, {device}, "
          f"rank-{args.rank} LoRA on {len(tensors) // 2} modules, median of {reps}")
    print("| sampling | ms per step without | with LoRA | with / without |\n|---|---|---|---|")
    for name, (without, lora, ratio) in rows.items():
        print(f"| {name} | {without:.2f} | {lora:.2f} | {ratio:.3f}x |")
    print(f"switch to the LoRA'd MODEL (unpatch + patch): {switch(with_lora, model):.3f} s; "
          f"back to the plain MODEL: {switch(model, with_lora):.3f} s")


if __name__ == "__main__":
    main()
