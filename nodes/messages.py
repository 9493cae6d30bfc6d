"""sana_core's errors in the words of the ComfyUI surface: the node and input to change, never the Python
function or keyword argument the library's own messages name (load_autoencoder, cross_heads=N,
aspect_ratio='16:9'). The one place where nodes word an error of the library."""
from sana_core.checkpoints import CheckpointError
from sana_core.resolution import SizeError

COMPONENTS = {"transformer": ("a SANA transformer (DiT)", "SanaModelLoader", "model_name"),
              "text_encoder": ("a Gemma-2 text encoder", "SanaTextEncoderLoader", "text_encoder_name"),
              "autoencoder": ("a DC-AE autoencoder (VAE)", "SanaVAELoader", "vae_name"),
              "controlnet": ("a ControlNet", "SanaControlNetLoader", "control_net_name")}
NEEDS = {  # loader hints (Python) a file lacks -> what a ComfyUI user can do instead
    "cross_heads": "the file does not say how many cross-attention heads its model has: use the model's diffusers "
                   "folder (with its config.json) or a published SANA file",
    "base_size": "the file does not say the size its position embedding was trained at: use the model's diffusers "
                 "folder (with its config.json), or keep 2K / 4K in the file name (e.g. Sana_1600M_2Kpx.pth)",
}


def display_name(node: str) -> str:
    from . import NODE_DISPLAY_NAME_MAPPINGS  # here: the package imports this module
    return NODE_DISPLAY_NAME_MAPPINGS.get(node, node)


def load_error(error: Exception, kind: str, file_name: str) -> CheckpointError:
    """A loader node's error: what the file is, and which node and input to use instead."""
    what, node, _ = COMPONENTS[kind]
    found = getattr(error, "found", None)
    if found in COMPONENTS and found != kind:
        found_what, found_node, found_input = COMPONENTS[found]
        return CheckpointError(f"{display_name(node)}: '{file_name}' is {found_what}, not {what}: load it with "
                               f"{display_name(found_node)} ({found_input}), and pick {what} here")
    needs = NEEDS.get(getattr(error, "needs", None))
    if needs:
        return CheckpointError(f"{display_name(node)}: could not load '{file_name}' as {what}: {needs}")
    return CheckpointError(f"{display_name(node)}: could not load '{file_name}' as {what}: {error}")


def lora_error(error: Exception, file_name: str) -> CheckpointError:
    """SanaLoraLoader's error: the library's reason (the file's format, family or shapes) for its lora_name."""
    return CheckpointError(f"{display_name('SanaLoraLoader')}: lora_name '{file_name}' cannot be applied: {error}")


def size_error(error: SizeError, node: str) -> ValueError:
    return ValueError(f"{display_name(node)}: {error.side} {error.value} is not a multiple of 32 pixels (SANA's "
                      f"autoencoder works on 32x32 blocks): set {error.side} to {error.choices}, or pick a preset")
