"""SANA Quantize Model (save): a DiT file from diffusion_models written as fp8 (ComfyUI's scaled layout) or GGUF
Q8_0 / Q5_0 / Q4_0 into diffusion_models, where SANA Model Loader lists it (sana_core.quantized_files)."""
from pathlib import Path

from sana_core.checkpoints import CheckpointError
from sana_core.quantized_files import quantize_checkpoint

from . import host
from .loaders import _installed

FORMATS = {"Q8_0": "q8_0", "fp8": "fp8", "Q5_0": "q5_0", "Q4_0": "q4_0"}  # shown -> quantize_checkpoint's
NODE = "SANA Quantize Model (save)"


class SanaQuantizeModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (host.current().list_models("transformer"), {
                "tooltip": "The bf16 / fp16 / fp32 SANA DiT to quantize (a file or diffusers folder in "
                           "models/diffusion_models or models/checkpoints)."}),
            "format": (list(FORMATS), {
                "default": "Q8_0",
                "tooltip": "Q8_0: GGUF, about half of bf16, nearly lossless. fp8: ComfyUI's scaled fp8 (.safetensors), "
                           "the same size. Q5_0 / Q4_0: GGUF, about a third / a quarter of bf16, with visible "
                           "changes. Only the blocks' matrices are quantized (~97% of the weights)."}),
            "output_name": ("STRING", {
                "default": "sana_quantized",
                "tooltip": "File name to write in models/diffusion_models (no folders; the extension follows the "
                           "format: .gguf, or .safetensors for fp8). An existing file is never overwritten."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model_name):
        return _installed("transformer", model_name)

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("model_name",)
    OUTPUT_TOOLTIPS = ("The written file's name, as SANA Model Loader lists it.",)
    OUTPUT_NODE = True
    FUNCTION = "quantize"
    CATEGORY = "SANA"
    DESCRIPTION = ("Writes a SANA DiT quantized (fp8, GGUF Q8_0 / Q5_0 / Q4_0) into models/diffusion_models, for "
                   "SANA Model Loader: smaller files and less GPU memory.")

    def quantize(self, model_name, format, output_name):
        h = host.current()
        if format not in FORMATS:
            raise ValueError(f"{NODE}: format {format!r} is not one of {', '.join(FORMATS)}")
        source = h.find_model("transformer", model_name)
        stem = output_name.strip()
        for suffix in (".gguf", ".safetensors"):
            stem = stem.removesuffix(suffix)
        if not stem or Path(stem).name != stem or stem in (".", ".."):
            raise ValueError(f"{NODE}: output_name {output_name!r} must be a file name without folders, e.g. "
                             f"sana_1600M_q8_0")
        roots = h.roots("transformer")
        folder = next((r for r in roots if r.name == "diffusion_models"), roots[0])
        out = folder / (stem + (".safetensors" if format == "fp8" else ".gguf"))
        if out.exists():
            raise FileExistsError(f"{NODE}: {out.name} already exists in {folder}: choose another output_name "
                                  f"(nothing was overwritten)")
        folder.mkdir(parents=True, exist_ok=True)
        update = h.progress(1, NODE)

        def progress(done, total):
            h.check_interrupted()  # Cancel: the half-written file is removed below
            update(done, total)
        try:
            summary = quantize_checkpoint(source, out, FORMATS[format], progress=progress)
        except (CheckpointError, ValueError) as e:
            out.unlink(missing_ok=True)
            raise ValueError(f"{NODE}: cannot quantize {model_name}: {e}") from None
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        update(1, 1)
        host.log.info(f"{NODE}: wrote {out} ({summary['out_mib']} MiB from {summary['source_mib']} MiB)")
        return {"ui": {"text": [f"{out.name}: {summary['out_mib']} MiB ({format}) from {summary['source_mib']} MiB"]},
                "result": (out.name,)}
