"""ComfyUI nodes over sana_core (imported as sana_nodes). Nothing here imports ComfyUI at module
level: the same classes run inside ComfyUI and in sana-run (see host.py)."""
from .conditioning import SanaTextEncode
from .controlnet import SanaControlNetLoader
from .custom_sampling import SanaPAG, SanaSamplerSelect, SanaScheduler
from .inpaint import SanaInpaintComposite
from .latent import SanaEmptyLatent
from .loaders import SanaModelLoader, SanaTextEncoderLoader, SanaVAELoader
from .lora import SanaLoraLoader
from .quantize import SanaQuantizeModel
from .sampling import SanaSampler
from .vae import SanaVAEDecode, SanaVAEDecodeTiled, SanaVAEEncode

NODE_CLASS_MAPPINGS = {
    "SanaModelLoader": SanaModelLoader,
    "SanaTextEncoderLoader": SanaTextEncoderLoader,
    "SanaVAELoader": SanaVAELoader,
    "SanaTextEncode": SanaTextEncode,
    "SanaEmptyLatent": SanaEmptyLatent,
    "SanaSampler": SanaSampler,
    "SanaVAEDecode": SanaVAEDecode,
    "SanaVAEDecodeTiled": SanaVAEDecodeTiled,
    "SanaVAEEncode": SanaVAEEncode,
    "SanaSamplerSelect": SanaSamplerSelect,
    "SanaScheduler": SanaScheduler,
    "SanaPAG": SanaPAG,
    "SanaControlNetLoader": SanaControlNetLoader,
    "SanaLoraLoader": SanaLoraLoader,
    "SanaQuantizeModel": SanaQuantizeModel,
    "SanaInpaintComposite": SanaInpaintComposite,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SanaModelLoader": "SANA Model Loader",
    "SanaTextEncoderLoader": "SANA Text Encoder Loader (Gemma-2)",
    "SanaVAELoader": "SANA VAE Loader (DC-AE)",
    "SanaTextEncode": "SANA Text Encode",
    "SanaEmptyLatent": "SANA Empty Latent",
    "SanaSampler": "SANA Sampler",
    "SanaVAEDecode": "SANA VAE Decode",
    "SanaVAEDecodeTiled": "SANA VAE Decode (Tiled)",
    "SanaVAEEncode": "SANA VAE Encode",
    "SanaSamplerSelect": "SANA Sampler Select (SAMPLER)",
    "SanaScheduler": "SANA Scheduler (SIGMAS)",
    "SanaPAG": "SANA Perturbed-Attention Guidance",
    "SanaControlNetLoader": "SANA ControlNet Loader",
    "SanaLoraLoader": "SANA LoRA Loader",
    "SanaQuantizeModel": "SANA Quantize Model (save)",
    "SanaInpaintComposite": "SANA Inpaint Composite",
}
