"""A SANA ControlNet through ComfyUI's own modules, side by side in one process: core KSampler (euler, simple)
on the SANA MODEL without and with the core Apply ControlNet (a 7-block official-graph ControlNet, strength 1,
the hint image encoded by the SANA VAE once per run), and SANA Sampler with the same controlled conditioning
(it hands it to ComfyUI's loop); 20 model evaluations, CFG 4.5, random weights and captions (no Gemma). The
"graphs" column says whether every model call of the last run replayed a CUDA graph. Issue 19's goal: a
controlled step at most 1.45x a plain one, with CUDA graphs still in use.

    COMFYUI_DIR=.carry/comfyui python3 bench/comfy_controlnet.py      # GPU: 1.6B, 1024 px, bf16
    COMFYUI_DIR=../shared/comfyui python3 bench/comfy_controlnet.py --tiny   # CPU dry run: tiny models, 64 px
"""
import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfy_sampling import CFG, ROOT, SEED, STEPS, captions, load_comfyui, timed  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models at 64 px on the CPU (checks the script)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per row (default: 5 on the GPU, 1 tiny)")
    parser.add_argument("--blocks", type=int, default=7, help="copied blocks of the ControlNet")
    args = parser.parse_args()
    comfyui_dir = Path(os.environ.get("COMFYUI_DIR", ROOT / ".carry" / "comfyui"))
    cpu = args.tiny or not torch.cuda.is_available()
    pack = load_comfyui(comfyui_dir, cpu)
    import comfy.model_management as mm
    import comfy.model_patcher
    import nodes as core
    from sana_core.autoencoder import DCAE, DCAEConfig
    from sana_core.controlnet import ControlNet
    from sana_core.transformer import CONFIGS, SanaConfig, SanaTransformer, random_state_dict
    from sana_nodes import host
    from sana_nodes.controlnet import control_class

    h = host.current()
    device, offload = mm.get_torch_device(), mm.unet_offload_device()
    if args.tiny:
        config, side, dtype, blocks = SanaConfig(depth=2, width=64, caption_dim=64, self_heads=2, cross_heads=2,
                                                 mlp_hidden=160), 64, torch.float32, 1
        widths = (8, 16, 32, 32, 64, 64)
        ae_config = DCAEConfig(decoder_widths=widths, encoder_widths=widths, head_dim=8)
    else:
        config, side, dtype, blocks, ae_config = CONFIGS["sana-1.6b"], 1024, torch.bfloat16, args.blocks, DCAEConfig()
    with torch.device("meta"):
        dit = SanaTransformer(config, dtype=dtype)
    dit.load_state_dict(random_state_dict(config, seed=0, dtype=dtype), assign=True)
    model = h.wrap(h.manage("transformer", dit.eval().requires_grad_(False), ROOT / "random", device, offload))
    cn_config = dataclasses.replace(config, depth=blocks)
    with torch.device("meta"):
        net = ControlNet(cn_config, "official", dtype=dtype)
    copied = random_state_dict(cn_config, seed=1, dtype=dtype)  # blocks, x_embedder as a DiT's; projections random
    net.load_state_dict({k: copied[k] if k in copied else torch.randn(v.shape, dtype=dtype) / v.shape[-1] ** 0.5
                         for k, v in net.state_dict().items()}, assign=True)
    control_net = control_class()(net.eval().requires_grad_(False), "random",
                                  comfy.model_patcher.ModelPatcher(net, load_device=device, offload_device=offload))
    vae = h.wrap(h.manage("autoencoder", DCAE(ae_config).to(dtype).eval().requires_grad_(False), ROOT / "random",
                          mm.vae_device(), mm.vae_offload_device()))

    positive, negative = captions(config.caption_dim)
    edges = (torch.rand(1, side, side, 3, generator=torch.Generator().manual_seed(2)) > 0.9).float()  # an edge map
    controlled = core.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control_net, edges, 1.0, 0.0,
                                                                  1.0, vae=vae)
    latent = {"samples": torch.zeros(1, 32, side // 32, side // 32)}
    sampler = pack.NODE_CLASS_MAPPINGS["SanaSampler"]()
    diffusion_model = model.model.diffusion_model

    def ksampler(conds):
        return lambda: core.common_ksampler(model, SEED, STEPS, CFG, "euler", "simple", *conds, latent)

    def sana_sampler():
        sampler.sample(model, controlled[0], latent, SEED, STEPS, CFG, 0.0, 0.0, "flow_euler", 1.0,
                       negative=controlled[1])

    reps = args.reps or (1 if args.tiny else 5)
    rows = {}
    for name, fn in (("KSampler euler", ksampler((positive, negative))),
                     ("KSampler euler + Apply ControlNet", ksampler(controlled)),
                     ("SanaSampler flow_euler + Apply ControlNet (core loop)", sana_sampler)):
        ms = timed(fn, reps, device)
        steps = list(diffusion_model._steps.values())  # the last run's model calls
        rows[name] = ms, "yes" if steps and all(s.captured is not None for s in steps) else \
            f"no ({next((s.reason for s in steps if s.reason), 'not captured')})"
    base = rows["KSampler euler"][0]
    print(f"\n{'tiny' if args.tiny else 'sana-1.6b'} {side}x{side}, {STEPS} evaluations, CFG {CFG}, {blocks}-block "
          f"ControlNet (official graph), {dtype}, {device}, median of {reps}")
    print("| sampling | total ms | ms per step | vs KSampler without | graphs |\n|---|---|---|---|---|")
    for name, (ms, graphs) in rows.items():
        print(f"| {name} | {ms:.1f} | {ms / STEPS:.2f} | {ms / base:.2f}x | {graphs} |")


if __name__ == "__main__":
    main()
