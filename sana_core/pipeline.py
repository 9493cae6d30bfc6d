"""The text-to-image pipeline: prompts, sizes, seeds, image-to-image and decoding around
`guidance.sample_latents`, with a `runtime.Runtime` for CUDA graphs and memory decisions.
"""
import numpy as np
import torch
import torch.nn.functional as F

from . import resolution, samplers
from .controlnet import encode_hint
from .guidance import sample_latents
from .inpaint import DEFAULT_FEATHER, composite
from .presets import SAMPLER_STEPS, base_resolution, defaults_for, pairing_error
from .runtime import TEXT_RESERVE, Runtime, sampling_bytes, vram_bytes
from .text_encoder import not_finite_error


class SanaPipeline:
    """Text-to-image (and image-to-image) with the three SANA components.

        pipe = SanaPipeline(load_transformer(...), load_autoencoder(...), load_text_encoder(...))
        images = pipe("a red fox in the snow", seed=1)            # list of PIL images

    runtime: the Runtime that owns CUDA graphs and memory decisions (default: a new one, graphs on unless
    SANA_CUDA_GRAPHS=0). devices=[0, 1]: one image on several GPUs (sana_core.parallel: worker
    processes, or torchrun's; no CUDA graphs then, unless SANA_PARALLEL_CUDA_GRAPHS=1 on GPUs); plan (a
    parallel.Plan) and timeout (seconds per collective) tune it.
    max_vram: low VRAM, the GPU memory this pipeline may use: a number of GiB (7, 7.5), of bytes (above 1024)
    or a string ('7GiB', '6000MiB'). The models may then be loaded on the CPU (load_*(..., device="cpu")); each
    phase puts its model on the GPU (Runtime.place): Gemma for encoding, offloaded after it; the DiT whole when it
    fits, else with its blocks streamed from pinned CPU memory (the next one prefetched while one computes;
    quantized files stream quantized); the decode tiled to fit. Images are the same as without it.
    A MemoryError says what does not fit and what to change.
    """

    def __init__(self, transformer, autoencoder, text_encoder, *, runtime=None, devices=None, plan=None,
                 timeout=None, max_vram=None):
        self.transformer = transformer
        self.autoencoder = autoencoder
        self.text_encoder = text_encoder
        self.runtime = Runtime() if runtime is None else runtime
        self._device = None  # low VRAM: the GPU the phases are placed on
        if max_vram is not None:
            if devices is not None:
                raise ValueError("max_vram caps one GPU's memory; it does not combine with devices=[...]: give one")
            self.runtime.max_vram = vram_bytes(max_vram)
            device = transformer.device
            if device.type != "cuda" and not torch.cuda.is_available():
                raise ValueError("max_vram caps GPU memory, but no CUDA GPU is available here: leave it out")
            self._device = device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
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
        return self._device or next(self.transformer.parameters()).device

    def _place(self, model, reserve=0) -> None:
        """Low VRAM: `model` on the GPU for its phase (Runtime.place); nothing to do otherwise."""
        if self._device is not None:
            self.runtime.place(model, self._device, reserve=reserve)

    def load_lora(self, path, strength: float = 1.0):
        """Merge a LoRA file into the transformer (stacks with those loaded before; a negative strength
        subtracts it). Returns the sana_core.lora.Lora; its `unmatched` lists the keys that matched nothing."""
        from .lora import apply_lora
        self.runtime.offload(self.transformer)  # low VRAM: merged into the weights' CPU copies
        return apply_lora(self.transformer, path, strength)

    def unload_loras(self) -> None:
        """Take every LoRA out: the transformer's original weights back, bit for bit."""
        from .lora import unload_loras
        self.runtime.offload(self.transformer)
        unload_loras(self.transformer)

    def __call__(self, prompt, negative_prompt="", width=None, height=None, aspect_ratio=None, steps=None, cfg=None,
                 pag_scale=None, flow_shift=None, sampler=None, seed=0, batch_size=1, latents=None, image=None,
                 denoise=1.0, output="pil", callback=None, integer_timesteps=True, pag_layers=None, controlnet=None,
                 control_image=None, control_scale=1.0, mask=None, feather=DEFAULT_FEATHER, composite_original=True):
        """Make images. Returns a list of PIL images (output="pil"), a float tensor (B, 3, H, W) in
        [0, 1] on the CPU (output="tensor"), or the clean latent (output="latent").

        prompt: a string or a list (batch_size images each). Size: width and height (multiples of 32,
        used as given), or aspect_ratio ('16:9' or (w, h)) for the nearest trained size, or neither
        (the model's square size, or the input image's size). None for steps/cfg/pag_scale/
        flow_shift/sampler/pag_layers takes defaults_for(model). seed: the initial noise is
        torch.randn([B, 32, H/32, W/32], generator=torch.manual_seed(seed)) on the CPU, as in ComfyUI
        (`latents` replaces it). image (PIL or (B, 3, H, W) in [0, 1]) with denoise < 1:
        image-to-image. mask (PIL, white = repaint, or (H, W) / (B, H, W) / (B, 1, H, W) in [0, 1]; resized with the
        image) with image: inpainting / outpainting (sana_core.inpaint), any denoise (1: the masked part from
        pure noise); the original pixels are put back outside the mask, feathered over `feather` pixels, unless
        composite_original=False. callback(step, total, x0) after each step; raising from it stops cleanly.
        controlnet (load_controlnet) with control_image (PIL or (B, 3, H, W) in [0, 1], e.g. HED edges; resized to
        the output size) and control_scale (what the ControlNet adds is multiplied by it).
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
        if (controlnet is None) != (control_image is None):
            raise ValueError("a ControlNet needs both controlnet= (load_controlnet) and control_image= (its hint)")
        if mask is not None and image is None:
            raise ValueError("a mask needs the image it applies to (image=)")
        if image is not None and mask is None and denoise >= 1.0:
            raise ValueError("an input image needs denoise below 1 (e.g. 0.6): denoise=1 starts from pure noise "
                             "and would ignore the image (or give a mask: inpainting)")
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
        clean = pixels = None
        self._place(self.autoencoder)
        if image is not None:
            pixels = resized_image(image, width, height, batch)  # (1 or B, 3, H, W) in [0, 1]
            with torch.no_grad():
                clean = self.runtime.encode(self.autoencoder, pixels * 2 - 1).expand(batch, -1, -1, -1).to(device)
        if mask is not None:
            mask = resized_mask(mask, width, height)  # (1 or B, 1, H, W) in [0, 1]

        cond, cond_mask, uncond, uncond_mask = self._encode_prompts(prompts, negative_prompt, batch_size,
                                                                    need_uncond=not config.sprint and cfg != 1.0)
        callback = _checking_captions(callback, cond, uncond, self.text_encoder.dtype)
        controls = () if controlnet is None else [
            (controlnet, encode_hint(self.autoencoder, control_image, width, height), control_scale)]
        forwards = batch * (1 + (cfg != 1.0 and not config.sprint) + (pag_scale != 0))
        if self._device is None:
            self._text_encoder_offloaded |= self.runtime.offload_text_encoder_if_short(
                self.text_encoder, self.transformer, forwards=forwards, width=width, height=height)
        else:  # room for a step's activations beside the DiT's weights
            tokens = shape[-2] * shape[-1]
            self._place(self.transformer, sampling_bytes(config, forwards, tokens, self.transformer.dtype.itemsize))
        latent = sample_latents(self.transformer, noise, cond, cond_mask, uncond, uncond_mask, sampler=sampler,
                                steps=steps, cfg=cfg, pag_scale=pag_scale, pag_layers=pag_layers, shift=shift,
                                denoise=denoise, latent=clean, mask=mask, seed=seed, callback=callback,
                                integer_timesteps=integer_timesteps, controls=controls,
                                runtime=self.runtime if self.parallel is None or self.parallel.graphs() else None)
        if output == "latent":
            return latent
        self._place(self.autoencoder)
        with torch.no_grad():
            decoded = self.runtime.decode(self.autoencoder, latent)  # float32 latent: it unscales before casting
        finite = torch.isfinite(decoded).all()  # read once the images are on the host: no wait of its own
        images = (decoded.float() / 2 + 0.5).clamp_(0, 1)  # (B, 3, H, W) in [0, 1], on the device
        if mask is not None and composite_original:
            images = composite(pixels.to(images.device), images, mask.to(images.device), feather)
        images = images.cpu() if output == "tensor" else to_pil(images)
        if not finite:
            raise FloatingPointError("the autoencoder produced NaN or infinite pixels; it probably overflowed in "
                                     "float16: load it in bfloat16 or float32")
        return images

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
        if self._device is not None:  # low VRAM: Gemma on the GPU for encoding only
            self._place(self.text_encoder, TEXT_RESERVE)
            try:
                return self._encode_prompts_on(device, prompts, negative_prompt, batch_size, need_uncond)
            finally:
                self.runtime.offload(self.text_encoder)
        if self._text_encoder_offloaded and device.type != "cpu":
            self.runtime.release()  # memory is short (why it was offloaded): the graphs' pool makes room for Gemma
            self.text_encoder.to(device)
            self._text_encoder_offloaded = False
        return self._encode_prompts_on(device, prompts, negative_prompt, batch_size, need_uncond)

    def _encode_prompts_on(self, device, prompts, negative_prompt, batch_size, need_uncond):
        with torch.no_grad():
            cond, cond_mask = self.runtime.encode_text(self.text_encoder, prompts, check=False)  # see __call__
            uncond = uncond_mask = None
            if need_uncond:
                uncond, uncond_mask = self.runtime.encode_text(self.text_encoder, [negative_prompt], instruction=False,
                                                               check=False)
        cond = cond.repeat_interleave(batch_size, dim=0).to(device)
        cond_mask = cond_mask.repeat_interleave(batch_size, dim=0).to(device)
        if need_uncond:
            uncond, uncond_mask = uncond.to(device), uncond_mask.to(device)
        return cond, cond_mask, uncond, uncond_mask


def resized_image(image, width: int, height: int, batch: int) -> torch.Tensor:
    """PIL image or tensor in [0, 1] -> float32 (1 or batch, 3, height, width) on the CPU (resized if need be)."""
    pixels = image_to_tensor(image)  # (b, 3, H, W) in [0, 1]
    if pixels.shape[-2:] != (height, width):
        pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    if pixels.shape[0] not in (1, batch):
        raise ValueError(f"{pixels.shape[0]} input images for a batch of {batch}: give 1 or {batch}")
    return pixels


def resized_mask(mask, width: int, height: int) -> torch.Tensor:
    """PIL image (white = 1) or tensor (H, W) / (B, H, W) / (B, 1, H, W) in [0, 1] -> float32 (B, 1, height, width)
    on the CPU (resized bilinearly if need be)."""
    if isinstance(mask, torch.Tensor):
        if mask.dim() not in (2, 3, 4) or (mask.dim() == 4 and mask.shape[1] != 1):
            raise ValueError(f"mask has shape {list(mask.shape)}: give (height, width), (batch, height, width) or "
                             f"(batch, 1, height, width) with values in [0, 1]")
        mask = mask.float().cpu().reshape(-1, 1, *mask.shape[-2:])
    else:
        mask = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]
    if mask.shape[-2:] != (height, width):
        mask = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
    return mask.clamp(0, 1)


def _checking_captions(callback, cond, uncond, dtype):
    """callback(step, total, x0) that first, at step 1, raises text_encoder.not_finite_error when a caption holds
    NaN/inf: read then, the flag costs no wait of its own (the first step is already queued behind the encode),
    and it comes before the sampler's own NaN checks, which would blame the latent."""
    finite = torch.isfinite(cond).all()  # stays on the device until read
    if uncond is not None:
        finite &= torch.isfinite(uncond).all()

    def checking(step, total, x0):
        if step == 1 and not finite:
            raise not_finite_error(dtype)
        if callback is not None:
            callback(step, total, x0)
    return checking


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
    array = (images.float() * 255).round_().to(torch.uint8).permute(0, 2, 3, 1)  # (B, H, W, 3)
    array = array.contiguous().cpu().numpy()  # made contiguous on the device: PIL copies a strided array slowly
    return [Image.fromarray(a) for a in array]
