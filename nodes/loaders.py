"""Loader nodes: the DiT, Gemma-2 and DC-AE files from ComfyUI's model folders.

Each returns ComfyUI's core type: MODEL, CLIP, VAE (inside ComfyUI ComfyUI's own objects, see
comfy_family.py; outside it the `host.ManagedModel` stand-in). The weights are read to the offload device (the CPU unless ComfyUI runs --gpu-only/--highvram) and
moved to the GPU by the host's memory manager when a node computes with them.
"""
import sana_core
from sana_core.checkpoints import CheckpointError

from . import host, messages

DTYPE_CHOICES = ["auto", "bf16", "fp16", "fp32"]
MODEL_DTYPE_CHOICES = DTYPE_CHOICES + [sana_core.fp8.FP8_COMPUTE]  # the DiT also: fp8 matmuls (sana_core.fp8)
# "auto": where ComfyUI runs its text encoders; the others (round 1's values) pin it.
TEXT_ENCODER_PLACEMENTS = ["auto", "gpu", "gpu, offload after encoding", "cpu"]


def _load(kind: str, name: str, dtype: str, placement: str = "gpu", **hints) -> host.ManagedModel:
    h = host.current()
    path = h.find_model(kind, name)
    load_device, offload_device = h.devices(kind, placement)
    loader = {"transformer": sana_core.load_transformer, "text_encoder": sana_core.load_text_encoder,
              "autoencoder": sana_core.load_autoencoder}[kind]
    if kind == "transformer":  # built from the host's layer classes: ComfyUI's casts and low-VRAM loading
        hints["operations"] = h.operations()
    fp8_compute, dtype = (True, "auto") if dtype == sana_core.fp8.FP8_COMPUTE else (False, dtype)
    try:
        model = loader(path, dtype=h.dtype(kind, dtype, load_device), device=offload_device, **hints)
        if fp8_compute:  # on load_device: fp8 matmuls there, or bf16 from the fp8 weights with a warning
            sana_core.fp8.use_fp8_compute(model, load_device)
    except (CheckpointError, OSError, ValueError, KeyError, RuntimeError) as e:
        raise messages.load_error(e, kind, name) from e
    managed = h.manage(kind, model, path, load_device, offload_device)
    host.log.info(f"SANA: loaded {kind} {name} ({managed.size_bytes() / 2**30:.2f} GiB; runs on {load_device}, "
                  f"kept on {offload_device})")
    return managed


def _installed(kind: str, name: str):
    """VALIDATE_INPUTS answer (checked before a prompt runs): True, or where the file was looked for.
    (Defining it replaces ComfyUI's bare "Value not in list" for the file name.)"""
    try:
        host.current().find_model(kind, name)
    except host.ModelNotFoundError as e:
        return str(e)
    return True


class SanaModelLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (host.current().list_models("transformer"), {
                "tooltip": "The SANA DiT: a file or diffusers folder in models/diffusion_models (or "
                           "models/checkpoints), e.g. Sana_1600M_1024px_BF16.pth, Sana_Sprint_1.6B_1024px.pth or "
                           "Sana_1600M_4Kpx_BF16.pth. The variant (0.6B, 1.6B, 1.5, Sprint, 2K/4K) is read "
                           "from the weights; 2K/4K files need 2K/4K in their name."}),
            "dtype": (MODEL_DTYPE_CHOICES, {
                "default": "auto",
                "tooltip": "Compute precision. auto: bf16 on GPUs that support it (ComfyUI's --bf16-unet / "
                           "--fp32-unet flags apply), fp32 on the CPU. fp8 and GGUF files keep their weights "
                           "quantized in memory and dequantize each layer as it runs. fp8_e4m3fn_fast: the DiT "
                           "blocks' matmuls in fp8 on GPUs with fp8 tensor cores (RTX 40xx, Ada, Hopper and newer): "
                           "faster (a 4096 px step in about 0.8x the time on an H200) but less accurate (about 4% "
                           "per layer: the image changes a little); elsewhere it keeps the weights in fp8 and "
                           "computes in bf16."}),
        }, "optional": {
            "gpus": ("STRING", {
                "default": "1",
                "tooltip": "GPUs that sample each image together: 1 (default, nothing extra), 2, 4... (ComfyUI's "
                           "GPU and the next ones) or a list (0,1,3). Starts one worker process per extra GPU, "
                           "each loading this file (its own GPU memory), kept until the model is freed; every "
                           "sampler then shares its work (CFG branches, row bands at 2K/4K). LoRAs apply; "
                           "ControlNets need gpus 1."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model_name=None, gpus=None):
        from .parallel_host import devices_for
        try:
            if gpus is not None:
                devices_for(gpus, host.current().devices("transformer")[0])
        except ValueError as e:
            return str(e)
        return True if model_name is None else _installed("transformer", model_name)

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The SANA diffusion transformer (a flow model, shift = the variant's default), for SanaSampler, "
                       "KSampler or SamplerCustomAdvanced.",)
    FUNCTION = "load"
    CATEGORY = "SANA"
    DESCRIPTION = ("Loads a SANA diffusion transformer (Sana 1.0/1.5, 0.6B to 4.8B, Sana-Sprint, 2K/4K) from the "
                   "original .pth/.safetensors, a ComfyUI single file or a diffusers folder.")

    def load(self, model_name, dtype, gpus="1"):
        from .parallel_host import start_workers
        managed = _load("transformer", model_name, dtype)
        start_workers(managed, gpus, dtype)
        return (host.current().wrap(managed),)


class SanaTextEncoderLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder_name": (host.current().list_models("text_encoder"), {
                "tooltip": "Gemma-2-2B-it: a Hugging Face folder in models/text_encoders (e.g. gemma-2-2b-it with "
                           "config.json, safetensors and tokenizer files) or a single .safetensors with the "
                           "tokenizer inside. SANA was trained with gemma-2-2b-it; Lumina 2's gemma_2_2b file (the "
                           "base model) loads but conditions differently."}),
            "dtype": (DTYPE_CHOICES, {
                "default": "auto",
                "tooltip": "auto: bf16 on GPUs that support it, else fp32 (Gemma-2 overflows in fp16)."}),
            "device": (TEXT_ENCODER_PLACEMENTS, {
                "default": "auto",
                "tooltip": "auto: where ComfyUI runs text encoders: the GPU, or the CPU with --lowvram, --novram, "
                           "--cpu, no GPU or one without fp16; ComfyUI evicts it when memory is needed. gpu: always "
                           "the GPU. gpu, offload after encoding: moves its ~5 GB off the GPU right after each "
                           "encode (16 GB cards, 4K). cpu: always the CPU (slower, no GPU memory)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, text_encoder_name):
        return _installed("text_encoder", text_encoder_name)

    RETURN_TYPES = ("CLIP",)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("Gemma-2 with its tokenizer, for SanaTextEncode or CLIP Text Encode (which adds SANA's "
                       "instruction to any text but empty text).",)
    FUNCTION = "load"
    CATEGORY = "SANA"
    DESCRIPTION = "Loads the Gemma-2 text encoder SANA uses, offline, from a Hugging Face folder or a single file."

    def load(self, text_encoder_name, dtype, device):
        managed = _load("text_encoder", text_encoder_name, dtype, device.split(",")[0])  # auto | gpu | cpu
        managed.offload_after_use = device == "gpu, offload after encoding"
        return (host.current().wrap(managed),)


class SanaVAELoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (host.current().list_models("autoencoder"), {
                "tooltip": "The DC-AE f32c32 autoencoder in models/vae: a diffusers folder (e.g. "
                           "dc-ae-f32c32-sana-1.1-diffusers) or a single file (original mit-han-lab or diffusers "
                           "keys). Version 1.1 has the better decoder; both fit every SANA model."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, vae_name):
        return _installed("autoencoder", vae_name)

    RETURN_TYPES = ("VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The DC-AE autoencoder, for SanaVAEDecode / SanaVAEEncode or VAE Decode (Tiled) / VAE Encode; "
                       "previews of SANA models while sampling use its colours.",)
    FUNCTION = "load"
    CATEGORY = "SANA"
    DESCRIPTION = "Loads SANA's 32x DC-AE autoencoder (32 latent channels), precision chosen by ComfyUI's VAE rules."

    def load(self, vae_name):
        return (host.current().wrap(_load("autoencoder", vae_name, "auto")),)
