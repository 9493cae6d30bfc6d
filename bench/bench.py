"""Side-by-side GPU benchmark: our SANA stack against diffusers on the same GPU, the same random weights,
in the same process (a script, not a test).

    python3 bench/bench.py --rows smoke,dit-1.6b-1024 --out DIR   # run rows, write DIR/bench-<first row>.json
    python3 bench/bench.py --merge bench/results                   # print the table of every saved JSON
    python3 bench/bench.py --list                                  # the row names

Every row builds full-size models with random weights on the GPU (our DiT from its own parameter list,
diffusers' SanaTransformer2DModel / AutoencoderDC loaded with the same tensors renamed; one Gemma-2-2B
module shared by both), checks that both compute the same function (bf16 relative error), then times
both (median of CUDA-event-timed calls after warm-up) and records peak GPU memory (max allocated,
counting only that side's resident weights). diffusers' torch.compile runs (default mode, and
reduce-overhead where launch overhead matters) are timed in the same row, compile time reported apart.
Rows named mem-* run in a child process capped at 16 GiB (set_per_process_memory_fraction) with only
our models, and report per-phase peaks (encode / sample / decode). diffusers is needed only here.
"""
import argparse
import contextlib
import copy
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

GiB = 2**30
BF16 = torch.bfloat16
PROMPT = ("a cyberpunk cat with a neon sign that says sana, rain on the street, reflections, highly detailed, "
          "cinematic lighting, wide angle, 35 mm photo, sharp focus, intricate textures, volumetric fog")  # lowercase:
# diffusers lowercases prompts, ours does not


from checkout import import_sana  # noqa: E402

import_sana()
from sana_core import pipeline as P, runtime as rt, text_encoder as TE, transformer as T  # noqa: E402
from sana_core import autoencoder as AE  # noqa: E402
from sana_core.guidance import sample_latents  # noqa: E402
from sana_core.presets import defaults_for  # noqa: E402

DEV = torch.device(os.environ.get("BENCH_DEVICE", "cuda"))  # "cpu": dry runs of the model builders
RUNTIME = rt.Runtime()  # the graphs and memory decisions of every row's "ours" (SANA_CUDA_GRAPHS switches graphs)
LOG = []


def log(*a):
    msg = " ".join(str(x) for x in a)
    print(msg, flush=True)
    LOG.append(msg)


# ----------------------------------------------------------------------------- timing and memory

def sync():
    torch.cuda.synchronize()


def time_ms(fn, *, budget_s=2.0, warmup=2, reps=None, min_reps=3, max_reps=30):
    """Median milliseconds of fn() over CUDA-event-timed calls (each from an idle GPU), after warm-up."""
    for _ in range(warmup):
        fn()
    sync()
    if reps is None:
        t0 = time.perf_counter()
        fn()
        sync()
        one = time.perf_counter() - t0
        reps = int(min(max_reps, max(min_reps, budget_s / max(one, 1e-6))))
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall_s(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def module_bytes(*modules):
    return sum(t.numel() * t.element_size() for m in modules if m is not None
               for t in list(m.parameters()) + list(m.buffers()) if t.is_cuda)


def peak_gib(fn, foreign=0):
    """Peak allocated GiB while fn() runs, minus `foreign` bytes (the other side's resident weights)."""
    sync()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - foreign) / GiB


def extra_gib(fn):
    """Peak allocated GiB beyond what was allocated before fn() (activations and outputs)."""
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / GiB


def pool_gib():
    """Device memory held by the cached CUDA graphs' pool (reserved, not in max_memory_allocated once captured)."""
    return RUNTIME.held_bytes("cuda") / GiB


def graphs_held():
    """What the CUDA-graph cache holds (the first word of each key: velocity, gemma, decode), and why capturing
    stopped for the process if it did: shows that a row's ours really ran from graphs."""
    return dict(graphs=sorted(str(k[1][0]) for k in RUNTIME.cache.entries), graphs_broken=RUNTIME.broken)


def phase_ms(call, te):
    """Wall milliseconds per phase of one pipeline call(): prompt encoding, sampling, decoding and the rest
    (noise, checks, the PIL images), the GPU synchronised at each phase's ends."""
    times = {}

    def timed(name, fn):
        def run(*a, **k):
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync()
            times[name] = times.get(name, 0.0) + 1000 * (time.perf_counter() - t0)
            return out
        return run
    sample, decode = P.sample_latents, RUNTIME.decode
    P.sample_latents, te.encode, RUNTIME.decode = timed("sample", sample), timed("encode", te.encode), \
        timed("decode", decode)
    try:
        total, _ = wall_s(call)
    finally:
        P.sample_latents, RUNTIME.decode = sample, decode
        del te.encode
    times["other"] = 1000 * total - sum(times.values())
    return times


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def free_all():
    gc.collect()
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- models (random weights)

def randomize_(module, seed):
    """Random weights with O(1) activations (the recipe of transformer.random_state_dict), drawn on the GPU."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith("norm.weight") or (name.endswith(".weight") and p.ndim == 1 and "norm" in name):
            v = 1 + 0.1 * torch.randn(p.shape, generator=g, device=DEV)
        elif name.endswith("scale_shift_table"):
            v = torch.randn(p.shape, generator=g, device=DEV) / p.shape[-1] ** 0.5
        elif p.ndim == 1:
            v = 0.1 * torch.randn(p.shape, generator=g, device=DEV)
        else:
            v = torch.randn(p.shape, generator=g, device=DEV) / math.prod(p.shape[1:]) ** 0.5
        p.data.copy_(v)
    return module.eval().requires_grad_(False)


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def our_dit(variant, seed=0):
    return randomize_(T.SanaTransformer(T.CONFIGS[variant], dtype=BF16, device=DEV), seed)


def dit_to_diffusers(sd, sprint=False):
    """Original names -> diffusers SanaTransformer2DModel names: the inverse of transformer.py's maps."""
    names, block_names = {}, {}
    for theirs, ours in T.DIFFUSERS_NAMES.items():
        if sprint == theirs.startswith("time_embed.timestep_embedder."):  # Sprint's embedder sits one level up
            names[ours] = theirs
        names.setdefault(ours, theirs)
    for theirs, ours in T.DIFFUSERS_BLOCK_NAMES.items():
        block_names.setdefault(ours, theirs)
    out = {}
    for name, t in sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if m is None:
            out[T._rename(name, names)] = t
            continue
        i, rest = m[1], m[2]
        for fused, parts in T.DIFFUSERS_FUSED.items():
            if rest.startswith(fused):
                for part, chunk in zip(parts, t.chunk(len(parts))):
                    out[f"transformer_blocks.{i}.{part}{rest[len(fused):]}"] = chunk
                break
        else:
            out[f"transformer_blocks.{i}.{T._rename(rest, block_names)}"] = t
    return out


def diffusers_dit(ours):
    from diffusers import SanaTransformer2DModel
    cfg = ours.config
    with torch.device(DEV), default_dtype(ours.dtype):
        ref = SanaTransformer2DModel(
            in_channels=32, out_channels=32, num_layers=cfg.depth, num_attention_heads=cfg.self_heads,
            attention_head_dim=cfg.width // cfg.self_heads, num_cross_attention_heads=cfg.cross_heads,
            cross_attention_head_dim=cfg.width // cfg.cross_heads, cross_attention_dim=cfg.width,
            caption_channels=cfg.caption_dim, mlp_ratio=cfg.mlp_hidden / cfg.width, sample_size=cfg.base_size or 32,
            interpolation_scale=cfg.pe_interpolation, guidance_embeds=cfg.sprint,
            qk_norm="rms_norm_across_heads" if cfg.qk_norm else None)
    ref.load_state_dict(dit_to_diffusers(ours.state_dict(), cfg.sprint))
    return ref.eval().requires_grad_(False)


def our_dcae(seed=1, config=AE.FULL_CONFIG):
    return randomize_(AE.DCAE(config, dtype=BF16, device=DEV), seed)


def diffusers_dcae(ours):
    from diffusers import AutoencoderDC
    kinds = ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3
    widths, scales = [128, 256, 512, 512, 1024, 1024], [[], [], [], [5], [5], [5]]
    decoder = dict(decoder_block_types=kinds, decoder_layers_per_block=[3] * 6, decoder_qkv_multiscales=scales,
                   upsample_block_type="interpolate")
    if ours.config == AE.LITE_CONFIG:  # DC-AE-Lite: the same encoder, a ResBlock decoder
        decoder = dict(decoder_block_types="ResBlock", decoder_layers_per_block=[0, 3, 5, 4, 4, 4],
                       decoder_qkv_multiscales=[[]] * 6, upsample_block_type="pixel_shuffle", decoder_conv_act_fn="silu")
    with torch.device(DEV), default_dtype(ours.dtype):
        ref = AutoencoderDC(in_channels=3, latent_channels=32, attention_head_dim=32, encoder_block_types=kinds,
                            encoder_block_out_channels=widths, decoder_block_out_channels=widths,
                            encoder_layers_per_block=[2, 2, 2, 3, 3, 3], encoder_qkv_multiscales=scales,
                            downsample_block_type="conv", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                            scaling_factor=0.41407, **decoder)
    ref.load_state_dict(AE.to_diffusers_names(ours.state_dict()))
    return ref.eval().requires_grad_(False)


GEMMA_2B = dict(model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0, rms_norm_eps=1e-6, rope_theta=10000.0,
                hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192)


def our_text_encoder():
    """Full-size random Gemma-2-2B (bf16, on the GPU) with a small SentencePiece tokenizer (the demo's)."""
    from safetensors.torch import load_file
    from transformers import Gemma2Config, Gemma2Model
    from sana_core.demo import write_demo_text_encoder
    with tempfile.TemporaryDirectory() as tmp:
        path = write_demo_text_encoder(Path(tmp) / "tiny.safetensors")
        tokenizer = TE._load_tokenizer(path, load_file(str(path))["spiece_model"])
    config = Gemma2Config.from_dict(GEMMA_2B)
    config._attn_implementation = "eager"  # as load_text_encoder: soft-capped attention
    with torch.device(DEV), default_dtype(BF16):
        model = Gemma2Model(config)
    return TE.TextEncoder(model.eval().requires_grad_(False), tokenizer).to(DEV)  # embedding table -> CPU


class DiffusersGemma(torch.nn.Module):
    """What diffusers runs: our Gemma's layers (the same weights) with the embedding table on the GPU, as
    transformers places it; the layers are held outside the module tree so that the pipeline's device
    is the GPU."""

    def __init__(self, te):
        super().__init__()
        self.table = copy.deepcopy(te.model.embed_tokens).to(DEV)
        object.__setattr__(self, "gemma", te.model)

    @property
    def dtype(self):
        return self.gemma.norm.weight.dtype

    @property
    def device(self):  # what SanaPipeline._execution_device reads
        return self.gemma.norm.weight.device

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.gemma(inputs_embeds=self.table(input_ids), attention_mask=attention_mask, **kwargs)


def diffusers_pipeline(te, ref_dit, ref_vae, shift):
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
    pipe = SanaPipeline(tokenizer=te.tokenizer, text_encoder=DiffusersGemma(te), vae=ref_vae, transformer=ref_dit,
                        scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CHI = list(TE.INSTRUCTIONS[TE.DEFAULT_INSTRUCTION])

# ----------------------------------------------------------------------------- FLOP counts

def dit_flops(cfg, batch, tokens, text=300):
    """Matmul FLOPs of one DiT forward (2 per multiply-add); elementwise work left out."""
    C, H, M = cfg.width, cfg.mlp_hidden, batch * tokens
    per_block = 2 * M * C * (3 * C + C + C + C + 2 * H + H)      # qkv, proj, cross q, cross proj, inverted, point
    per_block += 2 * batch * text * C * 2 * C                    # cross k/v of the caption
    per_block += 4 * M * text * C + 4 * M * C * T.SELF_HEAD_DIM  # cross QK^T and PV; linear attention KV and Q.KV
    caption = 2 * batch * text * (cfg.caption_dim * C + C * C)
    return cfg.depth * per_block + caption + 2 * M * C * 32 * 2


def dcae_flops(px):
    return 8.4e12 * (px / 1024) ** 2  # SANA-REFERENCE.md section 5: 8.4 TFLOP at 1024 px, 33.5 at 2048


# ----------------------------------------------------------------------------- rows

def compiled_ms(module, call, mode, reps_budget=2.0):
    """(ms, compile seconds) of torch.compile(module, mode=mode) on `call(compiled)`."""
    torch._dynamo.reset()
    compiled = torch.compile(module, mode=mode)
    ro = mode == "reduce-overhead"

    def run():
        if ro:
            torch.compiler.cudagraph_mark_step_begin()
        return call(compiled)
    t0 = time.perf_counter()
    for _ in range(3):
        run()
    sync()
    compile_s = time.perf_counter() - t0
    ms = time_ms(run, budget_s=reps_budget, warmup=1)
    del compiled
    torch._dynamo.reset()
    free_all()
    return ms, compile_s


def dit_inputs(cfg, px, batch=2, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    side = px // 32
    x = torch.randn(batch, 32, side, side, generator=g, device=DEV).to(BF16)
    t = torch.full((batch,), 500.0, device=DEV)
    ctx = torch.randn(batch, 300, cfg.caption_dim, generator=g, device=DEV).to(BF16)
    mask = torch.zeros(batch, 300, dtype=torch.long, device=DEV)
    mask[0, :5] = 1  # the negative prompt: a few tokens
    mask[1:, :150] = 1
    return x, t, ctx, mask


def row_dit(variant, px, compile_modes):
    ours = our_dit(variant)
    ref = diffusers_dit(ours)
    cfg = ours.config
    x, t, ctx, mask = dit_inputs(cfg, px)
    r = dict(kind="dit", variant=variant, px=px, batch=2, tflop=dit_flops(cfg, 2, (px // 32) ** 2) / 1e12)
    theirs_call = lambda m: m(x, encoder_hidden_states=ctx, timestep=t, encoder_attention_mask=mask,  # noqa: E731
                              return_dict=False)[0]
    eager = lambda: ours(x, t, ctx, mask)  # noqa: E731
    r["rel_err_vs_diffusers"] = rel_err(eager(), theirs_call(ref))
    graphs = rt.Runtime(cuda_graphs=True)
    step = graphs.graphed(lambda x, t, c, m: ours(x, t, c, m), (ctx, mask), module=ours, key="bench-forward",
                          tokens=0)
    step(x, t)  # warm-up (the next call captures)
    r["graph_equals_eager"] = bool(torch.equal(step(x, t), eager()))
    r["graph_vs_eager_rel_err"] = rel_err(step(x, t), eager())
    r["ours_eager_ms"] = time_ms(eager)
    r["ours_graph_ms"] = time_ms(lambda: step(x, t)) if step.captured is not None else None
    caption = ours.encode_caption(ctx, mask)
    stepc = graphs.graphed(lambda x, t, c: ours(x, t, c), (caption,), module=ours, key="bench-step", tokens=0)
    stepc(x, t)
    r["ours_step_ms"] = time_ms(lambda: stepc(x, t))  # caption side precomputed (what sampling replays)
    del step, stepc
    graphs.release()
    uses_graph = 2 * (px // 32) ** 2 <= rt.MAX_TOKENS
    r["ours_mode"] = "cuda graph" if uses_graph else "eager"
    r["ours_ms"] = r["ours_graph_ms"] if uses_graph and r["ours_graph_ms"] else r["ours_eager_ms"]
    r["profile_ours_eager"] = profile(eager, top=10)
    foreign = module_bytes(ref)
    r["ours_peak_gib"] = peak_gib(eager, foreign=foreign)
    r["diffusers_ms"] = time_ms(lambda: theirs_call(ref))
    r["diffusers_peak_gib"] = peak_gib(lambda: theirs_call(ref), foreign=module_bytes(ours))
    for mode in compile_modes:
        try:
            ms, secs = compiled_ms(ref, theirs_call, mode)
            r[f"compile_{mode}_ms"], r[f"compile_{mode}_s"] = ms, secs
        except Exception as e:  # report, keep the row
            r[f"compile_{mode}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    del ours, ref
    free_all()
    return r


@contextlib.contextmanager
def dcae_variant(ae, variant):
    """Bench-only variants of our decode, undone afterwards: "as-is"; "eager" = no CUDA graph; "nchw" = the
    local stages in NCHW instead of channels-last (eager); "cl-weights" = channels-last activations and
    also channels-last conv weights in the local stages (eager; cuDNN then needs no weight transposes)."""
    local_stages = AE.Decoder.local_stages
    local = [*ae.decoder.up_blocks[:ae.decoder.first_global], ae.decoder.conv_out]

    def nchw(self, x):  # Decoder.local_stages without its channels-last conversion
        for i in reversed(range(self.first_global)):
            for block in self.up_blocks[i]:
                x = block(x)
        return self.conv_out(torch.relu_(self.norm_out(x)))
    with contextlib.ExitStack() as stack:
        if variant != "as-is":
            stack.enter_context(env(rt.ENV, "0"))
        if variant == "nchw":
            AE.Decoder.local_stages = nchw
        if variant == "cl-weights":
            for m in local:
                m.to(memory_format=torch.channels_last)
        try:
            yield
        finally:
            AE.Decoder.local_stages = local_stages
            for m in local:
                m.to(memory_format=torch.contiguous_format)


def row_dcae_variants(px):
    """Our decode as it is, eager, with NCHW local stages, with channels-last weights: time and equality."""
    ours = our_dcae()
    latent = torch.randn(1, 32, px // 32, px // 32, generator=torch.Generator(device=DEV).manual_seed(0), device=DEV)
    base = ours.decode(latent)
    r = dict(kind="dcae-variants", px=px, tflop=dcae_flops(px) / 1e12)
    for variant in ("as-is", "eager", "nchw", "cl-weights"):
        with dcae_variant(ours, variant):
            r[f"{variant}_ms"] = time_ms(lambda: RUNTIME.decode_untiled(ours, latent), budget_s=2)
            r[f"{variant}_rel_err"] = rel_err(RUNTIME.decode_untiled(ours, latent), base)
            r[f"{variant}_extra_gib"] = extra_gib(lambda: RUNTIME.decode_untiled(ours, latent))
            if variant in ("eager", "nchw"):
                r[f"{variant}_profile"] = profile(lambda: RUNTIME.decode_untiled(ours, latent), top=12)
    r["graph_pool_gib"] = pool_gib()
    del ours
    RUNTIME.release()
    free_all()
    return r


def row_dcae(px, tiled, config=AE.FULL_CONFIG):
    ours = our_dcae(config=config)
    ref = diffusers_dcae(ours)
    g = torch.Generator(device=DEV).manual_seed(0)
    latent = torch.randn(1, 32, px // 32, px // 32, generator=g, device=DEV)  # the DiT's (scaled) float32 latent
    RUNTIME.release()
    untiled = lambda: RUNTIME.decode_untiled(ours, latent)  # noqa: E731
    lite = config == AE.LITE_CONFIG  # its FLOPs are not counted: no TFLOP/s
    r = dict(kind="dcae-lite" if lite else "dcae", px=px, tiled=tiled, tflop=None if lite else dcae_flops(px) / 1e12)
    theirs = lambda: ref.decode((latent / 0.41407).to(BF16), return_dict=False)[0]  # noqa: E731
    r["rel_err_vs_diffusers_untiled"] = rel_err(ours.decode_tiled(latent) if tiled else untiled(),
                                                theirs().float().clamp(-1, 1))
    if tiled:
        ours_call = lambda: ours.decode_tiled(latent)  # noqa: E731
        r["ours_untiled_ms"] = time_ms(untiled, budget_s=3)
        r["ours_untiled_extra_gib"] = extra_gib(untiled)
        r["tiled_equals_untiled_rel_err"] = rel_err(ours_call(), untiled())
        r["diffusers_untiled_ms"] = time_ms(theirs, budget_s=3, max_reps=5)
        r["diffusers_untiled_extra_gib"] = extra_gib(theirs)
        ref.enable_tiling()
        r["diffusers_note"] = "enable_tiling() defaults (512 px tiles, 448 stride)"
    else:
        ours_call = untiled
    r["ours_ms"], r["ours_mode"] = time_ms(ours_call, budget_s=3), "tiled (default)" if tiled else "untiled"
    r["ours_extra_gib"] = extra_gib(ours_call)
    r["diffusers_ms"] = time_ms(theirs, budget_s=3)
    r["diffusers_extra_gib"] = extra_gib(theirs)
    r["ours_graph_pool_gib"] = pool_gib()  # a captured decode's activations live in the graph's pool
    r.update(graphs_held())
    r["ours_peak_gib"] = r["ours_extra_gib"] + r["ours_graph_pool_gib"] + module_bytes(ours.decoder) / GiB
    if not tiled:
        with env(rt.ENV, "0"):
            r["ours_eager_ms"] = time_ms(ours_call, budget_s=2)
    r["diffusers_peak_gib"] = r["diffusers_extra_gib"] + module_bytes(ref.decoder) / GiB
    if not tiled and px == 1024 and not lite:
        try:
            ms, secs = compiled_ms(ref.decoder, lambda m: m((latent / 0.41407).to(BF16)), None)
            r["compile_default_ms"], r["compile_default_s"] = ms, secs
        except Exception as e:
            r["compile_default_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    del ours, ref
    free_all()
    return r


def row_gemma():
    te = our_text_encoder()
    from diffusers import SanaPipeline
    pipe = SanaPipeline(tokenizer=te.tokenizer, text_encoder=DiffusersGemma(te), vae=None, transformer=None,
                        scheduler=None)
    prompts = [PROMPT, PROMPT + " at night"]
    ours = lambda: RUNTIME.encode_text(te, prompts)  # noqa: E731
    theirs = lambda: pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=DEV,  # noqa: E731
                                        clean_caption=False, complex_human_instruction=CHI)
    RUNTIME.release()
    eager = ours()[0]  # the warm-up (eager)
    a, b = ours()[0], theirs()[0]  # a: captured and replayed (or a second warm-up, when the first synced)
    r = dict(kind="gemma", batch=2, tokens=300, rel_err_vs_diffusers=rel_err(a, b),
             graph_equals_eager=bool(torch.equal(a, eager)), **graphs_held())
    r["ours_ms"], r["ours_mode"] = time_ms(ours), "cuda graph"
    with env(rt.ENV, "0"):
        r["ours_eager_ms"] = time_ms(ours)
    r["diffusers_ms"] = time_ms(theirs)
    r["ours_peak_gib"] = peak_gib(ours) + pool_gib()
    r["diffusers_peak_gib"] = peak_gib(theirs)
    # gemma-cached: the instruction's keys/values reused (ours_ms above) against computed in every call
    uncached = lambda prompts: RUNTIME.encode_text(te, prompts, cache=False)  # noqa: E731
    r["cached_vs_uncached_rel_err"] = rel_err(a, uncached(prompts)[0])  # bf16: within rounding
    r["ours_uncached_ms"] = time_ms(lambda: uncached(prompts))
    r["one_prompt_cached_ms"] = time_ms(lambda: RUNTIME.encode_text(te, PROMPT))
    r["one_prompt_uncached_ms"] = time_ms(lambda: uncached(PROMPT))
    del te, pipe
    free_all()
    return r


def row_e2e(variant, px):
    te = our_text_encoder()
    dit, ae = our_dit(variant), our_dcae()
    ref_dit, ref_ae = diffusers_dit(dit), diffusers_dcae(ae)
    shift = defaults_for(dit.config, px, px)["shift"]
    ours = P.SanaPipeline(dit, ae, te, runtime=RUNTIME)
    theirs = diffusers_pipeline(te, ref_dit, ref_ae, shift)
    tiled = px > 2048
    if tiled:
        ref_ae.enable_tiling()
    r = dict(kind="e2e", variant=variant, px=px, steps=20, cfg=4.5, shift=shift,
             note="both pipelines with every model resident" + (", tiled decode (ours default tiling, diffusers "
                                                              "enable_tiling())" if tiled else ""))
    if tiled:  # the row's condition: tiled decode, whatever free memory says
        RUNTIME.decode = lambda autoencoder, latent: autoencoder.decode_tiled(latent)
    ours_call = lambda: ours(PROMPT, width=px, height=px, steps=20, cfg=4.5, flow_shift=shift, seed=0)  # noqa: E731
    theirs_call = lambda: theirs(PROMPT, negative_prompt="", num_inference_steps=20, guidance_scale=4.5,  # noqa: E731
                                 height=px, width=px, use_resolution_binning=False, clean_caption=False,
                                 complex_human_instruction=CHI, generator=torch.Generator().manual_seed(0),
                                 output_type="pil").images
    reps = 3 if px <= 1024 else 2
    first, _ = wall_s(ours_call)
    r["ours_first_image_s"] = first  # this process's first image (kernels compiled, graphs captured)
    r["ours_ms"] = 1000 * statistics.median(wall_s(ours_call)[0] for _ in range(reps))
    r["ours_mode"] = "cuda graphs" if 2 * (px // 32) ** 2 <= rt.MAX_TOKENS else "eager"
    r["ours_phases_ms"] = phase_ms(ours_call, te)
    r.update(graphs_held())
    r["ours_peak_gib"] = peak_gib(ours_call, foreign=module_bytes(ref_dit, ref_ae)) + pool_gib()
    r["ours_no_graphs_ms"] = None
    if px <= 1024:
        with env(rt.ENV, "0"):
            r["ours_no_graphs_ms"] = 1000 * statistics.median(wall_s(ours_call)[0] for _ in range(reps))
        # first image at a new size in this warm process, against that size's steady state
        other = dict(width=1152, height=896)
        new = lambda: ours(PROMPT, steps=20, cfg=4.5, flow_shift=shift, seed=0, **other)  # noqa: E731
        r["new_size"] = f"{other['width']}x{other['height']}"
        r["new_size_first_phases_ms"] = phase_ms(new, te)
        r["new_size_first_s"] = sum(r["new_size_first_phases_ms"].values()) / 1000
        r["new_size_steady_s"] = statistics.median(wall_s(new)[0] for _ in range(reps))
        third = lambda: ours(PROMPT, steps=20, cfg=4.5, flow_shift=shift, seed=0, width=1280, height=768)  # noqa: E731
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:  # where it goes
            r["third_size_first_profiled_s"] = wall_s(third)[0]
        slow = sorted(prof.key_averages(), key=lambda e: -e.cpu_time_total)[:12]
        r["third_size_first_cpu_top"] = [(e.key[:80], round(e.cpu_time_total / 1e3, 1)) for e in slow]
        r["third_size_steady_s"] = statistics.median(wall_s(third)[0] for _ in range(reps))
        # the same at a fourth size with cuDNN kept out of SDPA (its per-shape plans are most of a new size's cost)
        fourth = lambda: ours(PROMPT, steps=20, cfg=4.5, flow_shift=shift, seed=0, width=896, height=1152)  # noqa: E731
        cudnn_sdp = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(False)
        try:
            r["no_cudnn_sdp_new_size_first_s"] = wall_s(fourth)[0]
            r["no_cudnn_sdp_new_size_steady_s"] = statistics.median(wall_s(fourth)[0] for _ in range(reps))
            r["no_cudnn_sdp_steady_1024_s"] = statistics.median(wall_s(ours_call)[0] for _ in range(reps))
        finally:
            torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)
    wall_s(theirs_call)  # warm-up
    r["diffusers_ms"] = 1000 * statistics.median(wall_s(theirs_call)[0] for _ in range(reps))
    r["diffusers_peak_gib"] = peak_gib(theirs_call, foreign=module_bytes(dit, ae))
    vars(RUNTIME).pop("decode", None)  # the class's decode again
    del ours, theirs, te, dit, ae, ref_dit, ref_ae
    RUNTIME.release()
    free_all()
    return r


def row_e2e_sprint(variant, px, steps_list=(1, 2, 4)):
    """Sana-Sprint prompt -> PIL image at 1, 2 and 4 steps, ours and diffusers' SanaSprintPipeline, with
    ours' phase breakdown (encode / sample / decode / host) at each step count."""
    from diffusers import SanaSprintPipeline, SCMScheduler
    te = our_text_encoder()
    dit, ae = our_dit(variant), our_dcae()
    ref_dit, ref_ae = diffusers_dit(dit), diffusers_dcae(ae)
    ours = P.SanaPipeline(dit, ae, te, runtime=RUNTIME)
    theirs = SanaSprintPipeline(tokenizer=te.tokenizer, text_encoder=DiffusersGemma(te), vae=ref_ae,
                                transformer=ref_dit, scheduler=SCMScheduler())
    theirs.set_progress_bar_config(disable=True)
    r = dict(kind="e2e", variant=variant, px=px, cfg=4.5, note="Sana-Sprint, scm, embedded guidance 4.5, "
             "every model resident; ours_ms/diffusers_ms: the 1-step image")
    for steps in steps_list:
        ours_call = lambda: ours(PROMPT, width=px, height=px, steps=steps, cfg=4.5, seed=0)  # noqa: E731
        theirs_call = lambda: theirs(PROMPT, num_inference_steps=steps, guidance_scale=4.5, height=px,  # noqa: E731
                                     width=px, use_resolution_binning=False, complex_human_instruction=CHI,
                                     intermediate_timesteps=1.3 if steps == 2 else None,
                                     generator=torch.Generator().manual_seed(0), output_type="pil").images
        for _ in range(2):
            wall_s(ours_call)  # warm-up: compile, capture at the second call
        r[f"ours_{steps}step_ms"] = 1000 * statistics.median(wall_s(ours_call)[0] for _ in range(5))
        r[f"ours_{steps}step_phases_ms"] = phase_ms(ours_call, te)
        wall_s(theirs_call)
        r[f"diffusers_{steps}step_ms"] = 1000 * statistics.median(wall_s(theirs_call)[0] for _ in range(3))
    r["ours_ms"], r["diffusers_ms"] = r[f"ours_{steps_list[0]}step_ms"], r[f"diffusers_{steps_list[0]}step_ms"]
    r["ours_mode"] = "cuda graphs"
    r.update(graphs_held())
    del ours, theirs, te, dit, ae, ref_dit, ref_ae
    RUNTIME.release()
    free_all()
    return r


@contextlib.contextmanager
def env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def row_smoke():
    """GPU checks at small and full size: our DiT = diffusers' (fp32 tiny, bf16 full), graph = eager, re-capture
    after the weights move, fallback when a capture fails, sampling with graphs = without."""
    r = dict(kind="smoke")
    cfg = T.SanaConfig(depth=2, width=64, caption_dim=48, self_heads=2, cross_heads=2, mlp_hidden=160, qk_norm=True)
    tiny = T.SanaTransformer(cfg, dtype=torch.float32, device=DEV)
    randomize_(tiny, 0)
    ref = diffusers_dit(tiny)
    x, t, ctx, mask = (v.float() if v.is_floating_point() else v for v in dit_inputs(cfg, 160, seed=1))
    ctx = ctx[:, :20]
    mask = mask[:, :20]
    ours_out = tiny(x, t, ctx, mask)
    r["tiny_fp32_rel_err"] = rel_err(ours_out, ref(x, encoder_hidden_states=ctx, timestep=t,
                                                    encoder_attention_mask=mask, return_dict=False)[0])
    # graphs on the full 1.6B at 1024 px: equal to eager; weights moved -> re-captured, still equal
    dit = our_dit("sana-1.6b")
    x, t, ctx, mask = dit_inputs(dit.config, 1024)
    caption = dit.encode_caption(ctx, mask)
    fn = lambda x, t, c: dit(x, t, c)  # noqa: E731
    step = RUNTIME.graphed(fn, (caption,), module=dit, key="smoke", tokens=2048)
    a, _, b = [step(x, t) for _ in range(3)]  # warm-ups (a first one may sync: lazy init), capture, replays
    r["graph_captured"] = step.captured is not None
    r["graph_equals_eager"] = bool(torch.equal(b, dit(x, t, caption)))
    r["graph_first_equals_eager"] = bool(torch.equal(a, b))
    dit.to("cpu")
    dit.to(DEV)  # new addresses
    caption = dit.encode_caption(ctx, mask)
    step2 = RUNTIME.graphed(fn, (caption,), module=dit, key="smoke", tokens=2048)
    step2(x, t), step2(x, t)  # warm-up again (new weights), capture
    r["recaptured_after_move"] = step2.captures == 1
    r["after_move_equals_eager"] = bool(torch.equal(step2(x, t), dit(x, t, caption)))
    r["graphs_cached"] = len(RUNTIME.cache)

    def bad(x, t, c):
        y = dit(x, t, c)
        return y * float(y.float().abs().max().item() > -1)  # a host sync: capture must fail cleanly
    step3 = RUNTIME.graphed(bad, (caption,), module=dit, key="smoke-bad", tokens=2048)
    outs = [step3(x, t) for _ in range(3)]
    r["syncing_step_reason"] = step3.reason
    r["syncing_step_falls_back"] = bool(torch.equal(outs[2], dit(x, t, caption))) and step3.captures == 0
    r["process_still_captures"] = not RUNTIME.broken and torch.randn(2, device=DEV).isfinite().all().item()
    r["profile_eager_forward"] = profile(lambda: dit(x, t, caption))
    # sampling: graphs vs eager, same latent
    noise = torch.randn(1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    cond, uncond = ctx[1:], ctx[:1]
    kw = dict(sampler="flow_dpm_solver", steps=20, cfg=4.5, shift=3.0)
    eager = sample_latents(dit, noise, cond, mask[1:], uncond, mask[:1], **kw)
    graphed = sample_latents(dit, noise, cond, mask[1:], uncond, mask[:1], **kw, runtime=RUNTIME)
    r["sample_graph_vs_eager_rel_err"] = rel_err(graphed, eager)
    r["sample_graph_ms"] = time_ms(lambda: sample_latents(dit, noise, cond, mask[1:], uncond, mask[:1], **kw,
                                                          runtime=RUNTIME), warmup=1, reps=3)
    r["sample_eager_ms"] = time_ms(lambda: sample_latents(dit, noise, cond, mask[1:], uncond, mask[:1], **kw),
                                   warmup=1, reps=3)
    r["ok"] = all(r[k] for k in ("graph_captured", "graph_equals_eager", "recaptured_after_move",
                                 "after_move_equals_eager", "syncing_step_falls_back", "process_still_captures"))
    del dit, step, step2, step3, tiny, ref
    RUNTIME.release()
    free_all()
    return r


def profile(fn, top=14):
    """GPU time per kernel name (ms per call, top `top`) and the GPU-busy total vs the wall time of fn()."""
    from torch.profiler import ProfilerActivity
    fn()
    sync()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        sync()
        wall = (time.perf_counter() - t0) * 1000
    kernels = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name] = kernels.get(e.name, 0.0) + e.device_time_total / 1000
    busy = sum(kernels.values())
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    return dict(wall_ms=wall, gpu_busy_ms=busy, launches=sum(1 for e in prof.events()
                                                               if e.device_type == torch.autograd.DeviceType.CUDA),
                top=[(name[:90], round(ms, 3)) for name, ms in ranked])


# ----------------------------------------------------------------------------- 16 GiB rows (child process)

def cap_16gib():
    """Cap this process at 16 GiB and make mem_get_info report what a 16 GiB card would, so that our
    free-memory policies (text-encoder offload, decode tiling) see the card the cap stands for."""
    index = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(16 * GiB / total, index)
    real = torch.cuda.mem_get_info

    def mem_get_info(device=None):
        free, _ = real(device)
        return min(free, 16 * GiB - torch.cuda.memory_reserved(index)), 16 * GiB
    torch.cuda.mem_get_info = mem_get_info


def row_mem(variant, px):
    """Our pipeline alone under the 16 GiB cap: peak per phase (encode, sample, decode)."""
    cap_16gib()
    te = our_text_encoder()
    dit, ae = our_dit(variant), our_dcae()
    weights = module_bytes(dit, ae, te.model) / GiB
    pipe = P.SanaPipeline(dit, ae, te, runtime=RUNTIME)
    phases = {}
    sample, decode = P.sample_latents, RUNTIME.decode

    def phase(name, fn):
        def run(*a, **k):
            sync()
            if name == "sample":  # the peak so far is the encode phase's (the call reset it at its start)
                phases["encode"] = torch.cuda.max_memory_allocated() / GiB + pool_gib()
            torch.cuda.reset_peak_memory_stats()
            out = fn(*a, **k)
            sync()
            phases[name] = torch.cuda.max_memory_allocated() / GiB + pool_gib()
            torch.cuda.reset_peak_memory_stats()
            return out
        return run
    P.sample_latents = phase("sample", sample)
    RUNTIME.decode = phase("decode", decode)
    should_offload = rt.text_encoder_should_offload
    rt.text_encoder_should_offload = lambda *a, **k: True  # the rows' condition: Gemma off the GPU while sampling
    shift = defaults_for(dit.config, px, px)["shift"]
    r = dict(kind="mem", variant=variant, px=px, cap_gib=16, weights_gib=weights,
             ours_mode="16 GiB cap, Gemma off the GPU while sampling (ms: 2nd image, with the moves)")
    try:
        torch.cuda.reset_peak_memory_stats()
        secs, images = wall_s(lambda: pipe(PROMPT, width=px, height=px, steps=20, cfg=4.5, flow_shift=shift, seed=0))
        r["first_image_s"] = secs  # a fresh process: includes kernel compiles and graph capture
        phases.clear()
        torch.cuda.reset_peak_memory_stats()
        r["ours_ms"] = 1000 * wall_s(lambda: pipe(PROMPT, width=px, height=px, steps=20, cfg=4.5, flow_shift=shift,
                                                   seed=0))[0]
        r["phase_peak_gib"] = dict(phases)
        r["ours_peak_gib"] = max(phases.values())
        r["text_encoder_offloaded"] = pipe._text_encoder_offloaded
        r["ok"] = True
    except torch.OutOfMemoryError as e:
        r["ok"], r["error"] = False, f"OOM: {str(e)[:300]}"
    finally:
        P.sample_latents, rt.text_encoder_should_offload = sample, should_offload
        vars(RUNTIME).pop("decode", None)
    if px == 4096:  # the DC-AE alone under the cap: default tiled decode and Runtime.decode at 4096
        del pipe, dit
        te.offload()
        free_all()
        latent = torch.randn(1, 32, 128, 128, generator=torch.Generator(device=DEV).manual_seed(0), device=DEV)
        for name, fn in (("tiled", lambda: ae.decode_tiled(latent)), ("auto", lambda: decode(ae, latent))):
            try:
                r[f"dcae_{name}_extra_gib"] = extra_gib(fn)
                r[f"dcae_{name}_ms"] = time_ms(fn, warmup=1, reps=3)
            except torch.OutOfMemoryError as e:
                r[f"dcae_{name}_error"] = f"OOM: {str(e)[:200]}"
    return r


def row_cold(variant, px):
    """A fresh process: the first image right after the models are built (CUDA/cuBLAS init, kernel JIT or
    disk-cache load, graph capture), then the second."""
    te = our_text_encoder()
    dit, ae = our_dit(variant), our_dcae()
    pipe = P.SanaPipeline(dit, ae, te, runtime=RUNTIME)
    shift = defaults_for(dit.config, px, px)["shift"]
    call = lambda: pipe(PROMPT, width=px, height=px, steps=20, cfg=4.5, flow_shift=shift, seed=0)  # noqa: E731
    first = wall_s(call)[0]
    second = wall_s(call)[0]
    return dict(kind="cold", variant=variant, px=px, first_image_s=first, second_image_s=second,
                ours_ms=first * 1000, ours_mode="first image, fresh process")


ROWS = {
    "smoke": row_smoke,
    "dit-1.6b-1024": lambda: row_dit("sana-1.6b", 1024, ("default", "reduce-overhead")),
    "dit-0.6b-1024": lambda: row_dit("sana-0.6b", 1024, ("default", "reduce-overhead")),
    "dit-1.6b-2048": lambda: row_dit("sana-1.6b", 2048, ("default",)),
    "dit-1.6b-4096": lambda: row_dit("sana-1.6b", 4096, ("default",)),
    "dit-4.8b-1024": lambda: row_dit("sana-1.5-4.8b", 1024, ("default",)),
    "dit-1.6b-1024-nocompile": lambda: row_dit("sana-1.6b", 1024, ()),
    "dit-0.6b-1024-nocompile": lambda: row_dit("sana-0.6b", 1024, ()),
    "dit-4.8b-1024-nocompile": lambda: row_dit("sana-1.5-4.8b", 1024, ()),
    "dit-1.6b-4096-nocompile": lambda: row_dit("sana-1.6b", 4096, ()),
    "dcae-1024": lambda: row_dcae(1024, False),
    "dcae-2048": lambda: row_dcae(2048, False),
    "dcae-4096-tiled": lambda: row_dcae(4096, True),
    "dcae-lite-1024": lambda: row_dcae(1024, False, AE.LITE_CONFIG),
    "dcae-lite-2048": lambda: row_dcae(2048, False, AE.LITE_CONFIG),
    "dcae-lite-4096-tiled": lambda: row_dcae(4096, True, AE.LITE_CONFIG),
    "dcae-variants-1024": lambda: row_dcae_variants(1024),
    "dcae-variants-2048": lambda: row_dcae_variants(2048),
    "gemma": row_gemma,
    "e2e-1.6b-1024": lambda: row_e2e("sana-1.6b", 1024),
    "e2e-1.6b-4096": lambda: row_e2e("sana-1.6b", 4096),
    "e2e-sprint-1.6b-1024": lambda: row_e2e_sprint("sana-sprint-1.6b", 1024),
    "mem-1.6b-1024": lambda: row_mem("sana-1.6b", 1024),
    "mem-1.6b-4096": lambda: row_mem("sana-1.6b", 4096),
    "mem-4.8b-1024": lambda: row_mem("sana-1.5-4.8b", 1024),
    "cold-1.6b-1024": lambda: row_cold("sana-1.6b", 1024),
}
CHILD = ("mem-", "cold-")  # rows that need a fresh process


def run_rows(names, out_dir, deadline):
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{names[0]}.json"
    results = {}
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                command="python3 bench/bench.py --rows " + ",".join(names))
    try:
        import diffusers
        meta["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    for name in names:
        left = deadline - time.time()
        if left < 20:
            log(f"[{name}] skipped: {left:.0f} s left")
            results[name] = dict(skipped="out of time")
            continue
        log(f"[{name}] start ({left:.0f} s left)")
        t0 = time.time()
        if name.startswith(CHILD):
            res = run_child(name, out_dir, left)
        else:
            try:
                torch.set_grad_enabled(False)
                res = ROWS[name]()
            except Exception as e:
                res = dict(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-3000:])
                free_all()
        res["seconds"] = time.time() - t0
        results[name] = {**res, **{k: v for k, v in meta.items() if k != "command"}}
        log(f"[{name}] {json.dumps(res, default=str)[:1500]}")
        path.write_text(json.dumps(dict(meta=meta, rows=results, log=LOG[-200:]), indent=1, default=str))
    return results


def run_child(name, out_dir, left):
    out = out_dir / f"child-{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--out", str(out)]
    child_env = dict(os.environ)
    if name.startswith("cold-"):  # no compiled Triton kernels on disk: the first run after an install
        child_env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cold-")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(left - 10, 10), env=child_env)
    except subprocess.TimeoutExpired:
        return dict(error="child timed out")
    if proc.returncode or not out.exists():
        return dict(error=f"child exit {proc.returncode}", stderr=proc.stderr[-3000:])
    res = json.loads(out.read_text())
    out.unlink()
    return res


# ----------------------------------------------------------------------------- the table

def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, (int, float)) else str(v)


def table(rows: dict) -> str:
    head = ("| row | ours ms | ours mode | diffusers eager ms | + compile ms | + compile RO ms | ours / eager | "
            "ours / best compiled | ours TFLOP/s | ours peak GiB | diffusers peak GiB |")
    lines = [head, "|" + "---|" * 11]
    for name, r in rows.items():
        if r.get("kind") in (None, "smoke") or "ours_ms" not in r:
            continue
        ours, eager = r.get("ours_ms"), r.get("diffusers_ms")
        comp, ro = r.get("compile_default_ms"), r.get("compile_reduce-overhead_ms")
        best = min([v for v in (comp, ro) if v], default=None)
        tflops = r["tflop"] / (ours / 1000) if r.get("tflop") and ours else None
        mode = r.get("ours_mode") or ("16 GiB cap" if r.get("kind") == "mem" else "")
        lines.append(f"| {name} | {fmt(ours)} | {mode} | {fmt(eager)} | {fmt(comp)} | {fmt(ro)} | "
                     f"{fmt(ours / eager if ours and eager else None, 2)} | "
                     f"{fmt(ours / best if ours and best else None, 2)} | {fmt(tflops, 0)} | "
                     f"{fmt(r.get('ours_peak_gib'), 2)} | {fmt(r.get('diffusers_peak_gib'), 2)} |")
    phases = [(f"{name} {key[5:-10].replace('_', '') or 'image'}", r[key]) for name, r in rows.items()
              for key in sorted(r) if key.startswith("ours_") and key.endswith("phases_ms")]
    if phases:  # end-to-end rows: where ours' time goes
        lines += ["", "| end to end (ours) | encode ms | sample ms | decode ms | host/other ms |", "|---|---|---|---|---|"]
        lines += [f"| {label} | {fmt(p.get('encode'))} | {fmt(p.get('sample'))} | {fmt(p.get('decode'))} | "
                  f"{fmt(p.get('other'))} |" for label, p in phases]
    gemma = [(name, r) for name, r in rows.items() if "one_prompt_cached_ms" in r]
    if gemma:  # the instruction prefix's keys/values cached (ours) or computed in every call
        lines += ["", "| gemma-cached | 1 prompt cached ms | 1 prompt uncached ms | 2 prompts uncached ms | "
                  "cached vs uncached rel err |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {fmt(r['one_prompt_cached_ms'])} | {fmt(r.get('one_prompt_uncached_ms'))} | "
                  f"{fmt(r.get('ours_uncached_ms'))} | {fmt(r.get('cached_vs_uncached_rel_err'), 5)} |"
                  for name, r in gemma]
    return "\n".join(lines)


def merge(folder: Path) -> dict:
    rows = {}
    for path in sorted(folder.glob("*.json"), key=lambda p: (len(p.stem), p.stem)):  # call2 before call10
        data = json.loads(path.read_text())
        for name, r in data.get("rows", {}).items():
            if "error" not in r and "skipped" not in r:
                rows[name] = {**r, "file": path.name}
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", help="comma-separated row names (see --list)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--merge", help="folder of JSON files to merge into one table")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, default=540, help="seconds this call may take (rows past it are skipped)")
    args = ap.parse_args()
    if args.list:
        print("\n".join(ROWS))
        return
    if args.merge:
        print(table(merge(Path(args.merge))))
        return
    if args.child:
        torch.set_grad_enabled(False)
        try:
            res = ROWS[args.child]()
        except Exception as e:
            res = dict(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-3000:])
        Path(args.out).write_text(json.dumps(res, default=str))
        return
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    results = run_rows(names, Path(args.out), time.time() + args.budget)
    print(table(results))


if __name__ == "__main__":
    main()
