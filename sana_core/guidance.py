"""Guided sampling: CFG, PAG and Sana-Sprint's embedded guidance around the DiT, one batched call per step.

`sample_latents` is the guided sampling loop; SanaPipeline and the ComfyUI sampler node call it.
"""
import torch
import torch.nn.functional as F

from . import samplers
from .controlnet import prepare_controls
from .inpaint import latent_mask
from .presets import pairing_error
from .runtime import fingerprint


def sample_latents(transformer, noise, cond, cond_mask, uncond=None, uncond_mask=None, *, sampler, steps, cfg,
                   pag_scale=0.0, pag_layers=(), shift, denoise=1.0, latent=None, mask=None, seed=0, callback=None,
                   integer_timesteps=True, runtime=None, device=None, controls=()) -> torch.Tensor:
    """Guided sampling: returns the clean float32 latent (B, 32, h, w) on `device`.

    noise (B, 32, h, w) unit variance (any device); cond/uncond (1 or B, T, D) caption embeddings with
    masks (1 or B, T). CFG runs [uncond, cond] in one batched forward (skipped when cfg == 1); PAG
    (pag_scale != 0) adds a cond copy whose self-attention is the identity on V in `pag_layers`:
    out = u + cfg (c - u) + pag (c - p). Sprint models get no CFG batch: cfg is their embedded
    guidance scale. scm's fresh noise comes from torch.Generator().manual_seed(seed), continued past
    one noise-sized draw, as in diffusers' SanaSprintPipeline, whose generator first makes the
    initial noise: a seed gives the same image here, in SanaPipeline, in ComfyUI and in diffusers.
    The caption side of the cross-attention is computed once. With a `runtime` (sana_core.runtime.Runtime)
    each step (the whole guided call) is replayed from one of its CUDA graphs on a GPU; None: eager.
    device: where to sample (None: the transformer's; give a partially loaded model's load device).
    controls: (ControlNet, hint latent (1 or B, 32, h, w), strength) triples (sana_core.controlnet), applied to
    every guidance group.
    latent (B, 32, h, w): the clean latent of an input image (scaled), where denoise < 1 starts from and what a
    mask keeps. mask: inpainting (sana_core.inpaint): 1 = generate, 0 = keep `latent`, between = blend; at pixel
    resolution ((H, W), (1 or B, H, W) or (1 or B, 1, H, W): max-pooled to the latent grid) or on the grid.
    """
    config = transformer.config
    samplers.check_steps(sampler, steps, denoise)
    error = pairing_error(config, sampler, steps)
    if error:
        raise ValueError(error)
    device, dtype = torch.device(device or transformer.device), transformer.dtype
    batch = noise.shape[0]
    if mask is not None:
        if latent is None:
            raise ValueError("a mask needs the latent of the image to keep (latent=): encode the image first")
        mask = latent_mask(mask, batch, *noise.shape[-2:]).to(device)
    cond, cond_mask = _expand(cond, cond_mask, batch, "cond")
    use_cfg, use_pag = (not config.sprint) and cfg != 1.0, pag_scale != 0.0
    if config.sprint and use_pag:
        raise ValueError("PAG is not available for Sana-Sprint models (their guidance is embedded); set pag_scale=0")
    if use_pag and not pag_layers:
        raise ValueError("PAG needs the block indices to perturb (pag_layers), e.g. (8,) for the 1.6B model")
    for layer in pag_layers if use_pag else ():
        if not 0 <= layer < config.depth:
            raise ValueError(f"PAG layer {layer} does not exist: the model has blocks 0..{config.depth - 1}")
    if use_cfg:
        if uncond is None:
            raise ValueError(f"cfg {cfg} needs the negative (unconditional) embedding; pass uncond or set cfg=1")
        uncond, uncond_mask = _expand(uncond, uncond_mask, batch, "uncond")
    groups = ([(uncond, uncond_mask)] if use_cfg else []) + [(cond, cond_mask)] * (2 if use_pag else 1)
    n = len(groups)
    context, context_mask = _concat_captions(groups)  # (n B, T, D), (n B, T)
    guidance = torch.full((batch,), float(cfg), device=device) if config.sprint else None
    perturbed = None
    if use_pag:
        perturbed = torch.zeros(n * batch, dtype=torch.bool, device=device)
        perturbed[-batch:].fill_(True)  # the last group: cond with identity self-attention (no host copy)
    layers = tuple(pag_layers) if use_pag else ()
    scales = torch.full((2,), float(cfg), device=device)  # tensors: a graph serves any value; filled on the
    scales[1].fill_(float(pag_scale))                        # device (torch.tensor would copy from the host)

    def velocity(x, t, caption, guidance, perturbed, scales, control):  # x (B, 32, h, w) float32, t (B,) flow time
        out = transformer(torch.cat([x] * n).to(dtype), (t * samplers.NUM_TRAIN_TIMESTEPS).repeat(n), caption,
                          None, guidance, perturbed=perturbed, perturbed_layers=layers, control=control)
        out = out.float().chunk(n)  # guidance arithmetic in float32, in diffusers' order
        c = out[1] if use_cfg else out[0]
        v = out[0] + scales[0] * (c - out[0]) if use_cfg else c
        return v + scales[1] * (c - out[-1]) if use_pag else v

    generator = None
    if sampler == "scm":
        generator = torch.Generator().manual_seed(seed)
        torch.randn(noise.shape, generator=generator)  # the initial noise's draw; step noise follows it
    try:
        with torch.no_grad():
            caption = transformer.encode_caption(context, context_mask, device=device)  # once per sample
            control = prepare_controls(controls, transformer, caption, context.to(device), groups=n)
            constants = (caption, guidance, perturbed, scales, control)
            if runtime is None:
                step = lambda x, t: velocity(x, t, *constants)  # noqa: E731
            else:
                nets = tuple(fingerprint(net) for net, _, _ in controls)  # a graph reads their weights too
                step = runtime.graphed(velocity, constants, module=transformer, key=("velocity", n, use_cfg, use_pag,
                                       layers, nets), tokens=n * batch * noise.shape[-2] * noise.shape[-1])
            return samplers.sample(step, noise.to(device), sampler=sampler, steps=steps, shift=shift,
                                   denoise=denoise, latent=latent, mask=mask, generator=generator, callback=callback,
                                   integer_timesteps=integer_timesteps)
    except BaseException:
        context = context_mask = guidance = perturbed = noise = latent = mask = cond = uncond = None
        caption = constants = step = control = None
        raise


def _expand(emb, mask, batch, name):
    if mask is None:
        mask = torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device)
    if emb.shape[0] == batch:
        return emb, mask
    if emb.shape[0] == 1:
        return emb.expand(batch, -1, -1), mask.expand(batch, -1)
    raise ValueError(f"{name} has batch {emb.shape[0]}, the latent has batch {batch}: give 1 or {batch} captions")


def _concat_captions(groups):
    """Concatenate (emb, mask) pairs along the batch, right-padding shorter captions (mask 0)."""
    length = max(e.shape[1] for e, _ in groups)
    embs, masks = [], []
    for emb, mask in groups:
        pad = length - emb.shape[1]
        embs.append(F.pad(emb, (0, 0, 0, pad)))
        masks.append(F.pad(mask.to(emb.device), (0, pad)))
    return torch.cat(embs), torch.cat(masks)
