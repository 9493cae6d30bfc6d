"""Guided sampling (CFG, PAG, Sana-Sprint's embedded guidance) and the text-to-image pipeline.

`sample_latents` is the guided sampling loop (the ComfyUI sampler node calls it too);
`SanaPipeline` adds prompts, sizes, seeds, image-to-image and decoding around it.
"""
import numpy as np
import torch
import torch.nn.functional as F

from . import cuda_graphs as graphs, resolution, samplers

SAMPLER_STEPS = {"flow_dpm_solver": 20, "flow_euler": 28, "scm": 2}  # default steps per sampler
PAG_SCALE = 2.0  # the official scale when PAG is on (off by default: it costs a third more DiT work)
DECODE_BYTES_PER_PIXEL = 26 * 2**30 / 4096**2  # untiled bf16 DC-AE decode: 26 GiB at 4096 px (measured)


def pairing_error(config, sampler: str, steps: int) -> str | None:
    """Why `sampler` cannot drive this model, or None when the pairing works."""
    if sampler not in samplers.SAMPLERS:
        return f"unknown sampler {sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}"
    pairings = ("supported pairings: SANA / SANA 1.5 models with 'flow_dpm_solver' (20 steps) or 'flow_euler' "
                "(28 steps); Sana-Sprint models with 'scm' (1-4 steps)")
    if config.sprint and sampler != "scm" and steps > 1:
        return (f"{config.variant} is a Sana-Sprint (consistency-distilled) model: it is sampled with 'scm' in "
                f"1-4 steps, not with {sampler!r} over {steps} steps; {pairings}")
    if not config.sprint and sampler == "scm":
        return (f"the 'scm' sampler needs a Sana-Sprint model (one with a guidance embedder), and {config.variant} "
                f"is not one; {pairings}")
    return None


def defaults_for(config, width: int | None = None, height: int | None = None) -> dict:
    """Per-variant defaults: dict(steps, cfg, shift, sampler, pag_layers, pag_scale).

    Flow shift 4.0 for the 0.6B at 1024 px, 3.0 for 512 px, the 1.6B, Sana 1.5 and 2K, 6.0 for 4K
    (the official configs). PAG is off (pag_scale 0); when asked for, the official scale is 2.0 on
    layer 8 of the 1.6B family and layer 14 of the 0.6B (other depths: 2/5 of the way in)."""
    if config.sprint:
        return dict(steps=2, cfg=4.5, shift=None, sampler="scm", pag_layers=(), pag_scale=0.0)
    variant = config.variant
    if variant.endswith("4k"):
        shift = 6.0
    elif "0.6b" in variant and (width or 1024) * (height or 1024) > 724 ** 2:  # the 1024 px release
        shift = 4.0
    else:
        shift = 3.0
    pag_layer = {20: 8, 28: 14}.get(config.depth, config.depth * 2 // 5)
    return dict(steps=20, cfg=4.5, shift=shift, sampler="flow_dpm_solver", pag_layers=(pag_layer,), pag_scale=0.0)


def base_resolution(config) -> int:
    """Side in pixels of the model's training size: picks the aspect-ratio bin table and the default size."""
    if config.variant.endswith("4k"):
        return 4096
    if config.variant.endswith("2k"):
        return 2048
    if config.base_size:
        return min(resolution.ASPECT_RATIO_BINS, key=lambda b: abs(b - config.base_size * resolution.LATENT_FACTOR))
    return 1024


def sample_latents(transformer, noise, cond, cond_mask, uncond=None, uncond_mask=None, *, sampler, steps, cfg,
                   pag_scale=0.0, pag_layers=(), shift, denoise=1.0, latent=None, seed=0, callback=None,
                   integer_timesteps=True, cuda_graphs=None) -> torch.Tensor:
    """Guided sampling: returns the clean float32 latent (B, 32, h, w) on the transformer's device.

    noise (B, 32, h, w) unit variance (any device); cond/uncond (1 or B, T, D) caption embeddings with
    masks (1 or B, T). CFG runs [uncond, cond] in one batched forward (skipped when cfg == 1); PAG
    (pag_scale != 0) adds a cond copy whose self-attention is the identity on V in `pag_layers`:
    out = u + cfg (c - u) + pag (c - p). Sprint models get no CFG batch: cfg is their embedded
    guidance scale. scm's fresh noise comes from torch.Generator().manual_seed(seed), continued past
    one noise-sized draw, as in diffusers' SanaSprintPipeline, whose generator first makes the
    initial noise: a seed gives the same image here, in SanaPipeline, in ComfyUI and in diffusers.
    The caption side of the cross-attention is computed once; on a GPU each step (the whole guided
    call) is replayed from a CUDA graph (sana_core.cuda_graphs) unless cuda_graphs=False or the
    environment has SANA_CUDA_GRAPHS=0 (None: the environment decides).
    """
    config = transformer.config
    samplers.check_steps(sampler, steps, denoise)
    error = pairing_error(config, sampler, steps)
    if error:
        raise ValueError(error)
    param = next(transformer.parameters())
    device, dtype = param.device, param.dtype
    batch = noise.shape[0]
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
        perturbed[-batch:] = True  # the last group: cond with identity self-attention
    layers = tuple(pag_layers) if use_pag else ()
    scales = torch.tensor([cfg, pag_scale], dtype=torch.float32, device=device)  # tensors: a graph serves any value

    def velocity(x, t, caption, guidance, perturbed, scales):  # x (B, 32, h, w) float32, t (B,) flow time
        out = transformer(torch.cat([x] * n).to(dtype), (t * samplers.NUM_TRAIN_TIMESTEPS).repeat(n), caption,
                          None, guidance, perturbed=perturbed, perturbed_layers=layers)
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
            caption = transformer.encode_caption(context.to(device), context_mask.to(device))  # once per sample
            step = graphs.GraphedStep(velocity, (caption, guidance, perturbed, scales), module=transformer,
                                      key=("velocity", n, use_cfg, use_pag, layers), enabled=cuda_graphs,
                                      tokens=n * batch * noise.shape[-2] * noise.shape[-1])
            return samplers.sample(step, noise.to(device), sampler=sampler, steps=steps, shift=shift,
                                   denoise=denoise, latent=latent, generator=generator, callback=callback,
                                   integer_timesteps=integer_timesteps)
    except BaseException:
        context = context_mask = guidance = perturbed = noise = latent = cond = uncond = caption = step = None
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


def text_encoder_should_offload(free_bytes, config, element_size, forwards, width, height) -> bool:
    """Whether free GPU memory is short of sampling plus an untiled decode (estimates): then the text
    encoder (~5 GB) moves to the CPU. forwards: latents per DiT call (batch x CFG/PAG groups)."""
    tokens = (width // resolution.LATENT_FACTOR) * (height // resolution.LATENT_FACTOR)
    dit = forwards * tokens * config.width * element_size * 24  # residual stream + 5x-wide Mix-FFN, with slack
    decode = DECODE_BYTES_PER_PIXEL * width * height * (2 if element_size >= 4 else 1)
    return free_bytes < dit + decode + 2**30


class SanaPipeline:
    """Text-to-image (and image-to-image) with the three SANA components.

        pipe = SanaPipeline(load_transformer(...), load_autoencoder(...), load_text_encoder(...))
        images = pipe("a red fox in the snow", seed=1)            # list of PIL images

    devices=[0, 1]: one image on several GPUs (sana_core.parallel: worker processes, or torchrun's);
    plan (a parallel.Plan) and timeout (seconds per collective) tune it.
    """

    def __init__(self, transformer, autoencoder, text_encoder, *, devices=None, plan=None, timeout=None):
        self.transformer = transformer
        self.autoencoder = autoencoder
        self.text_encoder = text_encoder
        self._text_encoder_offloaded = False
        self.parallel = None  # sana_core.parallel.Session when devices are given
        if devices is not None:
            from . import parallel
            self.parallel = parallel.start(self, devices, plan=plan, timeout=timeout or parallel.DEFAULT_TIMEOUT)

    def close(self):
        """Stops the worker processes of devices=[...] (nothing to do otherwise)."""
        if self.parallel is not None:
            self.parallel.close()

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def __call__(self, prompt, negative_prompt="", width=None, height=None, aspect_ratio=None, steps=None, cfg=None,
                 pag_scale=None, flow_shift=None, sampler=None, seed=0, batch_size=1, latents=None, image=None,
                 denoise=1.0, output="pil", callback=None, integer_timesteps=True, pag_layers=None):
        """Make images. Returns a list of PIL images (output="pil"), a float tensor (B, 3, H, W) in
        [0, 1] on the CPU (output="tensor"), or the clean latent (output="latent").

        prompt: a string or a list (batch_size images each). Size: width and height (multiples of 32,
        used as given), or aspect_ratio ('16:9' or (w, h)) for the nearest trained size, or neither
        (the model's square size, or the input image's size). None for steps/cfg/pag_scale/
        flow_shift/sampler/pag_layers takes defaults_for(model). seed: the initial noise is
        torch.randn([B, 32, H/32, W/32], generator=torch.manual_seed(seed)) on the CPU, as in ComfyUI
        (`latents` replaces it). image (PIL or (B, 3, H, W) in [0, 1]) with denoise < 1:
        image-to-image. callback(step, total, x0) after each step; raising from it stops cleanly.
        """
        if self.parallel is not None:  # the worker processes make this call too; Cancel reaches them all
            callback = self.parallel.begin(dict(locals()), callback)
        if output not in ("pil", "tensor", "latent"):
            raise ValueError(f"output must be 'pil', 'tensor' or 'latent', got {output!r}")
        config = self.transformer.config
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive whole number, got {batch_size!r}")
        if image is not None and denoise >= 1.0:
            raise ValueError("an input image needs denoise below 1 (e.g. 0.6): denoise=1 starts from pure noise "
                             "and would ignore the image")
        settings = self.resolve_settings(width=width, height=height, aspect_ratio=aspect_ratio, steps=steps, cfg=cfg,
                                         pag_scale=pag_scale, flow_shift=flow_shift, sampler=sampler,
                                         pag_layers=pag_layers, image=image)
        width, height, sampler, steps = settings["width"], settings["height"], settings["sampler"], settings["steps"]
        cfg, pag_scale, pag_layers, shift = (settings[k] for k in ("cfg", "pag_scale", "pag_layers", "shift"))
        samplers.check_steps(sampler, steps, denoise)
        batch = len(prompts) * batch_size
        device = self.device

        shape = (batch, 32, height // resolution.LATENT_FACTOR, width // resolution.LATENT_FACTOR)
        if latents is None:  # ComfyUI's noise: one CPU draw for the whole batch
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents have shape {list(latents.shape)}, expected {list(shape)} for {batch} "
                                 f"image(s) of {width}x{height}")
            noise = latents.float()
        clean = None
        if image is not None:
            clean = self._encode_image(image, width, height, batch)

        cond, cond_mask, uncond, uncond_mask = self._encode_prompts(prompts, negative_prompt, batch_size,
                                                                    need_uncond=not config.sprint and cfg != 1.0)
        self._offload_text_encoder_if_short(batch, width, height, cfg, pag_scale)
        latent = sample_latents(self.transformer, noise, cond, cond_mask, uncond, uncond_mask, sampler=sampler,
                                steps=steps, cfg=cfg, pag_scale=pag_scale, pag_layers=pag_layers, shift=shift,
                                denoise=denoise, latent=clean, seed=seed, callback=callback,
                                integer_timesteps=integer_timesteps,
                                cuda_graphs=False if self.parallel is not None else None)
        if output == "latent":
            return latent
        with torch.no_grad():
            self._release_graphs_if_short(latent)
            pixels = self.autoencoder.decode_auto(latent)  # float32 latent: it unscales before casting
        if not torch.isfinite(pixels).all():
            raise FloatingPointError("the autoencoder produced NaN or infinite pixels; it probably overflowed in "
                                     "float16: load it in bfloat16 or float32")
        images = (pixels.float() / 2 + 0.5).clamp_(0, 1)  # (B, 3, H, W) in [0, 1], on the device
        return images.cpu() if output == "tensor" else to_pil(images)

    def resolve_settings(self, *, width=None, height=None, aspect_ratio=None, steps=None, cfg=None, pag_scale=None,
                         flow_shift=None, sampler=None, pag_layers=None, image=None) -> dict:
        """The settings a call with these arguments uses (defaults filled in, size checked or binned):
        dict(width, height, sampler, steps, cfg, pag_scale, pag_layers, shift)."""
        config = self.transformer.config
        width, height = self._size(width, height, aspect_ratio, image)
        defaults = defaults_for(config, width, height)
        sampler = sampler or defaults["sampler"]
        if sampler not in samplers.SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}")
        if steps is None:
            steps = defaults["steps"] if sampler == defaults["sampler"] else SAMPLER_STEPS[sampler]
        samplers.check_steps(sampler, steps, 1.0)
        error = pairing_error(config, sampler, steps)
        if error:
            raise ValueError(error)
        if sampler == "scm":
            flow_shift = None  # TrigFlow times have no shift
        elif flow_shift is None:
            flow_shift = defaults["shift"] or 3.0  # a Sprint model with a 1-step flow sampler
        return dict(width=width, height=height, sampler=sampler, steps=steps,
                    cfg=defaults["cfg"] if cfg is None else cfg,
                    pag_scale=defaults["pag_scale"] if pag_scale is None else pag_scale,
                    pag_layers=defaults["pag_layers"] if pag_layers is None else tuple(pag_layers), shift=flow_shift)

    def _size(self, width, height, aspect_ratio, image):
        if aspect_ratio is not None:
            if width is not None or height is not None:
                raise ValueError("give either width and height (used as given) or aspect_ratio (binned to the "
                                 "nearest trained size), not both")
            return resolution.binned_size(aspect_ratio, base_resolution(self.transformer.config))
        if (width is None) != (height is None):
            raise ValueError("give both width and height, or aspect_ratio, or neither (the model's square size)")
        if width is None and image is not None:
            width, height = image_size(image)
            try:
                resolution.check_size(width, height)
            except ValueError as e:
                raise ValueError(f"the input image is {width}x{height}: {e}; or pass width and height to resize "
                                 f"it") from None
        if width is None:
            side = base_resolution(self.transformer.config)
            return side, side
        resolution.check_size(width, height)
        return width, height

    def _encode_prompts(self, prompts, negative_prompt, batch_size, need_uncond):
        device = self.device
        if self._text_encoder_offloaded and device.type != "cpu":
            graphs.release()  # memory is short (why it was offloaded): the graphs' pool makes room for Gemma
            self.text_encoder.to(device)
            self._text_encoder_offloaded = False
        with torch.no_grad():
            cond, cond_mask = self.text_encoder.encode(prompts)
            uncond = uncond_mask = None
            if need_uncond:
                uncond, uncond_mask = self.text_encoder.encode([negative_prompt], instruction=False)
        cond = cond.repeat_interleave(batch_size, dim=0).to(device)
        cond_mask = cond_mask.repeat_interleave(batch_size, dim=0).to(device)
        if need_uncond:
            uncond, uncond_mask = uncond.to(device), uncond_mask.to(device)
        return cond, cond_mask, uncond, uncond_mask

    def _offload_text_encoder_if_short(self, batch, width, height, cfg, pag_scale):
        """text_encoder.offload() when text_encoder_should_offload says so (never on the CPU)."""
        device = self.device
        if device.type != "cuda" or torch.device(self.text_encoder.device).type != "cuda":
            return
        config = self.transformer.config
        forwards = batch * (1 + (cfg != 1.0 and not config.sprint) + (pag_scale != 0))
        free, _ = torch.cuda.mem_get_info(device)
        if text_encoder_should_offload(free, config, next(self.transformer.parameters()).element_size(), forwards,
                                       width, height):
            self.text_encoder.offload()
            self._text_encoder_offloaded = True
            torch.cuda.empty_cache()

    def _release_graphs_if_short(self, latent):
        """The cached CUDA graphs' memory pool looks free to decode_auto but is not: give it back when an
        untiled decode (estimate) would need it."""
        device = torch.device(self.autoencoder.device)
        held = graphs.held_bytes(device)
        if device.type == "cuda" and held:
            need = DECODE_BYTES_PER_PIXEL * latent.shape[0] * latent.shape[-2] * latent.shape[-1] \
                * resolution.LATENT_FACTOR ** 2
            if graphs.free_bytes(device) - held < need:
                graphs.release()

    def _encode_image(self, image, width, height, batch):
        pixels = image_to_tensor(image)  # (b, 3, H, W) in [0, 1]
        if pixels.shape[-2:] != (height, width):
            pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False,
                                   antialias=True)
        if pixels.shape[0] not in (1, batch):
            raise ValueError(f"{pixels.shape[0]} input images for a batch of {batch}: give 1 or {batch}")
        ae = self.autoencoder
        with torch.no_grad():
            latent = ae.encode(pixels * 2 - 1).float()
        return latent.expand(batch, -1, -1, -1).to(self.device)


def image_size(image) -> tuple[int, int]:
    if isinstance(image, torch.Tensor):
        return image.shape[-1], image.shape[-2]
    return image.size  # PIL


def image_to_tensor(image) -> torch.Tensor:
    """PIL image or tensor (3, H, W) / (B, 3, H, W) in [0, 1] -> float32 (B, 3, H, W) on the CPU."""
    if isinstance(image, torch.Tensor):
        pixels = image.float().cpu()
        return pixels[None] if pixels.dim() == 3 else pixels
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [0, 1] on any device -> PIL images, rounded as diffusers does (half to even, in
    float32) but on the images' device, so that only bytes come to the CPU."""
    from PIL import Image
    array = (images.float() * 255).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray(a) for a in array]
