"""SANA LoRA loader for ComfyUI's core MODEL: a LoRA file becomes weight patches on the ModelPatcher
(`add_patches`), so it stacks with other loaders, follows ComfyUI's offloading and unloads cleanly.

SKETCH, not registered in NODE_CLASS_MAPPINGS yet: it needs SANA as a core MODEL (issue 16; as built on
branch i16c, the patcher's model holds our SanaTransformer at `diffusion_model.transformer`). `lora_patches`
is complete and tested under ComfyUI's Python (tests/comfy/test_lora_patches.py) on a ModelPatcher whose
model holds a SanaTransformer there.

The names come from sana_core.lora's one mapping; q/k/v (k/v) updates land on row slices of the fused
projections as comfy/lora.py's `(key, (dim, offset, size))` patch keys; the scales (the file's `.alpha`, or
the PEFT metadata diffusers writes, which ComfyUI's generic loader ignores) go in as `.alpha` tensors, and
ComfyUI's own weight adapters do the rest, LyCORIS LoHa / LoKr and kohya DoRA included.
"""
import torch

from sana_core.checkpoints import CheckpointError, read_checkpoint
from sana_core.lora import UNMERGEABLE, detect_format, lora_targets, read_lora


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
        import folder_paths
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SANA model (from the SANA Model Loader) to apply the LoRA to."}),
            "lora_name": (folder_paths.get_filename_list("loras"), {
                "tooltip": "A SANA LoRA in models/loras: diffusers / PEFT (train_dreambooth_lora_sana.py), "
                           "kohya / OneTrainer, original-name, LyCORIS LoHa / LoKr files are told apart by "
                           "their keys."}),
            "strength_model": ("FLOAT", {
                "default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                "tooltip": "How strongly the LoRA changes the model; negative values subtract it."}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_lora"
    CATEGORY = "sana"
    DESCRIPTION = "Applies a SANA LoRA to the model as weight patches (stacks with other LoRA loaders)."

    def load_lora(self, model, lora_name, strength_model):
        import folder_paths
        if strength_model == 0:
            return (model,)
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        tensors, metadata = read_checkpoint(path)
        patched = model.clone()
        transformer = model.model.diffusion_model.transformer
        patched.add_patches(lora_patches(lora_name, tensors, metadata, transformer), strength_model)
        return (patched,)
