"""What ComfyUI's `operations` cost our DiT: one forward (caption side precomputed, as sampling replays it) of
the same random weights built with torch.nn, with comfy.ops.disable_weight_init (our fast paths read the
weights: expected equal in speed and bits), with comfy.ops.manual_cast (every layer casts its weights at
each call: the Mix-FFN falls back to calling its layers), and after a real ModelPatcher's low-VRAM partial
load of half the model with a weight patch (the rest cast from the CPU at each call). Eager, and replayed
from a CUDA graph where the Runtime captures one. Prints one table; writes nothing.

    COMFYUI_DIR=../shared/comfyui python3 bench/operations.py                # GPU: 1.6B at 1024 px, bf16
    COMFYUI_DIR=../shared/comfyui python3 bench/operations.py --tiny        # CPU check: tiny model, fp32
"""
import argparse
import os
import statistics
import sys
import time

import torch

from checkout import import_sana

sys.path.insert(0, os.environ.get("COMFYUI_DIR", "../shared/comfyui"))
comfy_args = __import__("comfy.cli_args", fromlist=["args"]).args
comfy_args.cpu = not torch.cuda.is_available()
import comfy.model_patcher  # noqa: E402
import comfy.ops  # noqa: E402

import_sana()
from sana_core.runtime import Runtime  # noqa: E402
from sana_core.transformer import CONFIGS, SanaConfig, SanaTransformer, random_state_dict  # noqa: E402

PATCHED = "blocks.0.mlp.inverted_conv.conv.weight"


class Holder(torch.nn.Module):  # what a ModelPatcher manages (as comfy.model_base.BaseModel)
    def __init__(self, dit):
        super().__init__()
        self.diffusion_model = dit


def ms(fn, reps):
    times = []
    for _ in range(reps + 2):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times[2:])  # two warm-ups (the second captures a graph)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU, float32 (a check of this script)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    cfg = SanaConfig(depth=2, width=64, caption_dim=48, self_heads=2, cross_heads=2, mlp_hidden=160) if args.tiny \
        else CONFIGS["sana-1.6b"]
    side, reps = (4, 3) if args.tiny else (32, 20)
    state = {k: v.to(dtype) for k, v in random_state_dict(cfg, seed=0).items()}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, side, side, generator=g).to(device, dtype)
    t = torch.tensor([700.0, 700.0], device=device)
    context = torch.randn(2, 300, cfg.caption_dim, generator=g).to(device, dtype)
    diff = 0.01 * torch.randn(state[PATCHED].shape, generator=g).to(dtype)

    def build(operations, weights=state, to=device):
        dit = SanaTransformer(cfg, operations=operations, dtype=dtype)
        dit.load_state_dict(weights)
        return dit.eval().requires_grad_(False).to(to)

    def run(dit, graphs):
        with torch.no_grad():
            caption = dit.encode_caption(context, device=device)
            step = Runtime(cuda_graphs=graphs).graphed(lambda x, t, c: dit(x, t, c), (caption,), module=dit,
                                                       key="ops", tokens=x.shape[0] * side * side)
            out = step(x, t)
            return out, ms(lambda: step(x, t), reps), step.reason

    plain = build(None)
    reference = run(plain, False)[0].float()
    patched = build(None, {k: v + diff if k == PATCHED else v for k, v in state.items()})
    patched_reference = run(patched, False)[0].float()
    print(f"the patch changes the output by {((patched_reference - reference).norm() / reference.norm()).item():.1e}")
    del plain, patched
    low_vram = build(comfy.ops.disable_weight_init, to="cpu")
    patcher = comfy.model_patcher.ModelPatcher(Holder(low_vram), load_device=device,
                                               offload_device=torch.device("cpu"))
    patcher.add_patches({f"diffusion_model.{PATCHED}": (diff,)})
    patcher.patch_model(device_to=device, lowvram_model_memory=comfy.model_management.module_size(low_vram) // 2)
    rows = [("torch.nn", build(None), reference), ("disable_weight_init", build(comfy.ops.disable_weight_init),
            reference), ("manual_cast", build(comfy.ops.manual_cast), reference),
            ("low-VRAM half + patch", low_vram, patched_reference)]
    print(f"{cfg.variant}, {side * 32} px, batch 2, {dtype}, {device}")
    print("| built with | eager ms | graph ms | rel err | graph |")
    print("| --- | --- | --- | --- | --- |")
    for name, dit, ref in rows:
        out, eager, _ = run(dit, False)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        _, graphed, reason = run(dit, True)
        print(f"| {name} | {eager:.2f} | {graphed:.2f} | {err:.1e} | {reason or 'replayed'} |", flush=True)


if __name__ == "__main__":
    main()
