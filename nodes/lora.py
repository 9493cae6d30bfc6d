"""SANA LoRA Loader: a LoRA file from ComfyUI's `loras` folder applied to a SANA MODEL.

Inside ComfyUI the LoRA becomes weight patches on a clone of the MODEL's ModelPatcher (`add_patches`), so it
stacks with other LoRA loaders, follows ComfyUI's offloading (low-VRAM loads patch on the fly) and unloads
cleanly; sana-run's stand-in MODEL carries the LoRA and the host merges it when the DiT computes (host.py).

The names come from sana_core.lora's one mapping (`lora_patches`): q/k/v (k/v) updates land on row slices of
the fused projections as comfy/lora.py's `(key, (dim, offset, size))` patch keys; the scales (the file's
`.alpha`, or the PEFT metadata diffusers writes, which ComfyUI's generic loader ignores) go in as `.alpha`
tensors, and ComfyUI's own weight adapters do the rest, LyCORIS LoHa / LoKr and kohya DoRA included.
"""
import torch

from sana_core.checkpoints import CheckpointError
from sana_core.lora import UNMERGEABLE, detect_format, lora_targets, read_lora, read_lora_file

from . import host, messages
from .loaders import _installed

PREFIX = "diffusion_model.transformer."  # where the core MODEL's patcher finds our DiT's parameters


def lora_patches(name: str, tensors: dict, metadata: dict, transformer, prefix: str = PREFIX) -> dict:
    """ModelPatcher.add_patches input for a LoRA's tensors on `transformer` (a SanaTransformer whose
    parameters the patcher names `prefix` + our name). Plain LoRAs are read (and their shapes checked) by
    sana_core.lora.read_lora; other adapters are only mapped and left to ComfyUI's weight adapters."""
    import comfy.lora

    tensors, extra = dict(tensors), {}
    kind = detect_format(tensors)
    if kind == "DoRA (PEFT)":  # ComfyUI's DoRA reads kohya's dora_scale, not PEFT's magnitude vector
        raise CheckpointError(f"{name} is a {kind} file, which ComfyUI's weight adapters do not read; use a "
                              f"kohya-style DoRA (dora_scale) or a plain LoRA")
    if kind in UNMERGEABLE.values():  # mapped here, computed by ComfyUI's weight adapters
        _, targets, _ = lora_targets(name, tensors, {k: tuple(v.shape) for k, v in transformer.state_dict().items()})
    else:
        lora = read_lora(name, transformer, tensors=tensors, metadata=metadata)
        targets = {update.module: update.target for update in lora.updates}
        for update in lora.updates:  # comfy scales by alpha / rank
            tensors[f"{update.module}.alpha"] = torch.tensor(update.scale * update.down.shape[0])
            if update.bias is not None:
                key = prefix + update.target.key[:-len("weight")] + "bias"
                extra[(key, update.target.slice) if update.target.slice else key] = \
                    ("diff", (update.scale * update.bias.float(),))
    to_load = {module: (prefix + t.key, t.slice) if t.slice else prefix + t.key for module, t in targets.items()}
    return {**comfy.lora.load_lora(tensors, to_load, log_missing=False), **extra}


class SanaLoraLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SANA model (from SANA Model Loader, or another LoRA loader) to apply "
                                           "the LoRA to."}),
            "lora_name": (host.current().list_models("lora"), {
                "tooltip": "A SANA LoRA in models/loras. Told apart by their keys: diffusers / PEFT "
                           "(train_dreambooth_lora_sana.py), kohya / OneTrainer, original SANA names, LyCORIS "
                           "LoHa / LoKr, kohya DoRA. The LoRA must be made for this model's size (0.6B, 1.6B ...)."}),
            "strength_model": ("FLOAT", {
                "default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                "tooltip": "How strongly the LoRA changes the model: 1 as trained, 0 off, negative values "
                           "subtract it."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name):
        return _installed("lora", lora_name)

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The SANA model with the LoRA applied (the input model is unchanged).",)
    FUNCTION = "load_lora"
    CATEGORY = "SANA"
    DESCRIPTION = ("Applies a SANA LoRA (diffusers / PEFT, kohya / OneTrainer, original-name, LyCORIS) to the "
                   "model as weight patches: stacks with other LoRA loaders, costs nothing per step.")

    def load_lora(self, model, lora_name, strength_model):
        host.unwrap(model, "transformer", "SanaLoraLoader")  # a MODEL of another family: a clear error
        if strength_model == 0:
            return (model,)
        h = host.current()
        try:
            tensors, metadata = read_lora_file(h.find_model("lora", lora_name))
            return (h.lora_patch(model, lora_name, tensors, metadata, strength_model),)
        except (CheckpointError, OSError) as e:
            raise messages.lora_error(e, lora_name) from e
