"""SANA as a native ComfyUI model family: MODEL, CLIP, VAE, SAMPLER and SIGMAS built from ComfyUI's own
classes, so that core nodes (CLIPTextEncode, KSampler, SamplerCustomAdvanced, ModelSamplingSD3, VAE Decode
(Tiled), VAE Encode, the conditioning nodes) and other packs work on SANA.

Imported only inside ComfyUI (by host.ComfyHost); elsewhere its import says so.

    MODEL  comfy.model_patcher.ModelPatcher around SanaModel, a model_base.BaseModel of type FLOW
           (x0 = x - sigma v; the DiT sees sigma x 1000; shift from sampling_settings, so core
           ModelSamplingSD3 sets it) whose diffusion_model is SanaDiffusionModel around our DiT.
    CLIP   comfy.sd.CLIP whose cond_stage_model runs Gemma-2 with SANA's recipe.
    VAE    SanaVAE, a comfy.sd.VAE around our DC-AE.
    LATENT raw DC-AE latents; SanaLatentFormat scales by 0.41407 around sampling.
"""
import weakref

import torch

try:  # ComfyUI's own modules: this file runs inside ComfyUI only
    import comfy.conds
    import comfy.float
    import comfy.latent_formats
    import comfy.lora
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.patcher_extension
    import comfy.samplers
    import comfy.sd
    import comfy.supported_models_base
except ImportError as error:
    raise ImportError("sana_nodes.comfy_family builds SANA's MODEL / CLIP / VAE from ComfyUI's classes and runs only "
                      "inside ComfyUI; without ComfyUI use sana_core (SanaPipeline) or sana-run") from error

from sana_core import samplers
from sana_core.autoencoder import SCALING_FACTOR
from sana_core.controlnet import prepare_controls
from sana_core.inpaint import LatentInpaint, latent_mask
from sana_core.presets import defaults_for
from sana_core.resolution import LATENT_FACTOR
from sana_core.runtime import fingerprint

from . import conditioning, controlnet, vae
from .sampling import PAG_OPTION

SPRINT_GUIDANCE = 4.5  # Sana-Sprint's embedded guidance when no SANA SAMPLER set one (KSampler)
GUIDANCE_OPTION = "sana_guidance"  # transformer_options key: Sprint's embedded guidance scale
PERTURB_OPTION = "sana_perturbed_layers"  # transformer_options key: blocks run with identity self-attention
MASK_WRAPPER = "sana_latent_mask"  # key of the OUTER_SAMPLE wrapper that max-pools noise masks to the latent grid

# The DC-AE whose fitted latent -> RGB projection the previews use: the most recently loaded one.
_preview_source = None


def set_preview_source(dcae) -> None:
    global _preview_source
    _preview_source = weakref.ref(dcae)


class SanaLatentFormat(comfy.latent_formats.LatentFormat):
    latent_channels = 32
    scale_factor = SCALING_FACTOR

    @property
    def latent_rgb_factors(self):  # [32][3]: the loaded DC-AE's fitted projection (None before one is loaded)
        return self._projection(0)

    @property
    def latent_rgb_factors_bias(self):  # [3]
        return self._projection(1)

    @staticmethod
    def _projection(part: int):
        dcae = _preview_source() if _preview_source is not None else None
        return None if dcae is None else dcae.preview_projection()[part].tolist()


class SanaModelConfig(comfy.supported_models_base.BASE):
    unet_config = {"disable_unet_model_creation": True}
    unet_extra_config = {}
    latent_format = SanaLatentFormat
    memory_usage_factor = 1.0

    def __init__(self, transformer):
        super().__init__(self.unet_config)
        shift = defaults_for(transformer.config)["shift"] or 3.0  # Sprint (no shift of its own): the 1.6B's
        self.sampling_settings = {"shift": shift, "multiplier": samplers.NUM_TRAIN_TIMESTEPS}
        self.unet_config["dtype"] = transformer.dtype


class SanaDiffusionModel(torch.nn.Module):
    """ComfyUI's diffusion_model interface around SanaTransformer (weights under `transformer.`).

    Within a sampling run, each batch of conditionings (ComfyUI names them by uuids that are new in every
    run: transformer_options["uuids"]) gets its caption side (caption embedder and every block's
    cross-attention k/v) computed once, and its DiT call replayed from a CUDA graph as SanaSampler's is
    (the host's sana_core.runtime.Runtime: captured at the second step, eager where graphs cannot serve). A batch that
    shares no conditioning with the cached ones starts a new cache."""

    def __init__(self, transformer, runtime):
        super().__init__()
        self.transformer, self.runtime = transformer, runtime
        self._steps = {}  # (uuids, cond_or_uncond, shapes, options) -> GraphedStep holding the caption
        self.workers = None  # sana_core.parallel.Workers sharing the DiT calls (SanaModelLoader's gpus)

    @property
    def dtype(self):
        return self.transformer.dtype

    def forward(self, x, timesteps, context, attention_mask=None, control=None, transformer_options={}, **kwargs):
        """x (B, 32, h, w) scaled latent; timesteps (B,) sigma x 1000; context (B, T, 2304) Gemma-2
        captions with attention_mask (B, T); control: what SANA ControlNets' get_control returned (their
        hints, strengths: nodes/controlnet.py), given to the DiT prepared for this batch's captions; returns the
        velocity (B, 32, h, w)."""
        config, batch = self.transformer.config, x.shape[0]
        controls = controlnet.active_controls(control)
        transformer = self.transformer if self.workers is None else self.workers.transformer(self.transformer)
        if controls and self.workers is not None:
            raise ValueError("SanaModelLoader: a ControlNet is applied, which the worker processes on the other GPUs "
                             "cannot carry yet: set the loader's gpus to 1 to sample with ControlNets")
        scale = float(transformer_options.get(GUIDANCE_OPTION, SPRINT_GUIDANCE)) if config.sprint else None
        layers = tuple(transformer_options.get(PERTURB_OPTION, ()))
        uuids = transformer_options.get("uuids")
        key = (tuple(uuids or ()), tuple(transformer_options.get("cond_or_uncond", ())), tuple(context.shape),
               tuple(x.shape), x.dtype, scale, layers, tuple((id(net), float(s)) for net, _, s in controls))
        step = self._steps.get(key) if uuids else None
        if step is None:
            guidance = None if scale is None else torch.full((batch,), scale, device=x.device)
            perturbed = torch.ones(batch, dtype=torch.bool, device=x.device) if layers else None
            caption = transformer.encode_caption(context, attention_mask, device=x.device)
            prepared = prepare_controls(controls, self.transformer, caption, context)

            def dit(x, t, caption=caption, guidance=guidance, perturbed=perturbed, control=prepared):
                return transformer(x, t, caption, None, guidance, perturbed=perturbed, perturbed_layers=layers,
                                   control=control)
            if not uuids:  # no sampling run to cache for
                return dit(x, timesteps.to(x.device))
            if self.workers is not None:  # the collectives are not captured
                step = dit
            else:
                nets = tuple(fingerprint(net) for net, _, _ in controls)  # a graph reads their weights too
                step = self.runtime.graphed(dit, (caption, guidance, perturbed, prepared), module=self.transformer,
                                            key=("comfy-dit", layers, scale is not None, nets),
                                            tokens=batch * x.shape[-2] * x.shape[-1])
            if not any(set(uuids) & set(cached[0]) for cached in self._steps):
                self._steps = {}  # a new run
            self._steps[key] = step
        return step(x, timesteps.to(x.device))

    def clear_device_caches(self) -> None:  # after ComfyUI moved or patched the weights
        self._steps = {}
        self.transformer.clear_device_caches()


class SanaModel(comfy.model_base.BaseModel):
    def __init__(self, managed):
        super().__init__(SanaModelConfig(managed.model), comfy.model_base.ModelType.FLOW, device=managed.load_device)
        self.diffusion_model = SanaDiffusionModel(managed.model, managed.host.runtime)
        self.sana = managed  # the host.ManagedModel (host.unwrap finds it here)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        controlnet.check_controls(kwargs.get("control"), self.diffusion_model.transformer)  # before sampling
        cross_attn = kwargs.get("cross_attn")
        if cross_attn is not None:  # CONDRegular: batched only with captions of the same length, never repeated
            out["c_crossattn"] = comfy.conds.CONDRegular(cross_attn)
            mask = conditioning.caption_mask(cross_attn, kwargs.get("attention_mask"))
            out["attention_mask"] = comfy.conds.CONDRegular(mask)
        return out


def model_patcher(managed):
    """MODEL for a loaded SanaTransformer, with the wrapper that brings noise masks to the latent grid."""
    patcher = comfy.model_patcher.ModelPatcher(SanaModel(managed), load_device=managed.load_device,
                                               offload_device=managed.offload_device)
    patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_LOAD, load_plain_parameters)  # clones keep it
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, MASK_WRAPPER, pool_noise_mask)
    return patcher


def load_plain_parameters(patcher, device_to, *args) -> None:
    """ModelPatcher.load patches on the fly (low VRAM) only the weights of comfy.ops layers, and moves and patches
    other weights only when their module has no child layers and fits: the adaLN tables (blocks.N.scale_shift_table,
    final_layer.scale_shift_table) sit beside child layers and are skipped by every load, and a partial load
    leaves the RMSNorm weights that did not fit on the CPU, their patches (a LoRA's) unapplied. They are small:
    patched (once per load: ModelPatcher's backup says whether) and moved here; unpatch_model restores them."""
    for name, module in patcher.model.named_modules():
        if hasattr(module, "comfy_cast_weights"):
            continue  # comfy.ops layers: ModelPatcher's own
        for attr, param in module.named_parameters(recurse=False):
            key = f"{name}.{attr}"
            if key in patcher.patches:
                if key not in patcher.backup:
                    patcher.patch_weight_to_device(key, device_to=device_to)
            elif device_to is not None:
                param.data = param.data.to(device_to)


def pool_noise_mask(executor, noise, latent_image, sampler, sigmas, denoise_mask=None, *args, **kwargs):
    """OUTER_SAMPLE wrapper (every sampler: KSampler, SamplerCustomAdvanced, SanaSampler): the LATENT's noise_mask
    max-pooled to the latent grid (sana_core.inpaint.latent_mask) before ComfyUI resizes it bilinearly, which
    at 32x would average a stroke thinner than 32 px away."""
    if denoise_mask is not None:
        denoise_mask = latent_mask(denoise_mask, noise.shape[0], *noise.shape[-2:])
    return executor(noise, latent_image, sampler, sigmas, denoise_mask, *args, **kwargs)
DIT_PREFIX = "diffusion_model.transformer."  # the DiT's weights in a SanaModel's state dict


def share_with_workers(patcher, workers) -> None:
    """Several GPUs (SanaModelLoader's gpus): the DiT calls of this MODEL and of its clones go to `workers`
    (sana_core.parallel.Workers). They get the weight patches of the clone ComfyUI loaded last (a LoRA), as
    patched weights computed as ModelPatcher computes its own; the clone being sampled (ComfyUI's loop) and
    the loaded one are checked for patches the workers cannot apply."""
    patcher.model.diffusion_model.workers = workers
    CallbacksMP = comfy.patcher_extension.CallbacksMP
    tracked = {"loaded": weakref.ref(patcher), "running": None}  # weak: the workers stop when the model goes

    def track(role):
        return lambda p, *_: tracked.__setitem__(role, weakref.ref(p))
    patcher.add_callback(CallbacksMP.ON_LOAD, track("loaded"))
    patcher.add_callback(CallbacksMP.ON_PRE_RUN, track("running"))
    patcher.add_callback(CallbacksMP.ON_CLEANUP, lambda *_: tracked.__setitem__("running", None))
    workers.weights = lambda: patched_weights(tracked["loaded"](), tracked["running"] and tracked["running"]())


def patched_weights(patcher, running=None) -> tuple:
    """(patches version, {name in the DiT: () -> patched weight}) of `patcher` (the loaded clone), or an error
    naming the patches on it or on `running` (the clone being sampled) that worker processes cannot apply."""
    for p in (patcher, running):
        cannot = [f"object patches ({', '.join(sorted(set(p.object_patches) - {'model_sampling'}))})"] \
            if p is not None and set(p.object_patches) - {"model_sampling"} else []
        cannot += ["weight wrappers"] * any(p.weight_wrapper_patches.values()) + ["hook patches"] * bool(
            p.hook_patches) if p is not None else []
        if cannot:
            raise ValueError(f"SanaModelLoader: the MODEL carries {' and '.join(cannot)}, which the worker processes "
                             f"on the other GPUs cannot apply: set the loader's gpus to 1, or take out the node that "
                             f"adds them")
    if patcher is None:
        return None, {}

    def make(key):
        weight, _, convert = comfy.model_patcher.get_key_weight(patcher.model, key)
        original = patcher.backup[key].weight if key in patcher.backup else weight  # the file's weight
        out = comfy.model_management.cast_to_device(original, patcher.load_device, torch.float32, copy=True)
        out = comfy.lora.calculate_weight(patcher.patches[key], convert(out, inplace=True) if convert else out, key)
        return comfy.float.stochastic_rounding(out, weight.dtype, seed=comfy.model_patcher.string_to_seed(key))
    return patcher.patches_uuid, {key[len(DIT_PREFIX):]: (lambda key=key: make(key))
                                  for key, patches in patcher.patches.items() if key.startswith(DIT_PREFIX) and patches}


# ---------------------------------------------------------------------------------------------- CLIP

class SanaTokenizer:
    """CLIP.tokenize's object: SANA tokenizes inside its encoder (instruction, 300-token window), so the
    'tokens' are the text."""

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        return text

    def state_dict(self):
        return {}


class SanaTextModel(torch.nn.Module):
    """CLIP.cond_stage_model: Gemma-2 (weights under `gemma.`) with SANA's recipe: empty text without the
    instruction (CLIPTextEncode cannot tell a negative from a positive), any other text with it."""

    def __init__(self, managed):
        super().__init__()
        self.gemma = managed.model.on_device
        self.sana = managed

    def reset_clip_options(self):
        pass

    def set_clip_options(self, options):
        pass

    def encode_token_weights(self, text):
        emb, mask = conditioning.encode_text(self.sana, text, bool(text.strip()))
        return emb, None, {"attention_mask": mask}


def clip(managed):
    """CLIP for a loaded TextEncoder."""
    out = comfy.sd.CLIP(no_init=True)
    out.cond_stage_model = SanaTextModel(managed)
    out.tokenizer = SanaTokenizer()
    out.patcher = managed.patcher
    out.layer_idx, out.tokenizer_options, out.use_clip_schedule, out.apply_hooks_to_conds = None, {}, False, None
    return out


# ----------------------------------------------------------------------------------------------- VAE

class SanaVAE(comfy.sd.VAE):
    """comfy.sd.VAE around our DC-AE: raw latents in and out; decode and encode tile when the image would not
    fit (decided before), decode_tiled and encode_tiled are our exact tilings, encode pads the image to
    multiples of 32 (replicating its edges) instead of cropping it."""

    def __init__(self, managed):
        dcae = managed.model
        self.sana = managed
        self.first_stage_model = dcae
        self.patcher = managed.patcher
        self.device, self.output_device = managed.load_device, comfy.model_management.intermediate_device()
        self.vae_dtype = dcae.dtype
        self.latent_channels, self.latent_dim, self.output_channels = dcae.latent_channels, 2, 3
        self.downscale_ratio = self.upscale_ratio = dcae.spatial_compression
        self.memory_used_decode = lambda shape, dtype: dcae.activation_bytes(shape[0], *shape[2:])
        self.memory_used_encode = lambda shape, dtype: dcae.encode_activation_bytes(shape[0], *shape[2:])
        self.working_dtypes = [torch.bfloat16, torch.float32]
        self.disable_offload, self.not_video, self.crop_input = False, True, False
        self.downscale_index_formula = self.upscale_index_formula = self.extra_1d_channel = None
        self.process_input = lambda image: image * 2.0 - 1.0
        self.process_output = lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)
        set_preview_source(dcae)

    def decode(self, samples_in, vae_options={}):
        return vae.decode(self.sana, samples_in, "VAE Decode")

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        decoder = self.first_stage_model.decoder
        tile = min(t for t in (tile_x, tile_y, 64) if t is not None) * self.upscale_ratio
        overlap = max((overlap or 0) * self.upscale_ratio, decoder.local_halo * decoder.local_scale)  # exact tiles
        return vae.decode(self.sana, samples, "VAE Decode (Tiled)", tile=tile, overlap=overlap)

    def encode(self, pixel_samples):
        return vae.encode(self.sana, pixel_samples, "VAE Encode")

    def encode_tiled(self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        encoder = self.first_stage_model.encoder
        tile = min(t for t in (tile_x, tile_y, 1024) if t is not None)  # pixels
        overlap = max(overlap or 0, encoder.local_halo * encoder.local_scale)  # exact tiles
        return vae.encode(self.sana, pixel_samples, "VAE Encode (Tiled)", tile=tile, overlap=overlap)

    def get_sd(self):
        return self.first_stage_model.state_dict()


# -------------------------------------------------------------------------------- SAMPLER and SIGMAS

def sampler(name: str, guidance: float):
    """SAMPLER running sana_core's `name` sampler. `guidance`: a Sana-Sprint model's embedded guidance
    scale, given to the DiT as transformer_options["sana_guidance"] (other models ignore it).

    flow_dpm_solver's grid starts at sigma(1 - 1/1000) < 1 (0.99967 at shift 3), where both references
    start from the pure noise rather than ComfyUI's sigma0 x noise: so does this SAMPLER when the
    sigmas start there (a whole grid at the model's shift, denoise 1).

    A noise mask is blended by the sampler (sana_core.inpaint) at the solver's sigmas, with ComfyUI's
    convention and its denoise_mask_function (Differential Diffusion), instead of by KSamplerX0Inpaint at the
    sigma the DiT is called with (flow_dpm_solver calls it at the references' integer timesteps)."""
    function = samplers.K_SAMPLERS[name]

    def run(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = dict(extra_args or {})
        options = comfy.model_patcher.create_model_options_clone(extra_args.get("model_options", {}))
        options.setdefault("transformer_options", {})[GUIDANCE_OPTION] = guidance
        extra_args["model_options"] = options
        inpaint = None
        if extra_args.get("denoise_mask") is not None:  # model: KSamplerX0Inpaint, which then blends nothing
            mask_function = options.get("denoise_mask_function")
            mask_at = None if mask_function is None else lambda sigma, mask: mask_function(
                sigma, mask, extra_options={"model": model.inner_model, "sigmas": model.sigmas})
            inpaint = LatentInpaint(extra_args["denoise_mask"], model.latent_image, model.noise, mask_at)
            extra_args["denoise_mask"] = None
        if name == "flow_dpm_solver":
            top = samplers.flow_dpm_solver_sigmas(1, model.inner_model.inner_model.model_sampling.shift)[0][0].item()
            if abs(float(sigmas[0]) - top) <= 1e-6 * top:
                x = model.noise.to(x)  # KSAMPLER's unscaled noise
        return function(model, x, sigmas, extra_args, callback, disable, inpaint=inpaint)
    return comfy.samplers.KSAMPLER(run)


def pag_patch(model, scale: float, layers):
    """MODEL with SANA's perturbed-attention guidance: out = cfg result + scale (cond - perturbed cond),
    the perturbed pass running `layers` with identity self-attention."""
    m = model.clone()
    layers = tuple(layers)

    def post_cfg(args):
        if scale == 0:
            return args["denoised"]
        options = comfy.model_patcher.create_model_options_clone(args["model_options"])
        options.setdefault("transformer_options", {})[PERTURB_OPTION] = layers
        perturbed, = comfy.samplers.calc_cond_batch(args["model"], [args["cond"]], args["input"], args["sigma"],
                                                    options)
        return args["denoised"] + (args["cond_denoised"] - perturbed) * scale

    m.set_model_sampler_post_cfg_function(post_cfg)
    m.model_options.setdefault("transformer_options", {})[PAG_OPTION] = {"scale": scale, "layers": layers}
    return m


# ------------------------------------------------------------------ SanaSampler through ComfyUI's loop

PLAIN_COND_KEYS = {"attention_mask", "pooled_output"}  # what SanaSampler's own loop reads from a conditioning


def core_loop_reason(model, *conditionings) -> str | None:
    """Why SanaSampler must run through ComfyUI's loop (CFGGuider + our SAMPLER and SIGMAS) rather than
    its own for this MODEL and these conditionings: something only ComfyUI's loop honours (combined or
    masked conditionings, timestep ranges, ControlNets, hooks, other nodes' sampler patches, wrappers,
    object patches other than ModelSamplingSD3's). None: its own loop gives the same result (weight
    patches are applied when the MODEL is loaded; the SANA PAG patch and the shift it reads itself)."""
    for conditioning in conditionings:
        if conditioning is None:
            continue
        if len(conditioning) > 1:
            return "combined conditionings"
        extra = {k for k, v in conditioning[0][1].items() if v is not None} - PLAIN_COND_KEYS
        if extra:
            return f"conditioning with {', '.join(sorted(extra))}"
    options = model.model_options
    ours = PAG_OPTION in options.get("transformer_options", {})  # adds one post-CFG function
    if set(options.get("transformer_options", {})) - {PAG_OPTION} or len(options.get("sampler_post_cfg_function", [])) \
            > ours or any(v for k, v in options.items() if k not in ("transformer_options", "sampler_post_cfg_function")):
        return "other nodes' patches in the model options"
    if set(model.object_patches) - {"model_sampling"}:
        return f"object patches ({', '.join(sorted(model.object_patches))})"
    if any(w for wrappers in model.wrappers.values() for key, w in wrappers.items() if key != MASK_WRAPPER):
        return "sampling wrappers"
    return None


def sample(model, positive, negative, latent, noise, *, sampler_name, steps, cfg, pag_scale, pag_layers, shift,
           denoise, seed, callback, mask=None):
    """SanaSampler's sampling through ComfyUI's own loop: raw latent in, raw latent out (mask: the LATENT's
    noise_mask). callback(step, total, x0) after each step."""
    sprint = model.model.diffusion_model.transformer.config.sprint
    if pag_scale and PAG_OPTION not in model.model_options.get("transformer_options", {}):
        model = pag_patch(model, pag_scale, pag_layers)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative if negative is not None else positive)
    guider.set_cfg(1.0 if sprint else cfg)  # Sprint: cfg is the embedded guidance, no negative pass
    if sampler_name == "scm":
        sigmas = samplers.scm_sigmas(steps, denoise)
    else:
        sigmas = samplers.schedule(sampler_name, steps, shift, denoise)
    k_callback = lambda step, x0, x, total: callback(step + 1, total, x0)  # noqa: E731
    out = guider.sample(noise, latent, sampler(sampler_name, cfg), sigmas, denoise_mask=mask, callback=k_callback,
                        disable_pbar=True, seed=seed)
    return out.to(comfy.model_management.intermediate_device())
