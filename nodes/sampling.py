"""SanaSampler: Flow-DPM-Solver / Flow Euler / Sprint sampling with CFG and PAG (sana_core.guidance).

It runs our own guided loop (one batched DiT call per step, the caption encoded once, a CUDA graph per
step) on the MODEL's DiT, with the MODEL's weight patches applied by its ModelPatcher and its SANA PAG
patch and ModelSamplingSD3 shift read from it; KSampler / SamplerCustomAdvanced with the SANA SAMPLER
and SIGMAS give the same latents through ComfyUI's own loop. Noise is made as ComfyUI's KSampler makes
it (on the CPU from the seed), LATENT is raw (scaled by 0.41407 around sampling), every step updates
ComfyUI's progress bar with a live preview (the DC-AE's linear latent-to-RGB projection) and checks
the Cancel button. Besides the LATENT it sends timing and memory figures to the frontend:
ui {"sana_stats": [{"seconds_per_step", "total_seconds", "peak_gpu_memory_gib", ...}]}.
"""
import time

import torch
from sana_core.autoencoder import SCALING_FACTOR
from sana_core.guidance import sample_latents
from sana_core.presets import defaults_for, pairing_error
from sana_core.samplers import SAMPLERS

from . import host
from .conditioning import caption_mask
from .latent import LATENT_CHANNELS

SEED_MAX = 0xFFFFFFFFFFFFFFFF
PAG_OPTION = "sana_pag"  # transformer_options key of the SANA PAG patch: {"scale", "layers"}
PREVIEW_UPSCALE = 8  # the latent is 1/32 of the image: show previews at 1/4


def comfy_noise(shape, seed: int) -> torch.Tensor:
    """ComfyUI's initial noise: one float32 draw on the CPU for the whole batch."""
    return torch.randn(shape, generator=torch.manual_seed(seed), dtype=torch.float32, device="cpu")


def latent_samples(latent, node: str) -> torch.Tensor:
    """The (B, 32, h, w) tensor of a LATENT, or an error a user can act on."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise ValueError(f"{node}: the latent input is not a ComfyUI LATENT (a dict with 'samples')")
    if samples.dim() != 4:
        raise ValueError(f"{node}: the latent has shape {list(samples.shape)}; SANA makes images from 4-D latents "
                         f"[batch, 32, height/32, width/32] (video latents are 5-D)")
    if samples.shape[1] != LATENT_CHANNELS:
        raise ValueError(
            f"{node}: the latent has {samples.shape[1]} channels, SANA's have {LATENT_CHANNELS}: it comes from another "
            f"model family (SD 1.5/SDXL latents have 4 channels, SD3/Flux 16). Make it with SanaEmptyLatent, or "
            f"encode the image with the SANA VAE (SanaVAELoader) instead.")
    if not torch.isfinite(samples).all():
        raise ValueError(f"{node}: the latent holds NaN or infinite values; check the node that made it")
    return samples


def caption(conditioning, name: str, model_config):
    """(embedding (B, T, D), mask (B, T)) from a CONDITIONING made by SanaTextEncode."""
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError(f"SanaSampler: '{name}' is empty; connect a SanaTextEncode")
    if len(conditioning) > 1:
        raise ValueError(f"SanaSampler: '{name}' holds {len(conditioning)} combined conditionings; SANA takes one "
                         f"caption per prompt: use a single SanaTextEncode (batch prompts in the latent instead)")
    emb, extra = conditioning[0][0], conditioning[0][1]
    if not isinstance(emb, torch.Tensor):
        raise ValueError(f"SanaSampler: '{name}' is not a text conditioning; connect a SanaTextEncode or CLIP Text "
                         f"Encode with the SANA text encoder")
    if emb.dim() != 3 or emb.shape[-1] != model_config.caption_dim:
        raise ValueError(
            f"SanaSampler: '{name}' has shape {list(emb.shape)}, the model reads Gemma-2 captions of width "
            f"{model_config.caption_dim}: this conditioning comes from another text encoder (CLIP/T5 nodes). "
            f"Use SanaTextEncode with SanaTextEncoderLoader.")
    if not torch.isfinite(emb).all():
        raise ValueError(f"SanaSampler: '{name}' holds NaN values; load the text encoder in bf16 or fp32")
    return emb, caption_mask(emb, extra.get("attention_mask"))


def model_patch_settings(model) -> tuple:
    """(SANA PAG patch {"scale", "layers"} or None, ModelSamplingSD3 shift or None) on a MODEL."""
    options = getattr(model, "model_options", {}).get("transformer_options", {})
    sampling = getattr(model, "object_patches", {}).get("model_sampling")
    return options.get(PAG_OPTION), getattr(sampling, "shift", None)


def dit_memory_required(config, forwards: int, tokens: int, element_size: int) -> int:
    """Rough activation memory of one DiT step, for ComfyUI to free before loading (bytes)."""
    return forwards * tokens * config.width * element_size * 24  # residual stream + 5x-wide Mix-FFN, slack


class LatentPreview:
    """Latent -> small RGB JPEG through the DC-AE's linear projection (ComfyUI's preview tuple)."""

    def __init__(self, vae, max_size: int):
        weight, bias = vae.model.preview_projection()  # (32, 3), (3,): rgb = latent pixel @ weight + bias
        self.weight, self.bias = weight.detach().float().cpu(), bias.detach().float().cpu()
        self.max_size = max_size

    def __call__(self, x0: torch.Tensor):
        from PIL import Image
        rgb = torch.einsum("chw,cr->hwr", x0[0].float().cpu(), self.weight) + self.bias  # (h, w, 3)
        pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).numpy()
        image = Image.fromarray(pixels)
        scale = max(1, min(PREVIEW_UPSCALE, self.max_size // max(image.size)))
        if scale > 1:
            image = image.resize((image.width * scale, image.height * scale), Image.BILINEAR)
        return ("JPEG", image, self.max_size)


class SanaSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SANA transformer from SanaModelLoader (LoRA, ModelSamplingSD3 and "
                                               "SANA PAG patches apply)."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt, from SanaTextEncode (instruction on) or CLIP "
                                                         "Text Encode on the SANA text encoder."}),
                "latent_image": ("LATENT", {
                    "tooltip": "Where to start: SanaEmptyLatent for text-to-image, SanaVAEEncode / VAE Encode with "
                               "denoise < 1 for image-to-image. 32 channels, raw DC-AE latent. A noise mask on it "
                               "(Set Latent Noise Mask) inpaints: only the masked part is generated."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                                 "tooltip": "The noise seed (the noise is made on the CPU, so a seed gives the same "
                                            "image on any GPU, as in ComfyUI's KSampler)."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 1000,
                                  "tooltip": "Sampling steps: 20 for flow_dpm_solver, 28 for flow_euler, 1-4 for "
                                             "Sana-Sprint (scm)."}),
                "cfg": ("FLOAT", {"default": 4.5, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale (4.5-5 typical; 1 = off, no negative "
                                             "needed). For Sana-Sprint: the embedded guidance (4.5), no extra cost."}),
                "pag_scale": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 20.0, "step": 0.1, "round": 0.01,
                                        "tooltip": "Perturbed-attention guidance (2.0 official; 0 = off, or the "
                                                   "MODEL's SANA PAG patch). Adds one model pass per step; perturbs "
                                                   "the variant's default layer. Not for Sana-Sprint."}),
                "flow_shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                         "tooltip": "Shift of the flow time grid; 0 = the MODEL's (ModelSamplingSD3) "
                                                    "or the variant's default (3.0 for 1.6B and 2K, 4.0 for 0.6B at "
                                                    "1024, 6.0 for 4K)."}),
                "sampler": (list(SAMPLERS), {
                    "default": "flow_dpm_solver",
                    "tooltip": "flow_dpm_solver (DPM-Solver++ 2M, SANA's own), flow_euler, or scm for Sana-Sprint "
                               "models."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "1 = start from pure noise; below 1 keeps that much of the input "
                                                 "latent's structure (image-to-image: 0.5-0.7)."}),
            },
            "optional": {
                "negative": ("CONDITIONING", {
                    "tooltip": "The negative prompt (SanaTextEncode with instruction off; empty text is the usual "
                               "choice). Needed when cfg is not 1; unused by Sana-Sprint."}),
                "vae": ("VAE", {"tooltip": "Optional: the DC-AE, for live previews while sampling."}),
            },
        }

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The denoised latent (raw DC-AE latent), for SanaVAEDecode or VAE Decode.",)
    FUNCTION = "sample"
    CATEGORY = "SANA"
    DESCRIPTION = ("Samples a SANA latent with Flow-DPM-Solver, Flow Euler or Sana-Sprint's scm, with CFG and "
                   "perturbed-attention guidance; shows a live preview and reports time per step and peak GPU "
                   "memory on the node.")

    def sample(self, model, positive, latent_image, seed, steps, cfg, pag_scale, flow_shift, sampler, denoise,
               negative=None, vae=None):
        started = time.perf_counter()
        h = host.current()
        pag_patch, patched_shift = model_patch_settings(model)
        core_loop = h.core_loop_reason(model, positive, negative)  # None: our own loop gives the same
        patched_model, model = model, host.unwrap(model, "transformer", "SanaSampler")
        vae = None if vae is None else host.unwrap(vae, "autoencoder", "SanaSampler")
        raw = latent_samples(latent_image, "SanaSampler")
        samples = raw * SCALING_FACTOR  # the DiT's latent space
        config = model.model.config
        batch, _, lh, lw = samples.shape
        cond = cond_mask = uncond = uncond_mask = None
        if not core_loop:
            cond, cond_mask = caption(positive, "positive", config)
            if negative is not None:
                uncond, uncond_mask = caption(negative, "negative", config)
        if negative is None and not config.sprint and cfg != 1.0:
            raise ValueError(f"SanaSampler: cfg {cfg} needs a negative prompt: connect a SanaTextEncode (instruction "
                             f"off; empty text is fine) to 'negative', or set cfg to 1")
        defaults = defaults_for(config, lw * 32, lh * 32)
        shift = flow_shift or patched_shift or defaults["shift"] or 3.0  # Sprint has none (scm ignores it)
        pag_layers = defaults["pag_layers"]
        if pag_scale == 0.0 and pag_patch is not None:
            pag_scale, pag_layers = pag_patch["scale"], pag_patch["layers"]
        if config.sprint and pag_scale != 0.0:
            raise ValueError(f"SanaSampler: {config.variant} is a Sana-Sprint model, whose guidance is embedded: "
                             f"perturbed-attention guidance does not apply. Set pag_scale to 0 (and take out any "
                             f"SANA Perturbed-Attention Guidance node before this sampler)")
        mask = latent_image.get("noise_mask")
        empty_mask = mask is not None and not mask.any()
        if empty_mask:
            host.log.warning("SanaSampler: the latent's noise mask is empty (all zeros), so there is nothing to "
                             "repaint and the latent comes back as it was; paint the mask (Load Image's mask editor)")
        if denoise <= 0.0 or empty_mask:  # nothing to generate: the latent as it came
            return {"ui": {"sana_stats": []}, "result": (dict(latent_image),)}
        preview = None
        if vae is not None and h.previews:  # the projection comes from one small decode (then cached)
            vae.ready()
            preview = LatentPreview(vae, h.preview_size)

        noise = comfy_noise(samples.shape, seed)
        forwards = 1 + (cfg != 1.0 and not config.sprint) + (pag_scale != 0.0)
        element = next(model.model.parameters()).element_size()
        dit = model.ready(dit_memory_required(config, forwards * batch, lh * lw, element))
        device = model.load_device  # a low-VRAM load leaves some weights on the CPU: sample where the rest are
        if model.workers is not None:  # several GPUs (SanaModelLoader's gpus): calls shared out, no CUDA graphs
            if model.loras:  # sana-run's merged LoRAs (inside ComfyUI they are ModelPatcher patches: carried)
                raise ValueError("SanaSampler: sana-run does not carry LoRAs to the worker processes of "
                                 "SanaModelLoader's gpus yet: set gpus to 1, or run the workflow in ComfyUI")
            dit = model.workers.transformer(dit)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        progress = h.progress(steps, "SanaSampler")
        step_times = []

        def callback(step, total, x0):
            h.check_interrupted()  # the Cancel button: raises, sampling stops, memory is freed
            step_times.append(time.perf_counter())
            progress(step, total, preview(x0) if preview is not None else None)

        sampling_started = time.perf_counter()
        try:
            if core_loop:
                error = pairing_error(config, sampler, steps)
                if error:
                    raise ValueError(error)
                host.log.info(f"SanaSampler: ComfyUI's sampling loop for {core_loop}")
                result = h.family.sample(patched_model, positive, negative, raw, noise, sampler_name=sampler,
                                         steps=steps, cfg=cfg, pag_scale=pag_scale, pag_layers=pag_layers,
                                         shift=shift, denoise=denoise, seed=seed, callback=callback, mask=mask)
            else:
                result = sample_latents(dit, noise, cond, cond_mask, uncond, uncond_mask, sampler=sampler,
                                        steps=steps, cfg=cfg, pag_scale=pag_scale, pag_layers=pag_layers, shift=shift,
                                        denoise=denoise, latent=samples if denoise < 1.0 or mask is not None else None,
                                        mask=mask, seed=seed, callback=callback,
                                        runtime=None if model.workers else h.runtime,
                                        device=device) / SCALING_FACTOR
        finally:
            noise = None
            h.free_cache()
        result = result.to(device=h.intermediate_device(), dtype=torch.float32)

        done = time.perf_counter()
        stats = {
            "seconds_per_step": (done - sampling_started) / max(1, len(step_times)),
            "total_seconds": done - started,
            "peak_gpu_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
            "steps": len(step_times), "sampler": sampler, "variant": config.variant,
            "width": lw * 32, "height": lh * 32, "batch_size": batch, "device": str(device),
        }
        out = dict(latent_image)  # the noise mask stays, as KSampler keeps it
        out["samples"] = result
        return {"ui": {"sana_stats": [stats]}, "result": (out,)}
