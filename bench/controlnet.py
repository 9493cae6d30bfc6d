"""What a ControlNet costs per sampling step: the 1.6B at 1024 px, one CFG step (batch 2: uncond + cond, the
caption side precomputed, as sampling replays it), without and with a 7-block ControlNet (official graph and
diffusers graph), each replayed from a CUDA graph; diffusers' SanaTransformer2DModel and SanaControlNetModel
(eager, same weights) beside it. Issue 19's goal: with the ControlNet at most 1.45x the step without.
Random weights, bf16; prints one table (a script, not a test).

    python3 bench/controlnet.py              # GPU
    python3 bench/controlnet.py --tiny       # CPU dry run with a tiny model: checks that the script runs
"""
import argparse
import dataclasses
import os
import re
import statistics
import sys
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny model, eager: a dry run")
    ap.add_argument("--px", type=int, default=1024)
    ap.add_argument("--blocks", type=int, default=7, help="copied blocks of the ControlNet")
    args = ap.parse_args()
    torch.set_grad_enabled(False)  # as sampling runs: graphs are captured only without autograd
    if args.tiny:
        os.environ["BENCH_DEVICE"] = "cpu"  # read when bench is imported
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench as B
    from diffusers import SanaControlNetModel
    from sana_core.controlnet import ControlNet, Controls
    T, rt = B.T, B.rt
    runtime = rt.Runtime(cuda_graphs=True)

    if args.tiny:
        cfg = T.SanaConfig(depth=4, width=64, caption_dim=48, self_heads=2, cross_heads=2, mlp_hidden=160)
        dit = B.randomize_(T.SanaTransformer(cfg, dtype=torch.float32, device=B.DEV), 0)
        px, blocks = 96, 2
    else:
        dit, px, blocks = B.our_dit("sana-1.6b"), args.px, args.blocks
    cfg = dit.config
    x, t, ctx, mask = B.dit_inputs(cfg, px)
    x, ctx = x.to(dit.dtype), ctx.to(dit.dtype)
    hint = torch.randn(x.shape, generator=torch.Generator(device=B.DEV).manual_seed(1), device=B.DEV).to(dit.dtype)
    caption = dit.encode_caption(ctx, mask)
    ref = B.diffusers_dit(dit)

    def timed(fn):
        if B.DEV.type == "cuda":
            return B.time_ms(fn)
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
        return statistics.median(times)

    def graphed(fn, constants, key):
        step = runtime.graphed(fn, constants, module=dit, key=key, tokens=0)
        step(x, t)  # warm-up: the next call captures
        return step

    r = dict(px=px, batch=2, blocks=blocks, dtype=str(dit.dtype), device=str(B.DEV))
    plain = graphed(lambda x, t, c: dit(x, t, c), (caption,), "bench-controlnet-plain")
    r["plain_ms"] = timed(lambda: plain(x, t))
    r["plain_mode"] = "cuda graph" if plain.captured is not None else f"eager ({plain.reason})"
    r["plain_diffusers_ms"] = timed(lambda: ref(x, ctx, t, encoder_attention_mask=mask, return_dict=False)[0])
    for graph in ("official", "diffusers"):
        net = B.randomize_(ControlNet(dataclasses.replace(cfg, depth=blocks), graph, dtype=dit.dtype, device=B.DEV),
                           2)
        control = Controls([net.prepare(hint, dit, caption, ctx, 1.0)])
        step = graphed(lambda x, t, c, k: dit(x, t, c, control=k), (caption, control),
                       ("bench-controlnet", graph, rt.fingerprint(net)))
        eager = dit(x, t, caption, control=control)
        r[f"{graph}_graph_equals_eager"] = bool(torch.equal(step(x, t), eager))
        r[f"{graph}_mode"] = "cuda graph" if step.captured is not None else f"eager ({step.reason})"
        r[f"{graph}_ms"] = timed(lambda: step(x, t))
        r[f"{graph}_vs_plain"] = r[f"{graph}_ms"] / r["plain_ms"]
        r[f"{graph}_weights_gib"] = sum(p.numel() * p.element_size() for p in net.parameters()) / B.GiB
        if graph == "diffusers":  # the same weights in diffusers' SanaControlNetModel: equal, then timed
            with torch.device(B.DEV), B.default_dtype(dit.dtype):
                ref_cn = SanaControlNetModel(
                    in_channels=32, out_channels=32, num_attention_heads=cfg.self_heads,
                    attention_head_dim=cfg.width // cfg.self_heads, num_layers=blocks,
                    num_cross_attention_heads=cfg.cross_heads, cross_attention_head_dim=cfg.width // cfg.cross_heads,
                    cross_attention_dim=cfg.width, caption_channels=cfg.caption_dim,
                    mlp_ratio=cfg.mlp_hidden / cfg.width, sample_size=32)
            sd = {re.sub(r"^after_proj\.", "controlnet_blocks.", re.sub(r"^before_proj\.", "input_block.", k)): v
                  for k, v in B.dit_to_diffusers(net.state_dict()).items()}
            ref_cn.load_state_dict(sd)
            ref_cn.eval().requires_grad_(False)

            def theirs():
                samples = ref_cn(x, ctx, t, hint, encoder_attention_mask=mask, return_dict=False)[0]
                return ref(x, ctx, t, encoder_attention_mask=mask, controlnet_block_samples=tuple(samples),
                           return_dict=False)[0]
            r["diffusers_rel_err"] = B.rel_err(eager, theirs())
            r["diffusers_controlnet_ms"] = timed(theirs)
            r["diffusers_controlnet_vs_plain"] = r["diffusers_controlnet_ms"] / r["plain_diffusers_ms"]
            del ref_cn
        del step, control, net
        runtime.release()
    B.log(r)
    print(f"\n1.6B-class DiT step at {px} px, batch 2 (CFG), {blocks}-block ControlNet, {r['dtype']}, {r['device']}")
    print("| | ours ms | ours / plain | ours mode | diffusers ms | diffusers / plain |\n|---|---|---|---|---|---|")
    print(f"| no ControlNet | {r['plain_ms']:.2f} | 1.00 | {r['plain_mode'][:40]} | {r['plain_diffusers_ms']:.2f} | "
          f"1.00 |")
    for graph in ("official", "diffusers"):
        theirs = f"{r['diffusers_controlnet_ms']:.2f} | {r['diffusers_controlnet_vs_plain']:.2f}" \
            if graph == "diffusers" else "- | -"
        print(f"| + ControlNet, {graph} graph | {r[f'{graph}_ms']:.2f} | {r[f'{graph}_vs_plain']:.2f} | "
              f"{r[f'{graph}_mode'][:40]} | {theirs} |")
    print(f"graph == eager: official {r['official_graph_equals_eager']}, "
          f"diffusers {r['diffusers_graph_equals_eager']}; ours vs diffusers (diffusers graph) rel err "
          f"{r['diffusers_rel_err']:.2e}")


if __name__ == "__main__":
    main()
