"""Sampling through ComfyUI's own modules, side by side in one process: core KSampler (euler, simple
scheduler) on the SANA MODEL, SanaSampler (flow_euler) and the round-1 code path (sana_core.pipeline's
sample_latents on the bare DiT, what SanaSampler called before it took a MODEL); 20 model evaluations,
CFG 4.5, same random weights, same random captions (no Gemma: the text side is not timed).

    COMFYUI_DIR=.carry/comfyui python3 bench/comfy_sampling.py      # GPU: 1.6B, 1024 px, bf16
    COMFYUI_DIR=../shared/comfyui python3 bench/comfy_sampling.py --tiny   # CPU dry run: tiny model, 64 px

The goal (issue 16): KSampler at most 1.15x SanaSampler; SanaSampler no slower than round 1.
COMFYUI_DIR: a ComfyUI checkout (default .carry/comfyui: the GPU run copies ../shared/comfyui into the
ignored .carry/).
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS, CFG, SEED = 20, 4.5, 0


def load_comfyui(comfyui_dir: Path, cpu: bool):
    """ComfyUI's modules in this process (as tests/comfy/conftest.py does) and the pack as ComfyUI loads it."""
    sys.path.insert(0, str(comfyui_dir))
    import comfy.cli_args
    comfy.cli_args.args.cpu = cpu
    import comfy.model_management  # noqa: F401  (reads args.cpu)
    spec = importlib.util.spec_from_file_location("ComfyUI_SANA", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["ComfyUI_SANA"] = pack
    spec.loader.exec_module(pack)
    return pack


def random_model(tiny: bool):
    """(MODEL, its host.ManagedModel, config, image side, dtype): a random-weight SANA DiT (the 1.6B at 1024 px in
    bf16, or a tiny one at 64 px in float32) managed by the host on ComfyUI's torch device."""
    import comfy.model_management as mm
    from sana_core.transformer import CONFIGS, SanaConfig, SanaTransformer, random_state_dict
    from sana_nodes import host

    h = host.current()
    if tiny:
        config, side, dtype = SanaConfig(depth=2, width=64, caption_dim=64, self_heads=2, cross_heads=2,
                                         mlp_hidden=160), 64, torch.float32
    else:
        config, side, dtype = CONFIGS["sana-1.6b"], 1024, torch.bfloat16
    with torch.device("meta"):
        dit = SanaTransformer(config, dtype=dtype)
    dit.load_state_dict(random_state_dict(config, seed=0, dtype=dtype), assign=True)
    managed = h.manage("transformer", dit.eval().requires_grad_(False), ROOT / "random", mm.get_torch_device(),
                       mm.unet_offload_device())
    return h.wrap(managed), managed, config, side, dtype


def timed(fn, reps: int, device) -> float:
    """Median wall time (ms) of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def captions(caption_dim: int):
    """Random positive (40 tokens) and negative (2 tokens) CONDITIONINGs of 300 positions, as Gemma pads them."""
    g = torch.Generator().manual_seed(1)
    out = []
    for tokens in (40, 2):
        mask = torch.zeros(1, 300, dtype=torch.long)
        mask[:, :tokens] = 1
        out.append([[torch.randn(1, 300, caption_dim, generator=g) * mask[..., None], {"attention_mask": mask}]])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model at 64 px on the CPU (checks the script)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per row (default: 5 on the GPU, 1 tiny)")
    args = parser.parse_args()
    comfyui_dir = Path(os.environ.get("COMFYUI_DIR", ROOT / ".carry" / "comfyui"))
    cpu = args.tiny or not torch.cuda.is_available()
    pack = load_comfyui(comfyui_dir, cpu)
    import comfy.model_management as mm
    import nodes as core
    from sana_core.guidance import sample_latents
    from sana_nodes import host

    h = host.current()
    device = mm.get_torch_device()
    model, managed, config, side, dtype = random_model(args.tiny)

    positive, negative = captions(config.caption_dim)
    positive_mask, negative_mask = positive[0][1]["attention_mask"], negative[0][1]["attention_mask"]
    latent = {"samples": torch.zeros(1, 32, side // 32, side // 32)}
    sampler = pack.NODE_CLASS_MAPPINGS["SanaSampler"]()

    def ksampler():
        core.common_ksampler(model, SEED, STEPS, CFG, "euler", "simple", positive, negative, latent)

    def sana_sampler():
        sampler.sample(model, positive, latent, SEED, STEPS, CFG, 0.0, 0.0, "flow_euler", 1.0, negative=negative)

    def round_1():  # the bare DiT with the round-1 sampling call (no MODEL, no patches)
        dit_now = managed.ready()
        noise = torch.randn(latent["samples"].shape, generator=torch.manual_seed(SEED))
        sample_latents(dit_now, noise, positive[0][0], positive_mask, negative[0][0], negative_mask,
                       sampler="flow_euler", steps=STEPS, cfg=CFG, shift=3.0, seed=SEED, runtime=h.runtime)

    reps = args.reps or (1 if args.tiny else 5)
    rows = {name: timed(fn, reps, device) for name, fn in
            (("KSampler euler (core loop)", ksampler), ("SanaSampler flow_euler", sana_sampler),
             ("round-1 sample_latents", round_1))}
    base = rows["SanaSampler flow_euler"]
    print(f"\n{'tiny' if args.tiny else 'sana-1.6b'} {side}x{side}, {STEPS} evaluations, CFG {CFG}, {dtype}, "
          f"{device}, median of {reps}")
    print(f"| sampling | total ms | ms per step | vs SanaSampler |\n|---|---|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.1f} | {ms / STEPS:.2f} | {ms / base:.2f}x |")


if __name__ == "__main__":
    main()
